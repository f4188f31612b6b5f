"""Learning-rate schedules: linear warm-up, then cosine, linear or constant to a final value."""

from __future__ import annotations

import optax

DECAYS = ("cosine", "linear", "constant")


def warmup_decay_schedule(
    peak_value: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    final_fraction: float = 0.1,
    decay_steps: int | None = None,
) -> optax.Schedule:
    """0 -> ``peak_value`` linearly over ``warmup_steps``, then ``decay`` to
    ``final_fraction * peak_value`` at step ``decay_steps`` (default ``total_steps``), then flat.

    ``decay_steps`` longer than ``total_steps`` gives a run stopped early on a longer schedule
    (MEDITRON ended its 1-epoch run on a 2-epoch cosine).
    """
    if decay not in DECAYS:
        raise ValueError(f"schedule decay must be one of {DECAYS}, got {decay!r}")
    if total_steps < 1:
        raise ValueError(f"schedule total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"schedule warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
    if not 0 <= final_fraction <= 1:
        raise ValueError(f"schedule final_fraction must be in [0, 1], got {final_fraction}")
    decay_steps = total_steps if decay_steps is None else decay_steps
    if decay_steps < warmup_steps:
        raise ValueError(
            f"schedule decay_steps={decay_steps} must be >= warmup_steps={warmup_steps}"
        )
    final = final_fraction * peak_value
    span = max(decay_steps - warmup_steps, 1)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak_value, span, alpha=final_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(peak_value, final, span)
    else:
        after = optax.constant_schedule(peak_value)
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])
