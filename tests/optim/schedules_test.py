"""Warmup-stable-decay and per-stage schedules against closed forms."""

import math

import ml_collections
import pytest

from jaxlab import optim


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_closed_form(shape):
    peak, warmup, total, final, fraction = 3.0, 10, 110, 0.05, 0.25
    s = optim.warmup_decay_schedule(
        peak,
        total_steps=total,
        warmup_steps=warmup,
        decay="wsd",
        final_fraction=final,
        wsd_decay_fraction=fraction,
        wsd_shape=shape,
    )
    # The last quarter of the 110 steps (warm-up included) decays: steps 82.5 -> 110.
    cooldown = round(fraction * total)  # 28 steps (27.5 rounded to even)
    stable_end = total - cooldown  # 82
    for step in [0, 4, 10, 50, 82, 83, 90, 97, 109, 110, 400]:
        if step < warmup:
            expected = peak * step / warmup
        elif step <= stable_end:
            expected = peak
        else:
            t = min((step - stable_end) / cooldown, 1.0)
            progress = {
                "linear": t,
                "cosine": 0.5 * (1 - math.cos(math.pi * t)),
                "sqrt": math.sqrt(t),
            }[shape]
            expected = peak + (final * peak - peak) * progress
        assert float(s(step)) == pytest.approx(expected, rel=1e-5, abs=1e-7), step


def test_stages_restart_the_schedule():
    cfg = ml_collections.ConfigDict(
        dict(
            learning_rate=1.0,
            warmup_steps=5,
            schedule="cosine",
            final_lr_fraction=0.1,
            stage_steps=(20, 40),
        )
    )
    staged = optim.learning_rate_schedule(cfg, 60)
    first = optim.warmup_decay_schedule(1.0, total_steps=20, warmup_steps=5, final_fraction=0.1)
    second = optim.warmup_decay_schedule(1.0, total_steps=40, warmup_steps=5, final_fraction=0.1)
    for step in range(60):
        expected = first(step) if step < 20 else second(step - 20)
        assert float(staged(step)) == pytest.approx(float(expected), rel=1e-6), step
    assert float(staged(20)) == 0.0  # the second stage warms up from zero again
    cfg.stage_steps = (20, 30)
    with pytest.raises(ValueError, match="config.optim.stage_steps"):
        optim.learning_rate_schedule(cfg, 60)


def test_wsd_errors_name_the_field():
    with pytest.raises(ValueError, match="wsd_shape"):
        optim.warmup_decay_schedule(1.0, total_steps=10, decay="wsd", wsd_shape="exp")
    with pytest.raises(ValueError, match="wsd_decay_fraction"):
        optim.warmup_decay_schedule(1.0, total_steps=10, decay="wsd", wsd_decay_fraction=0.0)
