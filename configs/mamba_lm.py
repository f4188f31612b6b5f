"""The tiny LM as a Mamba: pure Mamba-1 / Mamba-2 / discrete Mamba-2 (Llamba), or a hybrid.

Usage:
  python -m experiments.train_lm --config=configs/mamba_lm.py:mamba1 --workdir=runs/mamba1
  python -m experiments.train_lm --config=configs/mamba_lm.py:hybrid --workdir=runs/hybrid \
      --config.model.attention_layers=1,3
"""

import ml_collections

from configs import lm_tiny

VARIANTS = {
    # Original Mamba: no MLP, wider mixer.
    "mamba1": dict(mixer="mamba1", intermediate_size=0, expand=2, num_layers=4),
    "mamba2": dict(mixer="mamba2", intermediate_size=0, expand=2, num_layers=4, head_dim=32),
    # Llamba-style: Llama blocks with the mixer swapped, MLPs kept, one B/C per head.
    "llamba": dict(
        mixer="discrete_mamba2", intermediate_size=688, expand=1, num_layers=4, head_dim=32
    ),
    # MambaInLlama-style hybrid: Mamba-1 mixers with MLPs, attention in layer 3 of 4.
    "hybrid": dict(
        mixer="mamba1", intermediate_size=688, expand=1, num_layers=4, attention_layers=(3,)
    ),
}


def get_config(variant: str = "mamba1") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(
            f"configs/mamba_lm.py: variant must be one of {sorted(VARIANTS)}, got {variant!r}"
        )
    config = lm_tiny.get_config()
    model = dict(
        name="mamba",
        vocab_size=0,
        hidden_size=256,
        num_layers=4,
        intermediate_size=0,
        mixer="mamba1",
        expand=2,
        state_size=16,
        conv_kernel=4,
        head_dim=64,
        num_groups=1,
        chunk_size=64,
        scan_impl="auto",
        attention_layers=(),
        num_heads=8,
        num_kv_heads=4,
        max_seq_len=1024,
        rope_theta=10000.0,
        tie_embeddings=True,
        initializer_range=0.02,
        param_dtype="float32",
        dtype="float32",
        remat=False,
    )
    model.update(VARIANTS[variant])
    config.model = ml_collections.ConfigDict(model)
    return config
