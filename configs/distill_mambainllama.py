"""MambaInLlama (Wang et al. 2024): a mamba2 hybrid distilled from a Llama teacher by stepwise
replacement, then end-to-end KL; each stage its own run (experiments/distill_stages.py).

* ``step<k>``: attention layers are replaced by Mamba a few at a time (``per_step``; even layers
  first, as the authors' stepwise scripts), each step starting from the previous one's run; every
  non-Mamba parameter (embedding, attention, MLPs, norms) is frozen; the loss is
  ``0.1 KL + 1 CE`` on the teacher's argmax (pseudo-labels), as their stepwise config.
* ``e2e``: end-to-end forward KL (their ``kl 1.0, ce 0.0``), every parameter trained.

The kept attention layers and the MLPs, norms and embedding come from the teacher; new mixers
start from ``config.seed``. The defaults fit the ``configs/lm_tiny.py`` teacher (256 wide, 4
layers, 8 heads): mamba2 with 8 heads of 32 channels and one B/C group per head.

Usage (``:50`` keeps attention in every other layer, ``:25`` in every fourth):
  python -m experiments.distill_stages --config=configs/distill_mambainllama.py:50 \
      --workdir=runs/mil50 --teacher=runs/teacher
"""

import ml_collections

from configs import mamba_lm

NOT_MAMBA = (
    "embed",
    "attn",
    "input_norm",
    "post_attention_norm",
    "post_mixer_norm",
    "mlp",
    "final_norm",
    "lm_head",  # an untied head
    "dwa",  # a DenseFormer student's depth-weighted averages (the teacher's)
)


def kept_attention(num_layers: int, percent: int) -> tuple[int, ...]:
    """The layers that stay attention: every 2nd (50%) or 4th (25%) from the first such, as
    the released hybrids (odd layers; 3, 7, ...)."""
    period = {50: 2, 25: 4}.get(percent)
    if period is None:
        raise ValueError(
            f"configs/distill_mambainllama.py: percent must be 50 or 25, got {percent}"
        )
    return tuple(range(period - 1, num_layers, period))


def replacement_steps(num_layers: int, kept, per_step: int) -> list[tuple[int, ...]]:
    """The attention layers after each step: even layers are replaced first, then odd ones
    not kept, ``per_step`` at a time."""
    order = [i for i in range(0, num_layers, 2) if i not in kept]
    order += [i for i in range(1, num_layers, 2) if i not in kept]
    attention, steps = list(range(num_layers)), []
    for start in range(0, len(order), per_step):
        attention = [i for i in attention if i not in order[start : start + per_step]]
        steps.append(tuple(attention))
    return steps


def set_replacement(config, percent: int, per_step: int) -> ml_collections.ConfigDict:
    """Sets the kept attention layers of ``config.model`` (its ``num_layers``) and one stepwise
    stage per replacement step, then ``e2e`` (what :func:`get_config` does; call it again after
    changing the depth)."""
    num_layers = config.model.num_layers
    kept = kept_attention(num_layers, percent)
    config.model.attention_layers = kept
    stages, order = {}, []
    for k, attention in enumerate(replacement_steps(num_layers, kept, per_step)):
        steps = 100
        stages[f"step{k}"] = dict(
            init="teacher" if k == 0 else "previous",
            warmup_fraction=0.1,
            num_steps=steps,
            eval_every=steps,
            checkpoint_every=steps,
            model=dict(attention_layers=attention),
            objective=dict(name="distill_pseudo_labels", kl_weight=0.1, ce_weight=1.0),
            optim=dict(
                learning_rate=1e-3,
                schedule="cosine",
                b2=0.98,
                frozen=NOT_MAMBA,
            ),
        )
        order.append(f"step{k}")
    stages["e2e"] = dict(
        init="previous",
        warmup_fraction=0.05,
        num_steps=400,
        eval_every=400,
        checkpoint_every=400,
        objective=dict(name="distill_kl", kl_weight=1.0, ce_weight=0.0),
        optim=dict(learning_rate=5e-4, schedule="cosine", frozen=()),
    )
    order.append("e2e")
    with config.unlocked():
        config.stage_order = tuple(order)
        config.stages = ml_collections.ConfigDict(stages)
    return config


def get_config(percent: str = "50") -> ml_collections.ConfigDict:
    config = mamba_lm.get_config("mamba2")
    config.model.update(
        mixer="mamba2",
        hidden_size=256,
        num_layers=4,
        intermediate_size=688,
        expand=1,
        head_dim=32,
        num_groups=8,
        state_size=32,
        num_heads=8,
        num_kv_heads=4,
        tie_embeddings=True,
    )
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
    return set_replacement(config, int(percent), per_step=1)
