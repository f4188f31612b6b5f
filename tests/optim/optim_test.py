"""Optimizer registry and schedules against closed forms and NumPy references."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxlab import optim
from jaxlab.registry import Registry


def _config(**kw):
    base = dict(
        name="adamw",
        learning_rate=1e-2,
        warmup_steps=0,
        schedule="constant",
        final_lr_fraction=0.1,
        decay_steps=0,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=0.0,
    )
    base.update(kw)
    return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_closed_forms(decay):
    peak, warmup, total, final = 2.0, 10, 110, 0.1
    s = optim.warmup_decay_schedule(
        peak, total_steps=total, warmup_steps=warmup, decay=decay, final_fraction=final
    )
    for step in [0, 3, 10, 35, 60, 109, 110, 500]:
        if step < warmup:
            expected = peak * step / warmup
        else:
            t = min(step - warmup, total - warmup) / (total - warmup)
            expected = {
                "cosine": peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))),
                "linear": peak * (1 - (1 - final) * t),
                "constant": peak,
            }[decay]
        assert float(s(step)) == pytest.approx(expected, rel=1e-5, abs=1e-7), step


def test_decay_steps_beyond_the_run_stops_early_on_a_longer_cosine():
    s = optim.warmup_decay_schedule(3e-4, total_steps=100, decay_steps=200, final_fraction=0.1)
    assert float(s(100)) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5), rel=1e-5)


def test_adamw_matches_numpy_reference_with_matrix_only_decay_and_clipping():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    cfg = _config(clip_norm=1.5, warmup_steps=2, schedule="linear")
    tx = optim.build_optimizer(cfg, total_steps=10)
    lr = optim.learning_rate_schedule(cfg, 10)

    jp = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(jp)
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    for t, g in enumerate(grads):
        updates, state = tx.update(
            {k: jnp.asarray(x, jnp.float32) for k, x in g.items()}, state, jp
        )
        jp = {k: jp[k] + updates[k] for k in jp}
        norm = math.sqrt(sum((x**2).sum() for x in g.values()))
        scale = min(1.0, 1.5 / norm)
        for k in ref:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v2[k] = 0.95 * v2[k] + 0.05 * gk**2
            mhat, vhat = m[k] / (1 - 0.9 ** (t + 1)), v2[k] / (1 - 0.95 ** (t + 1))
            step = mhat / (np.sqrt(vhat) + 1e-8) + (0.1 * ref[k] if ref[k].ndim >= 2 else 0)
            ref[k] = ref[k] - float(lr(t)) * step
    for k in ref:
        np.testing.assert_allclose(np.asarray(jp[k]), ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lion"])
def test_every_registered_optimizer_descends_a_quadratic(name):
    tx = optim.build_optimizer(_config(name=name, learning_rate=0.05, momentum=0.9), 200)
    x = {"w": jnp.full((2, 2), 3.0), "b": jnp.full((2,), -2.0)}
    state = tx.init(x)
    for _ in range(200):
        g = {k: 2 * v for k, v in x.items()}
        updates, state = tx.update(g, state, x)
        x = {k: x[k] + updates[k] for k in x}
    assert max(float(jnp.abs(v).max()) for v in x.values()) < 0.3


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(learning_rate=-1.0), r"config.optim.learning_rate must be a finite positive number"),
        (dict(name="adagrad9"), r"config.optim.name must be one of \(.*\), got 'adagrad9'"),
        (dict(clip_norm=-1.0), r"config.optim.clip_norm must be >= 0"),
        (dict(weight_decay=-0.1), r"config.optim.weight_decay must be >= 0"),
        (dict(schedule="step"), r"schedule decay must be one of"),
    ],
)
def test_bad_optimizer_config_is_named(changes, message):
    with pytest.raises(ValueError, match=message):
        optim.build_optimizer(_config(**changes), 10)


def test_decay_mask_skips_biases_and_norms_of_a_real_model():
    from flax import nnx

    from jaxlab import models

    model = models.build(
        dict(
            name="llama",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_layers=1,
            num_heads=4,
            num_kv_heads=2,
            attention_bias=True,
            mlp_bias=True,
        ),
        nnx.Rngs(0),
    )
    mask = optim.decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    attn, mlp = mask["layers"][0]["attn"], mask["layers"][0]["mlp"]
    assert attn["q_proj"] and attn["o_proj"] and mlp["up_proj"] and mask["embed"]
    assert not any(
        [
            attn["q_bias"],
            attn["k_bias"],
            attn["o_bias"],
            mlp["up_bias"],
            mask["final_norm"]["scale"],
        ]
    )


def test_optimizer_registry_builds_a_registered_factory(monkeypatch):
    fresh = Registry("optimizer", field="config.optim.name")
    for name in optim.OPTIMIZERS:
        fresh.register(name, optim.OPTIMIZERS.get(name))
    monkeypatch.setattr(optim, "OPTIMIZERS", fresh)
    seen = {}

    def halved_sgd(config, lr):
        seen["lr0"] = float(lr(0))
        return optax.sgd(lambda step: 0.5 * lr(step))

    optim.register_optimizer("halved_sgd", halved_sgd)
    assert "halved_sgd" in optim.available_optimizers()
    tx = optim.build_optimizer(_config(name="halved_sgd", learning_rate=0.2), 10)
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init({"w": jnp.zeros(3)}))
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3), rtol=1e-6)
    assert seen["lr0"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="'adamw' is already registered"):
        optim.register_optimizer("adamw", halved_sgd)
    optim.register_optimizer("adamw", halved_sgd, replace=True)
    assert optim.OPTIMIZERS.get("adamw") is halved_sgd
