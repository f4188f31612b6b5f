"""Learning-rate schedules: linear warm-up, then cosine, linear or constant decay to a final value,
or warmup-stable-decay (WSD); several stages each restart their own schedule."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import optax

DECAYS = ("cosine", "linear", "constant", "wsd")
WSD_SHAPES = ("linear", "cosine", "sqrt")


def warmup_decay_schedule(
    peak_value: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    final_fraction: float = 0.1,
    decay_steps: int | None = None,
    wsd_decay_fraction: float = 0.2,
    wsd_shape: str = "linear",
) -> optax.Schedule:
    """0 -> ``peak_value`` linearly over ``warmup_steps``, then ``decay`` to
    ``final_fraction * peak_value`` at step ``decay_steps`` (default ``total_steps``), then flat.

    ``decay_steps`` longer than ``total_steps`` gives a run stopped early on a longer schedule
    (MEDITRON ended its 1-epoch run on a 2-epoch cosine).

    ``decay="wsd"`` (warmup-stable-decay): after the warm-up the rate stays at ``peak_value``
    until the last ``round(wsd_decay_fraction * decay_steps)`` steps (warm-up included in the
    count; at most the steps after the warm-up), then falls to the final value
    in ``wsd_shape``: ``linear``, ``cosine`` or ``sqrt`` (``1 - sqrt(t)``, Hagele et al. 2024).
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
    if decay == "wsd":
        cooldown = min(max(round(wsd_decay_fraction * decay_steps), 1), span)
        after = _stable_decay(peak_value, final, span, cooldown, wsd_decay_fraction, wsd_shape)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak_value, span, alpha=final_fraction)
    elif decay == "linear":
        after = optax.linear_schedule(peak_value, final, span)
    else:
        after = optax.constant_schedule(peak_value)
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak_value, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


def _stable_decay(peak: float, final: float, span: int, cooldown: int, fraction: float, shape: str):
    """``span`` steps after the warm-up: flat at ``peak``, then the last ``cooldown`` decay."""
    if shape not in WSD_SHAPES:
        raise ValueError(f"schedule wsd_shape must be one of {WSD_SHAPES}, got {shape!r}")
    if not 0 < fraction <= 1:
        raise ValueError(f"schedule wsd_decay_fraction must be in (0, 1], got {fraction}")
    stable = span - cooldown

    def schedule(step):
        t = jnp.clip((jnp.asarray(step, jnp.float32) - stable) / cooldown, 0.0, 1.0)
        if shape == "linear":
            progress = t
        elif shape == "cosine":
            progress = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
        else:
            progress = jnp.sqrt(t)
        return peak + (final - peak) * progress

    return schedule


def staged_schedule(
    schedules: Sequence[optax.Schedule], stage_steps: Sequence[int]
) -> optax.Schedule:
    """Stage ``i`` runs ``schedules[i]`` from its own step 0 for ``stage_steps[i]`` steps (a
    multi-stage run, e.g. distillation stages, restarts warm-up and decay in every stage)."""
    if len(schedules) != len(stage_steps) or not schedules:
        raise ValueError(
            f"staged_schedule: {len(schedules)} schedules for {len(stage_steps)} stages"
        )
    if any(n < 1 for n in stage_steps):
        raise ValueError(f"staged_schedule: stage_steps must be positive, got {list(stage_steps)}")
    boundaries = [int(b) for b in np.cumsum(stage_steps)[:-1]]
    return optax.join_schedules(list(schedules), boundaries) if boundaries else schedules[0]
