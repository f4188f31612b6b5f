"""The tiny LM as a CoTFormer: a shared stack of blocks repeated with cross-repeat attention.

Usage:
  python -m experiments.train_lm --config=configs/cotformer_lm.py --workdir=runs/cotformer
  python -m experiments.train_lm --config=configs/cotformer_lm.py --workdir=runs/but \
      --config.model.cross_repeat=False
  python -m experiments.cotformer_lm --workdir=runs/cotformer_lm   # the arms of issue 18

``experiment`` holds what only ``experiments/cotformer_lm.py`` reads (it drops the block from
every arm's run config): the seeds, the reserved blocks of its LN-CoTFormer and adaptive arms,
and the adaptive model's evaluation budgets.
"""

import ml_collections

from configs import lm_tiny

# The Llama block fields a standard Transformer compared with the CoTFormer copies from it.
BLOCK_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_heads",
    "num_kv_heads",
    "max_seq_len",
    "rope_theta",
    "initializer_range",
    "tie_embeddings",
    "param_dtype",
    "dtype",
    "attention_impl",
    "remat",
)


def standard_model(model: ml_collections.ConfigDict, num_layers: int) -> dict:
    """lm_tiny's Llama model fields with ``model``'s (a CoTFormer's) blocks, ``num_layers`` deep:
    the standard Transformer that experiments/cotformer_lm.py and its bench compare against."""
    fields = lm_tiny.get_config().model.to_dict()
    fields.update({k: model[k] for k in BLOCK_FIELDS}, num_layers=num_layers)
    return fields


def get_config() -> ml_collections.ConfigDict:
    config = lm_tiny.get_config()
    config.model = ml_collections.ConfigDict(
        dict(
            name="cotformer",
            vocab_size=0,
            hidden_size=256,
            intermediate_size=688,
            num_heads=8,
            num_kv_heads=4,
            max_seq_len=1024,
            rope_theta=10000.0,
            initializer_range=0.02,
            tie_embeddings=True,
            param_dtype="float32",
            dtype="float32",
            attention_impl="xla",
            remat=False,
            # Reserved blocks, the shared stack and its passes (jaxlab.models.cotformer).
            n_layer_begin=0,
            n_layer_mid=2,
            n_repeat=3,
            n_layer_end=0,
            # False: the Block Universal Transformer (attention within the current repeat only).
            cross_repeat=True,
            # LN-CoTFormer: a norm after every repeat, and "none" | "linear" | "per_repeat".
            ln_mid=False,
            depth_embedding="none",
            # Mixture of Repeats: a router per repeat boundary; with routing "threshold" tokens
            # continue while their router weight is >= threshold, with "sample" each batch draws
            # a budget (the authors' training rule); model.routing = (fractions) for a budget.
            adaptive=False,
            threshold=0.5,
            routing="threshold",
        )
    )
    # experiments/cotformer_lm.py: L is model.n_layer_mid and the repeats model.n_repeat; each
    # arm sets its own blocks, cross_repeat, ln_mid, depth_embedding and adaptive.
    config.experiment = ml_collections.ConfigDict(
        dict(
            seeds=(0, 1),
            # LN-CoTFormer and the adaptive model: reserved blocks before / after the shared
            # stack (the paper's 2 -> 21x5 -> 1, scaled down).
            ln_layer_begin=1,
            ln_layer_end=1,
            # Fractions of the tokens that run each extra repeat, one budget per curve point
            # (n_repeat - 1 fractions each, non-increasing); empty: 5 budgets spread evenly
            # from no extra repeat to full depth (experiments.cotformer_lm.default_budgets).
            budgets=(),
        )
    )
    return config
