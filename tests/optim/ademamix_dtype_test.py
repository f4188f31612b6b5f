"""AdEMAMix dtypes: float64 parameters under x64 match optax.contrib and float64 NumPy to 1e-12;
low-precision EMA storage; dtype arguments in every form ``jnp.dtype`` takes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.optim import ademamix, alpha_schedule, beta3_schedule
from tests.optim.ademamix_test import _run, numpy_ademamix

STEPS = 100


def _tree(rng, dtype):
    return {
        "w": rng.standard_normal((6, 4)).astype(dtype),
        "layers": [
            rng.standard_normal((5,)).astype(dtype),
            rng.standard_normal((2, 3)).astype(dtype),
        ],
    }


def _problem(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return _tree(rng, dtype), [_tree(rng, dtype) for _ in range(STEPS)]


def _max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("b1", [0.9, 0.0])
@pytest.mark.parametrize("scheduled", [False, True])
def test_float64_equals_optax_contrib_to_1e12_over_100_steps(scheduled, b1):
    # optax.contrib with b1 = 0 is the same rule: m1 = g and 1 - 0^t = 1, so m1_hat = g.
    b3 = beta3_schedule(max(b1, 0.5), 0.999, 40) if scheduled else 0.999
    alpha = alpha_schedule(8.0, 40) if scheduled else 5.0
    mask = {"w": True, "layers": [False, True]}
    kw = dict(b1=b1, b2=0.999, b3=b3, alpha=alpha, eps=1e-8, weight_decay=0.1, mask=mask)
    params, grads = _problem(0)
    with jax.enable_x64(True):
        ours, ours_state = _run(ademamix(1e-2, **kw), params, grads)
        ref, _ = _run(optax.contrib.ademamix(1e-2, **kw), params, grads)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(ours))
    core = ours_state[0]
    moments = (core.m2, core.nu) if b1 == 0 else (core.m1, core.m2, core.nu)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(moments))
    assert _max_diff(ours, params) > 1e-2  # the parameters moved
    assert _max_diff(ours, ref) < 1e-12


@pytest.mark.parametrize("b1", [0.9, 0.0])
@pytest.mark.parametrize("warmup", [0, 30])
def test_float64_equals_float64_numpy_algorithm_1(warmup, b1):
    params, grads = _problem(1)
    tx = ademamix(
        1e-2,
        b1=b1,
        b2=0.999,
        b3=beta3_schedule(b1, 0.9999, warmup),
        alpha=alpha_schedule(5.0, warmup),
        weight_decay=0.05,
    )
    with jax.enable_x64(True):
        ours, _ = _run(tx, params, grads)
    ref = numpy_ademamix(
        params,
        grads,
        lr=1e-2,
        b1=b1,
        b2=0.999,
        b3_end=0.9999,
        alpha_end=5.0,
        warmup=warmup,
        eps=1e-8,
        wd=0.05,
    )
    assert _max_diff(ours, ref) < 1e-12


def test_schedules_are_float64_under_x64():
    with jax.enable_x64(True):
        b3, alpha = beta3_schedule(0.9, 0.9999, 1000), alpha_schedule(8.0, 300)
        for step in [0, 1, 250, 999, 1000, 4000]:
            mu = min(step / 1000, 1.0)
            closed = math.exp(
                math.log(0.9)
                * math.log(0.9999)
                / ((1 - mu) * math.log(0.9999) + mu * math.log(0.9))
            )
            value = b3(jnp.asarray(step, jnp.int32))
            assert value.dtype == jnp.float64
            assert abs(float(value) - min(closed, 0.9999)) < 1e-15
            assert float(alpha(jnp.asarray(step, jnp.int32))) == min(step * 8.0 / 300, 8.0)
    # Without x64 they stay float32.
    assert beta3_schedule(0.9, 0.9999, 10)(3).dtype == jnp.float32
    assert alpha_schedule(8.0, 0)(3).dtype == jnp.float32


def test_float64_params_with_bfloat16_emas():
    params, grads = _problem(2)
    grads = grads[:30]
    with jax.enable_x64(True):
        ours, state = _run(ademamix(1e-2, b3=0.99, mu_dtype="bfloat16"), params, grads)
    core = state[0]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((core.m1, core.m2)))
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves((core.nu, ours)))
    ref = numpy_ademamix(
        params,
        grads,
        lr=1e-2,
        b1=0.9,
        b2=0.999,
        b3_end=0.99,
        alpha_end=5.0,
        warmup=0,
        eps=1e-8,
        wd=0.0,
    )
    assert _max_diff(ours, ref) < 5e-3  # bfloat16 storage of the EMAs, 8 bits of mantissa


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (jnp.bfloat16, jnp.bfloat16),
        ("bfloat16", jnp.bfloat16),
        (np.dtype(jnp.bfloat16), jnp.bfloat16),
        (jnp.float32, jnp.float32),
        (np.float32, jnp.float32),
        ("float32", jnp.float32),
        (np.dtype("float16"), jnp.float16),
    ],
)
def test_dtype_arguments_take_what_jnp_dtype_takes(dtype, expected):
    params, grads = _problem(3, np.float32)
    _, state = _run(ademamix(1e-2, mu_dtype=dtype, nu_dtype=dtype), params, grads[:3])
    core = state[0]
    assert all(x.dtype == expected for x in jax.tree.leaves((core.m1, core.m2, core.nu)))
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(core))


@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("bad", ["int32", jnp.int8, "no_such_dtype", 3])
def test_bad_dtype_arguments_are_named(name, bad):
    with pytest.raises(TypeError, match=rf"{name} must be a floating dtype.*got {bad!r}"):
        ademamix(1e-2, **{name: bad})
