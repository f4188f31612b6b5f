"""What the TPU (Mosaic) kernel tests share: a TPU mesh described without opening a chip, lowering
for TPU, and gradients checked against a float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas._common import target_platform

# Mosaic's lowering asks which chip it targets: a v5e as jax describes one, no device opened.
V5E = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice("TPU v5 lite", 1, "tpu")
)


def lowered_for_tpu(fn, args):
    """StableHLO text of ``fn(*args)`` traced and lowered for TPU."""
    with target_platform("tpu"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def assert_close(got, want, tol, what):
    """Max abs error within ``tol`` times the reference's scale (at least 1)."""
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} x {scale:.3g}"


def grads(fn, values, names, fixed, ct, ct_final):
    """Gradients of ``<fn's output, ct> + <its final state, ct_final>`` in each named value."""

    def loss(*vs):
        out, final = fn(**dict(zip(names, vs, strict=True)), **fixed)
        return jnp.sum(out * ct) + jnp.sum(final * ct_final)

    return jax.grad(loss, argnums=tuple(range(len(names))))(*values)


def assert_grads_match_float64(got, reference, values, names, fixed, ct, ct_final, tol=5e-5):
    """``got`` (the kernel's :func:`grads`) against ``reference``'s, computed in float64."""
    with jax.enable_x64(True):

        def to64(v):
            return jnp.asarray(np.asarray(v, np.float64))

        want = grads(reference, [to64(v) for v in values], names, fixed, to64(ct), to64(ct_final))
        want = [np.asarray(w) for w in want]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape, name
        assert_close(g, w, tol, f"d{name}")
