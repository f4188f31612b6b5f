"""Mamba-1 selective scan and Mamba-2 SSD against float64 NumPy recurrences written from the math.

Tolerances: float32 kernels against float64, 2e-4 absolute on outputs and states (values O(1-10)),
gradients 1e-4 relative to their largest magnitude; bf16 inputs 3e-2 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import selective_scan as ss
from kernels_pallas import ssd as ssd_lib


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def silu(x):
    return x / (1 + np.exp(-x))


def numpy_selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus_=False, h0=None
):
    """h_t = exp(delta A) h + delta u B; y = C h + D u; y *= silu(z). float64, step by step."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    batch, seq, dim = u.shape
    per_group = dim // B.shape[2]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)
    if softplus_:
        delta = softplus(delta)
    h = np.zeros((batch, dim, A.shape[1])) if h0 is None else np.array(h0, np.float64)
    y = np.zeros_like(u)
    for t in range(seq):
        for d in range(dim):
            g = d // per_group
            h[:, d] = (
                np.exp(delta[:, t, d, None] * A[d]) * h[:, d]
                + (delta[:, t, d] * u[:, t, d])[:, None] * B[:, t, g]
            )
            y[:, t, d] = np.sum(h[:, d] * C[:, t, g], axis=-1)
    if D is not None:
        y = y + u * np.asarray(D, np.float64)
    if z is not None:
        y = y * silu(np.asarray(z, np.float64))
    return y, h


def numpy_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, softplus_=False, s0=None):
    """S_t = exp(dt A) S + dt x B^T per head; y = S C + D x; y *= silu(z). float64."""
    x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
    batch, seq, heads, head_dim = x.shape
    per_group = heads // B.shape[2]
    if dt_bias is not None:
        dt = dt + np.asarray(dt_bias, np.float64)
    if softplus_:
        dt = softplus(dt)
    s = np.zeros((batch, heads, head_dim, B.shape[3])) if s0 is None else np.array(s0, np.float64)
    y = np.zeros_like(x)
    for t in range(seq):
        for h in range(heads):
            g = h // per_group
            decay = np.exp(dt[:, t, h] * A[h])[:, None, None]
            inputs = (dt[:, t, h, None] * x[:, t, h])[:, :, None] * B[:, t, g, None, :]
            s[:, h] = decay * s[:, h] + inputs
            y[:, t, h] = np.einsum("bpn,bn->bp", s[:, h], C[:, t, g])
    if D is not None:
        y = y + x * np.asarray(D, np.float64)[:, None]
    if z is not None:
        y = y * silu(np.asarray(z, np.float64))
    return y, s


def scan_inputs(seed, batch, seq, dim, groups, state, dtype=jnp.float32, full=True):
    rng = np.random.default_rng(seed)

    def normal(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    args = dict(
        u=normal(batch, seq, dim).astype(dtype),
        delta=(0.5 * normal(batch, seq, dim)).astype(dtype),
        A=-jnp.exp(normal(dim, state)),
        B=normal(batch, seq, groups, state).astype(dtype),
        C=normal(batch, seq, groups, state).astype(dtype),
    )
    options = {}
    if full:
        options = dict(
            D=normal(dim),
            z=normal(batch, seq, dim).astype(dtype),
            delta_bias=normal(dim),
            delta_softplus=True,
            initial_state=normal(batch, dim, state),
        )
    return rng, args, options


def numpy_of(args, options):
    return numpy_selective_scan(
        args["u"],
        args["delta"],
        args["A"],
        args["B"],
        args["C"],
        options.get("D"),
        options.get("z"),
        options.get("delta_bias"),
        options.get("delta_softplus", False),
        options.get("initial_state"),
    )


def grads(fn, args, options, ct, ct_state):
    names = list(args) + [k for k in ("D", "z", "delta_bias", "initial_state") if k in options]

    def loss(*values):
        kw = dict(zip(names, values, strict=True))
        rest = {k: v for k, v in options.items() if k not in kw}
        out, h = fn(**kw, **rest, return_final_state=True)
        return jnp.sum(out.astype(jnp.float32) * ct) + jnp.sum(h * ct_state)

    values = [args[n] if n in args else options[n] for n in names]
    return dict(zip(names, jax.grad(loss, argnums=tuple(range(len(names))))(*values), strict=True))


def reference_grads(args, options, ct, ct_state):
    with jax.enable_x64(True):

        def to64(d):
            return {
                k: (jnp.asarray(np.asarray(v, np.float64)) if hasattr(v, "shape") else v)
                for k, v in d.items()
            }

        got = grads(
            ss.selective_scan_reference,
            to64(args),
            to64(options),
            jnp.asarray(np.asarray(ct, np.float64)),
            jnp.asarray(np.asarray(ct_state, np.float64)),
        )
        return {k: np.asarray(v) for k, v in got.items()}


def assert_grads_close(got, want, rtol):
    for name, g in got.items():
        scale = max(1.0, float(np.abs(want[name]).max()))
        err = float(np.abs(np.asarray(g, np.float64) - want[name]).max())
        assert err <= rtol * scale, (name, err, scale)


def test_reference_is_the_numpy_recurrence():
    _, args, options = scan_inputs(0, 2, 13, 6, 3, 4)
    with jax.enable_x64(True):
        out, h = ss.selective_scan_reference(
            **{k: jnp.asarray(np.asarray(v, np.float64)) for k, v in args.items()},
            **{
                k: (jnp.asarray(np.asarray(v, np.float64)) if hasattr(v, "shape") else v)
                for k, v in options.items()
            },
            return_final_state=True,
        )
    want_out, want_h = numpy_of(args, options)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-10)
    np.testing.assert_allclose(np.asarray(h), want_h, atol=1e-10)


# (batch, seq, dim, groups, state, block sizes, all options): lengths not a multiple of the
# chunk, groups > 1, a state size that is padded, with and without D/z/bias/initial state.
CASES = [
    (2, 37, 16, 2, 5, ss.BlockSizes(chunk_size=8, block_d=8, block_d_bwd=4), True),
    (1, 50, 12, 1, 16, ss.BlockSizes(chunk_size=16, block_d=4, block_d_bwd=4), False),
    (2, 16, 24, 3, 8, ss.BlockSizes(chunk_size=4), True),
]


@pytest.mark.parametrize("case", CASES)
def test_pallas_scan_matches_float64_recurrence_and_gradients(case):
    batch, seq, dim, groups, state, blocks, full = case
    rng, args, options = scan_inputs(seq, batch, seq, dim, groups, state, full=full)
    out, h = ss.selective_scan(**args, **options, return_final_state=True, block_sizes=blocks)
    want_out, want_h = numpy_of(args, options)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(h), want_h, atol=2e-4, rtol=1e-4)
    ct = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    ct_state = jnp.asarray(rng.standard_normal(h.shape), jnp.float32)

    def kernel(**kw):
        return ss.selective_scan(**kw, block_sizes=blocks)

    assert_grads_close(
        grads(kernel, args, options, ct, ct_state),
        reference_grads(args, options, ct, ct_state),
        rtol=1e-4,
    )


def test_bf16_inputs():
    rng, args, options = scan_inputs(3, 1, 40, 16, 1, 8, dtype=jnp.bfloat16)
    out, h = ss.selective_scan(**args, **options, return_final_state=True)
    assert out.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    want_out, want_h = numpy_of(args, options)
    scale = np.abs(want_out).max()
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=3e-2 * scale)
    np.testing.assert_allclose(np.asarray(h), want_h, atol=1e-3 * np.abs(want_h).max())


def test_state_update_steps_equal_the_scan():
    rng, args, options = scan_inputs(4, 2, 9, 8, 2, 4)
    want_out, want_h = numpy_of(args, options)
    state = options["initial_state"]
    for t in range(9):
        out, state = ss.selective_state_update(
            state,
            args["u"][:, t],
            args["delta"][:, t],
            args["A"],
            args["B"][:, t],
            args["C"][:, t],
            D=options["D"],
            z=options["z"][:, t],
            delta_bias=options["delta_bias"],
            delta_softplus=True,
        )
        np.testing.assert_allclose(np.asarray(out), want_out[:, t], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state), want_h, atol=2e-4, rtol=1e-4)


def test_bad_shapes_are_named():
    _, args, _ = scan_inputs(0, 1, 8, 6, 2, 4, full=False)
    with pytest.raises(ValueError, match=r"A must be \[dim=6, state\]"):
        ss.selective_scan(**{**args, "A": args["A"][:5]})
    with pytest.raises(ValueError, match=r"groups=4 \(B.shape\[2\]\) must divide dim=6"):
        bad = jnp.zeros((1, 8, 4, 4))
        ss.selective_scan(**{**args, "B": bad, "C": bad})
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 6, 4\)"):
        ss.selective_scan(**args, initial_state=jnp.zeros((1, 4, 6)))
    with pytest.raises(ValueError, match=r"delta must have shape \(1, 8, 6\)"):
        ss.selective_scan(**{**args, "delta": args["delta"][:, :7]})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scan_kernels_lower_to_triton_for_cuda(dtype):
    spec = jax.ShapeDtypeStruct
    batch, seq, dim, groups, state = 2, 300, 128, 2, 16

    def forward_backward(u, delta, A, B, C, h0):
        def run(*a):
            return ss.selective_scan(
                *a[:5],
                initial_state=a[5],
                delta_softplus=True,
                return_final_state=True,
                interpret=False,
            )

        out, vjp = jax.vjp(run, u, delta, A, B, C, h0)
        return out, vjp(out)

    args = (
        spec((batch, seq, dim), dtype),
        spec((batch, seq, dim), dtype),
        spec((dim, state), jnp.float32),
        spec((batch, seq, groups, state), dtype),
        spec((batch, seq, groups, state), dtype),
        spec((batch, dim, state), jnp.float32),
    )
    text = jax.jit(forward_backward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "selective_scan_fwd" in text and "selective_scan_bwd" in text
    assert text.count("__gpu$xla.gpu.triton") >= 2


# ------------------------------------------------------------------------------------------ SSD


def ssd_inputs(seed, batch, seq, heads, head_dim, groups, state):
    rng = np.random.default_rng(seed)

    def normal(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    args = dict(
        x=normal(batch, seq, heads, head_dim),
        dt=0.5 * normal(batch, seq, heads),
        A=-jnp.exp(normal(heads)),
        B=normal(batch, seq, groups, state),
        C=normal(batch, seq, groups, state),
    )
    options = dict(
        D=normal(heads),
        z=normal(batch, seq, heads, head_dim),
        dt_bias=normal(heads),
        dt_softplus=True,
        initial_state=normal(batch, heads, head_dim, state),
    )
    return rng, args, options


def numpy_ssd_of(args, options):
    return numpy_ssd(
        args["x"],
        args["dt"],
        args["A"],
        args["B"],
        args["C"],
        options["D"],
        options["z"],
        options["dt_bias"],
        True,
        options["initial_state"],
    )


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("chunk_size", [8, 16])
def test_ssd_chunked_and_pallas_match_float64_recurrence(groups, chunk_size):
    rng, args, options = ssd_inputs(groups, 2, 29, 4, 8, groups, 6)
    want_out, want_s = numpy_ssd_of(args, options)
    for fn in (ssd_lib.ssd_chunked, ssd_lib.ssd, ssd_lib.ssd_reference):
        kw = {} if fn is ssd_lib.ssd_reference else dict(chunk_size=chunk_size)
        out, s = fn(**args, **options, **kw, return_final_state=True)
        np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(s), want_s, atol=2e-4, rtol=1e-4)


def test_ssd_gradients_match_the_float64_reference():
    rng, args, options = ssd_inputs(9, 1, 21, 4, 4, 2, 4)
    ct = jnp.asarray(rng.standard_normal(args["x"].shape), jnp.float32)
    ct_s = jnp.asarray(rng.standard_normal(options["initial_state"].shape), jnp.float32)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]

    def grads_of(fn, values, ct, ct_s, **kw):
        def loss(*vs):
            named = dict(zip(names, vs, strict=True))
            out, s = fn(**named, dt_softplus=True, return_final_state=True, **kw)
            return jnp.sum(out * ct) + jnp.sum(s * ct_s)

        return jax.grad(loss, argnums=tuple(range(len(names))))(*values)

    values = [args[n] if n in args else options[n] for n in names]
    with jax.enable_x64(True):

        def to64(v):
            return jnp.asarray(np.asarray(v, np.float64))

        want = [
            np.asarray(g)
            for g in grads_of(
                ssd_lib.ssd_reference, [to64(v) for v in values], to64(ct), to64(ct_s)
            )
        ]
    for fn in (ssd_lib.ssd_chunked, ssd_lib.ssd):
        got = grads_of(fn, values, ct, ct_s, chunk_size=8)
        for name, g, w in zip(names, got, want, strict=True):
            scale = max(1.0, float(np.abs(w).max()))
            assert float(np.abs(np.asarray(g) - w).max()) <= 1e-4 * scale, (fn.__name__, name)


def test_ssd_state_update_steps_equal_the_recurrence():
    rng, args, options = ssd_inputs(5, 2, 7, 2, 4, 1, 3)
    want_out, want_s = numpy_ssd_of(args, options)
    state = options["initial_state"]
    for t in range(7):
        out, state = ssd_lib.ssd_state_update(
            state,
            args["x"][:, t],
            args["dt"][:, t],
            args["A"],
            args["B"][:, t],
            args["C"][:, t],
            D=options["D"],
            z=options["z"][:, t],
            dt_bias=options["dt_bias"],
            dt_softplus=True,
        )
        np.testing.assert_allclose(np.asarray(out), want_out[:, t], atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state), want_s, atol=2e-4, rtol=1e-4)


def test_ssd_bad_shapes_are_named():
    _, args, _ = ssd_inputs(0, 1, 8, 4, 2, 2, 3)
    with pytest.raises(ValueError, match=r"A must have shape \(4,\)"):
        ssd_lib.ssd(**{**args, "A": args["A"][:3]})
    with pytest.raises(ValueError, match=r"groups=3 \(B.shape\[2\]\) must divide heads=4"):
        bad = jnp.zeros((1, 8, 3, 3))
        ssd_lib.ssd(**{**args, "B": bad, "C": bad})
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        ssd_lib.ssd(**args, chunk_size=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ssd_kernels_lower_to_triton_for_cuda(dtype):
    spec = jax.ShapeDtypeStruct
    batch, seq, heads, head_dim, groups, state = 2, 300, 8, 64, 2, 128

    def forward_backward(x, dt, A, B, C, s0):
        def run(*a):
            return ssd_lib.ssd(
                *a[:5],
                initial_state=a[5],
                dt_softplus=True,
                return_final_state=True,
                interpret=False,
            )

        out, vjp = jax.vjp(run, x, dt, A, B, C, s0)
        return out, vjp(out)

    args = (
        spec((batch, seq, heads, head_dim), dtype),
        spec((batch, seq, heads), dtype),
        spec((heads,), jnp.float32),
        spec((batch, seq, groups, state), dtype),
        spec((batch, seq, groups, state), dtype),
        spec((batch, heads, head_dim, state), jnp.float32),
    )
    text = jax.jit(forward_backward).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "ssd_chunked_fwd" in text and "ssd_chunked_bwd" in text
    assert text.count("__gpu$xla.gpu.triton") >= 2
