"""MOHAWK (Bick et al. 2024; Llamba): a discrete Mamba-2 student distilled from a Llama teacher in
three stages, each its own run with its own warmup-stable-decay schedule (phi-mamba issue #7).

1. ``matrix``: per layer, teacher-forced, the student mixer's materialised matrix against the
   teacher's attention probabilities (Frobenius); only the mixers train.
2. ``hidden``: per layer, teacher-forced, the student block's output against the teacher's (L2
   per token); embedding, norms and MLPs stay frozen.
3. ``kl``: end-to-end forward KL on the logits, every parameter trained.

The student starts from the teacher (embedding, norms and MLPs copied; mixers from
``config.seed``). The defaults fit the ``configs/lm_tiny.py`` teacher (256 wide, 4 layers, 8
heads, byte tokenizer): 8 SSM heads of 32 channels, one per teacher head.

Usage:
  python -m experiments.train_lm --config=configs/lm_tiny.py --workdir=runs/teacher
  python -m experiments.distill_stages --config=configs/distill_mohawk.py \
      --workdir=runs/mohawk --teacher=runs/teacher [--config.stages.kl.num_steps=1000]
"""

import ml_collections

from configs import mamba_lm

# Parameters that are not the mixers' (tied embeddings: no lm_head; with an untied teacher add
# "lm_head"). "norm" alone would also match a mamba2 mixer's own gated norm.
NOT_MIXERS = ("embed", "input_norm", "post_mixer_norm", "mlp", "final_norm")


def stage(init, objective, num_steps, learning_rate, frozen):
    return dict(
        init=init,
        warmup_fraction=0.1,
        num_steps=num_steps,
        eval_every=num_steps,
        checkpoint_every=num_steps,
        objective=objective,
        optim=dict(
            learning_rate=learning_rate,
            schedule="wsd",
            wsd_decay_fraction=0.2,
            wsd_shape="linear",
            final_lr_fraction=0.0,
            frozen=frozen,
        ),
    )


def get_config() -> ml_collections.ConfigDict:
    config = mamba_lm.get_config("llamba")
    config.model.update(
        mixer="discrete_mamba2",
        hidden_size=256,
        num_layers=4,
        intermediate_size=688,
        expand=1,
        head_dim=32,
        state_size=16,
        num_heads=8,
        num_kv_heads=4,
        tie_embeddings=True,
    )
    # The KL stage's fields: temperature, CE weight, "token_mean" (masked) or the authors'
    # "batchmean" (unmasked sum over positions / batch).
    config.objective = ml_collections.ConfigDict(
        dict(
            name="distill_kl",
            teacher="",
            temperature=1.0,
            ce_weight=0.0,
            kl_weight=1.0,
            reduction="token_mean",
        )
    )
    config.stage_order = ("matrix", "hidden", "kl")
    config.stages = ml_collections.ConfigDict(
        dict(
            matrix=stage("teacher", dict(name="mohawk_matrix"), 200, 1e-3, NOT_MIXERS),
            hidden=stage("previous", dict(name="mohawk_hidden"), 200, 1e-3, NOT_MIXERS),
            kl=stage("previous", dict(name="distill_kl"), 600, 1e-3, ()),
        )
    )
    return config
