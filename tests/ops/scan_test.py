"""jaxlab.ops.scan: every implementation of both scans against the float64 NumPy recurrences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.ops import scan
from tests.kernels_pallas.selective_scan_test import (
    numpy_of,
    numpy_ssd_of,
    reference_grads,
    scan_inputs,
    ssd_inputs,
)

IMPLS = ["sequential", "associative", "chunked", "pallas", "auto"]


@pytest.mark.parametrize("impl", IMPLS)
def test_selective_scan_impls_match_float64(impl):
    rng, args, options = scan_inputs(1, 2, 27, 8, 2, 4)
    # Jitted as models call it (one compile instead of one per operation).
    run = jax.jit(functools.partial(scan.selective_scan, **options, impl=impl, chunk_size=8))
    out, h = run(**args)
    want_out, want_h = numpy_of(args, options)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(h), want_h, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["associative", "chunked"])
def test_selective_scan_xla_gradients(impl):
    rng, args, options = scan_inputs(2, 1, 19, 6, 3, 4)
    ct = jnp.asarray(rng.standard_normal((1, 19, 6)), jnp.float32)
    ct_state = jnp.asarray(rng.standard_normal((1, 6, 4)), jnp.float32)
    names = list(args) + ["D", "z", "delta_bias", "initial_state"]

    def loss(*values):
        kw = dict(zip(names, values, strict=True))
        out, h = scan.selective_scan(**kw, delta_softplus=True, impl=impl, chunk_size=4)
        return jnp.sum(out * ct) + jnp.sum(h * ct_state)

    values = [args[n] if n in args else options[n] for n in names]
    got = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*values)
    want = reference_grads(args, options, ct, ct_state)
    for name, g in zip(names, got, strict=True):
        scale = max(1.0, float(np.abs(want[name]).max()))
        assert float(np.abs(np.asarray(g) - want[name]).max()) <= 1e-4 * scale, name


@pytest.mark.parametrize("impl", IMPLS)
def test_ssd_impls_match_float64(impl):
    rng, args, options = ssd_inputs(3, 2, 23, 4, 4, 2, 5)
    out, s = jax.jit(functools.partial(scan.ssd, **options, impl=impl, chunk_size=8))(**args)
    want_out, want_s = numpy_ssd_of(args, options)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(s), want_s, atol=2e-4, rtol=1e-4)


def test_bad_impl_and_chunk_are_named():
    _, args, _ = scan_inputs(0, 1, 8, 4, 1, 2, full=False)
    with pytest.raises(ValueError, match="impl must be one of"):
        scan.selective_scan(**args, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        scan.selective_scan(**args, impl="chunked", chunk_size=0)
