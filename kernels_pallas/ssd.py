"""Mamba-2 state-space duality (SSD, Dao & Gu 2024): references, chunked algorithm, kernel path.

Math per batch row and head ``h`` (the function of mamba_ssm's ``mamba_chunk_scan_combined``)::

    dt_t = softplus(dt_t + dt_bias)                    (bias and softplus optional)
    S_t  = exp(dt_t[h] A[h]) S_{t-1} + dt_t[h] x_t[h] (outer) B_t[g(h)]     S: [head_dim, state]
    y_t[h] = S_t C_t[g(h)] + D[h] x_t[h]
    out_t  = y_t * silu(z_t)                           (z optional)

with ``g(h) = h // (heads // groups)`` and ``S_0 = initial_state`` (zeros by default).
Layout: x, z ``[batch, seq, heads, head_dim]``; dt ``[batch, seq, heads]``; A, D, dt_bias
``[heads]``; B, C ``[batch, seq, groups, state]``; states ``[batch, heads, head_dim, state]``.

Three implementations of the same function:
* :func:`ssd_reference`: the recurrence one step at a time (``lax.scan``);
* :func:`ssd_chunked`: the chunked SSD algorithm in jnp (quadratic attention-like form inside each
  chunk of ``chunk_size`` steps, state passing between chunks); the matmul-heavy XLA path;
* :func:`ssd`: the chunked algorithm as Pallas (Triton) kernels, forward and backward, one
  program per (head, batch row) carrying the state ``[head_dim, state]`` in registers across
  chunks; every per-chunk product is a matmul (tensor cores on GPU); the forward saves one state
  per chunk and the backward walks the chunks in reverse from them. On TPU the same algorithm
  as Mosaic kernels (:mod:`kernels_pallas.ssd_tpu`), the state carried in VMEM across a
  sequential chunk grid axis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import ssd_tpu
from kernels_pallas._common import (
    check_positive_int,
    check_shapes,
    chunked_scan_core,
    finish_output,
    next_power_of_2,
    pad_trailing,
    platform,
    prepare_delta,
    resolve_interpret,
    round_up,
)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """``num_warps`` per program (None: 4, or 8 when the padded state tile ``head_dim x state``
    reaches 4096 elements, for register pressure). The kernels' chunk tile comes from
    ``chunk_size`` (a power of two in [16, 64]): it changes the tiling, not the function."""

    num_warps: int | None = None

    def __post_init__(self):
        if self.num_warps is not None and (
            self.num_warps < 1 or self.num_warps & (self.num_warps - 1)
        ):
            raise ValueError(f"BlockSizes.num_warps must be a power of two, got {self.num_warps}")

    @classmethod
    def get_default(cls, *, head_dim: int, state: int) -> BlockSizes:
        """The defaults for a state tile of ``head_dim x state`` (before padding)."""
        tile = _tile(head_dim) * _tile(state)
        return cls(num_warps=8 if tile >= 4096 else 4)


def _tile(n):
    """A head_dim or state padded for the kernels: the smallest power of two >= n, at least 16."""
    return next_power_of_2(n, minimum=16)


def _heads(v, heads):
    """[batch, seq, groups, state] -> [batch, seq, heads, state]."""
    return jnp.repeat(v, heads // v.shape[2], axis=2)


def check_ssd_arguments(name, x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size=None):
    """Raises ValueError naming the argument whose shape does not fit."""
    if x.ndim != 4:
        raise ValueError(f"{name}: x must be [batch, seq, heads, head_dim], got shape {x.shape}")
    batch, seq, heads, head_dim = x.shape
    if B.ndim != 4 or B.shape[:2] != (batch, seq):
        raise ValueError(
            f"{name}: B must be [batch={batch}, seq={seq}, groups, state], got shape {B.shape}"
        )
    groups, state = B.shape[2], B.shape[3]
    if heads % groups:
        raise ValueError(f"{name}: groups={groups} (B.shape[2]) must divide heads={heads}")
    check_shapes(
        name,
        {
            "dt": (dt, (batch, seq, heads)),
            "A": (A, (heads,)),
            "C": (C, B.shape),
            "D": (D, (heads,)),
            "z": (z, x.shape),
            "dt_bias": (dt_bias, (heads,)),
            "initial_state": (initial_state, (batch, heads, head_dim, state)),
        },
    )
    if chunk_size is not None:
        check_positive_int(name, "chunk_size", chunk_size)


def ssd_reference(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
):
    """The recurrence step by step, in float32 or wider."""
    dtype, dt = prepare_delta(x, dt, dt_bias, dt_softplus)
    batch, _, heads, head_dim = x.shape
    state = B.shape[3]
    Bh, Ch = _heads(B.astype(dtype), heads), _heads(C.astype(dtype), heads)
    s0 = (
        jnp.zeros((batch, heads, head_dim, state), dtype)
        if initial_state is None
        else initial_state.astype(dtype)
    )
    A = A.astype(dtype)

    def step(s, inputs):
        x_t, dt_t, b_t, c_t = inputs
        decay = jnp.exp(dt_t * A)[:, :, None, None]
        s = decay * s + (dt_t[:, :, None] * x_t)[..., None] * b_t[:, :, None, :]
        return s, jnp.einsum("bhpn,bhn->bhp", s, c_t)

    xs = jax.tree.map(lambda v: jnp.moveaxis(v, 1, 0), (x.astype(dtype), dt, Bh, Ch))
    s, y = lax.scan(step, s0, xs)
    out = finish_output(jnp.moveaxis(y, 0, 1), x, D, z, dtype)
    return (out, s) if return_final_state else out


def ssd_state_update(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decoding step: state ``[batch, heads, head_dim, state]``, x/z ``[batch, heads,
    head_dim]``, dt ``[batch, heads]``, B/C ``[batch, groups, state]`` -> (out, new state)."""
    out, new_state = ssd_reference(
        x[:, None],
        dt[:, None],
        A,
        B[:, None],
        C[:, None],
        D=D,
        z=None if z is None else z[:, None],
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_state=state,
        return_final_state=True,
    )
    return out[:, 0], new_state.astype(state.dtype)


def _segsum(a):
    """a: [..., T] -> [..., T, T] with [i, j] = a[j+1] + ... + a[i] for i >= j, else -inf."""
    t = a.shape[-1]
    below = jnp.tril(jnp.ones((t, t), bool), -1)
    terms = jnp.where(below, a[..., :, None], 0.0)  # [..., k, j] = a[k] if k > j
    sums = jnp.cumsum(terms, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((t, t), bool)), sums, -jnp.inf)


def ssd_chunked(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
):
    """The chunked SSD algorithm (Dao & Gu 2024, listing 1) in jnp, any sequence length."""
    dtype, dt = prepare_delta(x, dt, dt_bias, dt_softplus)
    batch, seq, heads, head_dim = x.shape
    state = B.shape[3]
    q = chunk_size
    pad = round_up(seq, q) - seq
    chunks = (seq + pad) // q

    # Padded steps have dt = 0: no decay, no input, so the final state is unchanged.
    def padded(v):
        return jnp.pad(v, ((0, 0), (0, pad)) + ((0, 0),) * (v.ndim - 2))

    def split_chunks(v):
        return v.reshape(batch, chunks, q, *v.shape[2:])

    xdt = split_chunks(padded(x.astype(dtype) * dt[..., None]))  # [b, c, q, h, p]
    a = split_chunks(padded(dt * A.astype(dtype))).transpose(0, 3, 1, 2)  # [b, h, c, q]
    Bh = split_chunks(padded(_heads(B.astype(dtype), heads)))  # [b, c, q, h, n]
    Ch = split_chunks(padded(_heads(C.astype(dtype), heads)))
    a_cum = jnp.cumsum(a, axis=-1)

    # 1. Within chunks: masked, decayed C B^T applied to x dt (the "attention" form).
    decay_in = jnp.exp(_segsum(a))  # [b, h, c, q, q]
    # Pairwise contractions: left to opt_einsum, the 4-operand form picks a path with a large
    # intermediate at some sizes.
    scores = jnp.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay_in
    y_diag = jnp.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # 2. Each chunk's own end state, from zero.
    decay_to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # [b, h, c, q]
    weighted = xdt * decay_to_end.transpose(0, 2, 3, 1)[..., None]  # [b, c, q, h, p]
    chunk_states = jnp.einsum("bclhn,bclhp->bchpn", Bh, weighted)
    # 3. Pass states between chunks: S_c = exp(sum of chunk c's a) S_{c-1} + chunk state.
    s0 = (
        jnp.zeros((batch, heads, head_dim, state), dtype)
        if initial_state is None
        else initial_state.astype(dtype)
    )
    chunk_states = jnp.concatenate([s0[:, None], chunk_states], axis=1)  # [b, c+1, h, p, n]
    decay_chunks = jnp.exp(_segsum(jnp.pad(a_cum[..., -1], ((0, 0), (0, 0), (1, 0)))))
    states = jnp.einsum("bhzc,bchpn->bzhpn", decay_chunks, chunk_states)
    starts, final = states[:, :-1], states[:, -1]
    # 4. Each step's output from its chunk's start state.
    y_off = (
        jnp.einsum("bclhn,bchpn->bclhp", Ch, starts)
        * jnp.exp(a_cum).transpose(0, 2, 3, 1)[..., None]
    )
    y = (y_diag + y_off).reshape(batch, chunks * q, heads, head_dim)[:, :seq]
    out = finish_output(y, x, D, z, dtype)
    return (out, final) if return_final_state else out


# ------------------------------------------------------------------------ chunked SSD kernels
#
# One program per (head, batch row) walks the chunks of ``q`` steps with the state S [P, N] in
# registers. Per chunk (a = dt A, c = cumsum(a), xd = x dt, L[i, j] = exp(c_i - c_j) for i >= j):
#   y     = ((C B^T) * L) xd + exp(c)[:, None] * (C S^T)          (tensor-core matmuls)
#   S_new = exp(c_q) S + xd^T (B * exp(c_q - c)[:, None])
# The forward saves S at every chunk start; the backward walks the chunks in reverse, carrying
# dS, and differentiates the same expressions (derivation in the comments below).


def _ssd_chunk_terms(x, dt, B, C, A):
    """Per-chunk quantities shared by forward and backward (all float32)."""
    q = x.shape[0]
    a = dt * A
    c = jnp.cumsum(a)  # [q]
    c_last = jnp.sum(a)  # = c[q - 1]; Triton cannot slice values
    rows = lax.broadcasted_iota(jnp.int32, (q, q), 0)
    cols = lax.broadcasted_iota(jnp.int32, (q, q), 1)
    causal = rows >= cols
    L = jnp.exp(jnp.where(causal, c[:, None] - c[None, :], -jnp.inf))
    G = jnp.dot(C, B.T, preferred_element_type=jnp.float32)  # [q, q]
    xd = x * dt[:, None]
    e = jnp.exp(c)  # decay from the chunk start to each step
    w = jnp.exp(c_last - c)  # decay from each step to the chunk end  [q]
    return c, c_last, L, G, xd, e, w


def _ssd_forward_kernel(
    x_ref, dt_ref, A_ref, B_ref, C_ref, s0_ref, y_ref, starts_ref, sL_ref, *, q, num_chunks
):
    A = A_ref[0]

    def run_chunk(k, S):
        starts_ref[k, :, :] = S
        rows = pl.ds(k * q, q)
        x, dt, B, C = x_ref[rows, :], dt_ref[rows], B_ref[rows, :], C_ref[rows, :]
        c, c_last, L, G, xd, e, w = _ssd_chunk_terms(x, dt, B, C, A)
        y = jnp.dot(G * L, xd, preferred_element_type=jnp.float32)
        y += e[:, None] * jnp.dot(C, S.T, preferred_element_type=jnp.float32)
        y_ref[rows, :] = y
        return jnp.exp(c_last) * S + jnp.dot(
            xd.T, B * w[:, None], preferred_element_type=jnp.float32
        )

    sL_ref[...] = lax.fori_loop(0, num_chunks, run_chunk, s0_ref[...])


def _ssd_backward_kernel(
    x_ref,
    dt_ref,
    A_ref,
    B_ref,
    C_ref,
    starts_ref,
    dy_ref,
    dsL_ref,
    dx_ref,
    ddt_ref,
    dA_ref,
    dB_ref,
    dC_ref,
    ds0_ref,
    *,
    q,
    num_chunks,
):
    A = A_ref[0]

    def run_chunk(r, carry):
        dS, dA = carry  # dS: gradient of the state after this chunk
        k = num_chunks - 1 - r
        rows = pl.ds(k * q, q)
        S = starts_ref[k, :, :]
        x, dt, B, C, dy = (
            x_ref[rows, :],
            dt_ref[rows],
            B_ref[rows, :],
            C_ref[rows, :],
            dy_ref[rows, :],
        )
        c, c_last, L, G, xd, e, w = _ssd_chunk_terms(x, dt, B, C, A)
        dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
        Bw = B * w[:, None]
        # y = M xd + e * (C S^T), M = G * L;  S_new = exp(c_q) S + xd^T Bw.
        M = G * L
        dxd = dot(M.T, dy) + dot(Bw, dS.T)
        dM = dot(dy, xd.T)
        dG, dL = dM * L, dM * G
        CS = dot(C, S.T)  # [q, P]
        dC = dot(dG, B) + e[:, None] * dot(dy, S)
        dBw = dot(xd, dS)  # [q, N]
        dB = dot(dG.T, C) + dBw * w[:, None]
        dS_prev = jnp.exp(c_last) * dS + dot((dy * e[:, None]).T, C)
        # Gradients of the cumulative decays c through L, e, exp(c_q) and w.
        dLL = dL * L
        dc = jnp.sum(dLL, axis=1) - jnp.sum(dLL, axis=0)
        dc += jnp.sum(dy * CS, axis=1) * e
        dw = jnp.sum(dBw * B, axis=1) * w
        dc -= dw
        last = (lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1).astype(jnp.float32)
        dc += last * (jnp.exp(c_last) * jnp.sum(dS * S) + jnp.sum(dw))
        # c = cumsum(a): da_i = sum_{j >= i} dc_j (a reverse cumsum from a forward one).
        da = jnp.sum(dc) - jnp.cumsum(dc) + dc
        dx_ref[rows, :] = dxd * dt[:, None]
        ddt_ref[rows] = da * A + jnp.sum(dxd * x, axis=1)
        dB_ref[rows, :] = dB
        dC_ref[rows, :] = dC
        return dS_prev, dA + jnp.sum(da * dt)

    dS, dA = lax.fori_loop(0, num_chunks, run_chunk, (dsL_ref[...], jnp.float32(0.0)))
    ds0_ref[...] = dS
    dA_ref[...] = jnp.full(dA_ref.shape, dA, jnp.float32)


@dataclasses.dataclass(frozen=True)
class _SSDStatic:
    chunk: int
    num_warps: int
    interpret: bool


def _ssd_specs(seq, heads, groups, head_dim, state):
    per_group = heads // groups
    x = pl.BlockSpec((None, seq, None, head_dim), lambda h, b: (b, 0, h, 0))
    dt = pl.BlockSpec((None, seq, None), lambda h, b: (b, 0, h))
    bc = pl.BlockSpec((None, seq, None, state), lambda h, b: (b, 0, h // per_group, 0))
    a = pl.BlockSpec((1,), lambda h, b: (h,))
    s = pl.BlockSpec((None, None, head_dim, state), lambda h, b: (b, h, 0, 0))
    return x, dt, bc, a, s


def _ssd_forward(static, x, dt, A, B, C, s0):
    batch, seq, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    num_chunks = seq // static.chunk
    xs, dts, bc, a, s = _ssd_specs(seq, heads, groups, head_dim, state)
    starts = pl.BlockSpec((None, None, num_chunks, head_dim, state), lambda h, b: (b, h, 0, 0, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_ssd_forward_kernel, q=static.chunk, num_chunks=num_chunks),
        grid=(heads, batch),
        in_specs=[xs, dts, a, bc, bc, s],
        out_specs=[xs, starts, s],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, head_dim, state), f32),
            jax.ShapeDtypeStruct(s0.shape, f32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=static.num_warps, num_stages=1),
        interpret=static.interpret,
        name="ssd_chunked_fwd",
    )(x, dt, A, B, C, s0)


def _ssd_backward(static, x, dt, A, B, C, starts, dy, dsL):
    batch, seq, heads, head_dim = x.shape
    groups, state = B.shape[2], B.shape[3]
    num_chunks = seq // static.chunk
    xs, dts, bc, a, s = _ssd_specs(seq, heads, groups, head_dim, state)
    starts_spec = pl.BlockSpec(
        (None, None, num_chunks, head_dim, state), lambda h, b: (b, h, 0, 0, 0)
    )
    per_head = pl.BlockSpec((None, seq, None, state), lambda h, b: (b, 0, h, 0))
    dA_spec = pl.BlockSpec((None, None, 16), lambda h, b: (b, h, 0))
    f32 = jnp.float32
    dx, ddt, dA, dB, dC, ds0 = pl.pallas_call(
        functools.partial(_ssd_backward_kernel, q=static.chunk, num_chunks=num_chunks),
        grid=(heads, batch),
        in_specs=[xs, dts, a, bc, bc, starts_spec, xs, s],
        out_specs=[xs, dts, dA_spec, per_head, per_head, s],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, f32),
            jax.ShapeDtypeStruct(dt.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, 16), f32),
            jax.ShapeDtypeStruct((batch, seq, heads, state), f32),
            jax.ShapeDtypeStruct((batch, seq, heads, state), f32),
            jax.ShapeDtypeStruct(dsL.shape, f32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=static.num_warps, num_stages=1),
        interpret=static.interpret,
        name="ssd_chunked_bwd",
    )(x, dt, A, B, C, starts, dy, dsL)

    # Heads of a group share B and C: their gradients add up.
    def fold(v):
        return v.reshape(batch, seq, groups, heads // groups, state).sum(axis=3)

    return dx, ddt, dA[..., 0].sum(axis=0), fold(dB), fold(dC), ds0


_ssd_core = chunked_scan_core(_ssd_forward, _ssd_backward)


@functools.partial(
    jax.jit,
    static_argnames=(
        "chunk_size",
        "dt_softplus",
        "return_final_state",
        "block_sizes",
        "interpret",
    ),
)
def ssd(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=None,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_state=None,
    return_final_state=False,
    block_sizes=None,
    interpret=None,
):
    """SSD with the chunked Pallas kernels; same arguments as :func:`ssd_chunked`.

    The kernels are those of the :func:`~kernels_pallas._common.platform` traced for: Triton on
    GPU (and in interpret mode on CPU), Mosaic (:mod:`kernels_pallas.ssd_tpu`) on TPU; under
    ``target_platform('tpu')`` with interpret mode asked for, the Mosaic kernels run in Pallas'
    TPU interpret mode on the CPU. ``interpret=None`` runs the kernels in interpret mode on CPU.

    Triton: ``chunk_size`` (default 64) is rounded up to a power of two in [16, 64] for the
    kernels' tiles; head_dim and state are zero-padded to powers of two >= 16; float32 matmuls
    use Triton's default TF32 tensor-core precision (about 1e-3 relative). Mosaic:
    ``chunk_size`` (default 128) becomes a power of two in [8, 256]
    (:func:`kernels_pallas.ssd_tpu.chunk_tile`), head_dim and state are padded to multiples of
    8, and matmuls run at float32 precision. Interpret mode computes in full float32.
    ``block_sizes``: :class:`BlockSizes` (default :meth:`BlockSizes.get_default`), the Triton
    kernels' only (the Mosaic kernels' one tile is the chunk). Jitted: ``chunk_size``,
    ``dt_softplus``, ``return_final_state``, ``block_sizes`` and ``interpret`` are static.
    """
    check_ssd_arguments("ssd", x, dt, A, B, C, D, z, dt_bias, initial_state, chunk_size)
    dtype, dt = prepare_delta(x, dt, dt_bias, dt_softplus)
    batch, _, heads, head_dim = x.shape
    state = B.shape[3]
    interpret = resolve_interpret(interpret)
    s0 = (
        jnp.zeros((batch, heads, head_dim, state), jnp.float32)
        if initial_state is None
        else initial_state
    )
    if platform() == "tpu":
        core = ssd_tpu.ssd_core
    else:
        core = functools.partial(_triton_core, block_sizes=block_sizes)
    y, final = core(x, dt, A, B, C, s0, chunk_size=chunk_size, interpret=interpret)
    out = finish_output(y.astype(dtype), x, D, z, dtype)
    return (out, final) if return_final_state else out


def _triton_core(x, dt, A, B, C, s0, *, chunk_size, block_sizes, interpret):
    """``(y, final state)`` of the bare recurrence from the Triton kernels, in float32; the
    arguments as :func:`kernels_pallas.ssd_tpu.ssd_core`'s."""
    _, seq, _, head_dim = x.shape
    state = B.shape[3]
    if block_sizes is None or block_sizes.num_warps is None:
        block_sizes = BlockSizes.get_default(head_dim=head_dim, state=state)
    # The kernels' chunk is at most 64 whatever the model's: [q, q] float32 tiles beyond that do
    # not fit a GPU's registers/shared memory, and the result does not depend on it.
    q = min(next_power_of_2(chunk_size or 64, minimum=16), 64)
    p_pad, n_pad, t_pad = _tile(head_dim) - head_dim, _tile(state) - state, round_up(seq, q) - seq
    f32 = jnp.float32
    # Padded steps have dt = 0 (no decay, no input); padded head_dim/state slots stay 0.
    static = _SSDStatic(chunk=q, num_warps=block_sizes.num_warps, interpret=interpret)
    y, final = _ssd_core(
        static,
        pad_trailing(x.astype(f32), (0, t_pad, 0, p_pad)),
        pad_trailing(dt.astype(f32), (0, t_pad)),
        A.astype(f32),
        pad_trailing(B.astype(f32), (0, t_pad, 0, n_pad)),
        pad_trailing(C.astype(f32), (0, t_pad, 0, n_pad)),
        pad_trailing(s0.astype(f32), (0, 0, p_pad, n_pad)),
    )
    return y[:, :seq, :, :head_dim], final[:, :, :head_dim, :state]


__all__ = [
    "BlockSizes",
    "check_ssd_arguments",
    "finish_output",
    "prepare_delta",
    "ssd",
    "ssd_chunked",
    "ssd_reference",
    "ssd_state_update",
]
