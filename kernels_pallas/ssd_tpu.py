"""The chunked SSD as Mosaic (TPU Pallas) kernels, forward and backward: the TPU side of
:func:`kernels_pallas.ssd.ssd`, which checks the arguments, applies ``dt_bias``/softplus, ``D``
and the ``z`` gate, and calls :func:`ssd_core` here on TPU.

Grid ``(batch, heads, chunks)``: batch and heads are parallel (megacore chips split them), the
chunk axis is sequential ("arbitrary") and carries the state ``S [head_dim, state]`` (the
backward: its gradient) in VMEM scratch from one chunk to the next. Per chunk of ``q`` steps
(``a = dt A``, ``c = cumsum(a)``, ``xd = x dt``, ``L[i, j] = exp(c_i - c_j)`` for ``i >= j``)::

    y     = ((C B^T) * L) xd + exp(c)[:, None] * (C S^T)
    S_new = exp(c_q) S + xd^T (B * exp(c_q - c)[:, None])

every product an MXU matmul. Layout: head-major copies made by the caller's XLA program (x
``[batch, heads, seq, head_dim]``, B and C ``[batch, groups, seq, state]``), so that a block is a
``[q, head_dim]`` tile with ``q`` a multiple of 8 and the full head_dim; dt is one ``[chunks, q]``
row block per (batch, head), resident across the chunk axis, read a row (a chunk) at a time.
Vectors along the chunk live as rows ``[1, q]`` (lanes); the few that scale rows of a tile are
turned into columns ``[q, 1]`` by a matmul with the identity, and cumulative sums are matmuls
with a triangle of ones: Mosaic has no cumsum, and a matmul does either at float32 precision.
All matmuls run at float32 precision (``Precision.HIGHEST``), bf16 inputs included. The resident
dt block takes ``4 * seq`` bytes of VMEM per buffer (64 KiB at 16k tokens).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import chunked_scan_core, next_power_of_2, pad_trailing, round_up

# The chunk tile's bounds: a multiple of the 8 sublanes; beyond 256 the [q, q] float32 tiles of
# the backward (several live at once) crowd VMEM for no gain on a 128- or 256-wide MXU.
MIN_CHUNK, MAX_CHUNK, DEFAULT_CHUNK = 8, 256, 128
F32 = jnp.float32


def chunk_tile(chunk_size: int | None) -> int:
    """The kernels' chunk for a requested ``chunk_size``: a power of two in [8, 256] (default
    128). The result does not depend on it, only the tiling does."""
    return min(next_power_of_2(chunk_size or DEFAULT_CHUNK, minimum=MIN_CHUNK), MAX_CHUNK)


def _dot(a, b, contract=(1, 0)):
    """``a @ b`` contracting ``a``'s axis ``contract[0]`` with ``b``'s ``contract[1]`` (``(1, 1)``:
    ``a @ b.T``; ``(0, 0)``: ``a.T @ b``), in float32."""
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=F32,
    )


def _iotas(q):
    return lax.broadcasted_iota(jnp.int32, (q, q), 0), lax.broadcasted_iota(jnp.int32, (q, q), 1)


def _column(row):
    """``[1, q] -> [q, 1]``: the identity times the row's transpose."""
    rows, cols = _iotas(row.shape[1])
    return _dot((rows == cols).astype(F32), row, (1, 1))


def _row_sums(x):
    """The sums of ``x [q, w]``'s rows as a row ``[1, q]``."""
    return _dot(jnp.ones((1, x.shape[1]), F32), x, (1, 1))


@dataclasses.dataclass(frozen=True)
class _Chunk:
    """One chunk's decays and its ``C B^T`` (the quantities forward and backward share)."""

    dt_col: jax.Array  # [q, 1]
    c_row: jax.Array  # [1, q] cumulative a
    c_last: jax.Array  # [1, 1] the chunk's total a
    L: jax.Array  # [q, q] exp(c_i - c_j), i >= j, else 0
    G: jax.Array  # [q, q] C B^T
    e_col: jax.Array  # [q, 1] decay from the chunk start to each step
    w_col: jax.Array  # [q, 1] decay from each step to the chunk end

    @classmethod
    def of(cls, dt_row, A, B, C):
        q = dt_row.shape[1]
        rows, cols = _iotas(q)
        a_row = dt_row * A
        c_row = _dot(a_row, (rows <= cols).astype(F32))  # c_j = sum_{k <= j} a_k
        c_col = _column(c_row)
        c_last = jnp.sum(a_row, axis=1, keepdims=True)
        L = jnp.exp(jnp.where(rows >= cols, c_col - c_row, -jnp.inf))
        return cls(
            dt_col=_column(dt_row),
            c_row=c_row,
            c_last=c_last,
            L=L,
            G=_dot(C, B, (1, 1)),
            e_col=jnp.exp(c_col),
            w_col=jnp.exp(c_last - c_col),
        )


def _forward_kernel(
    x_ref, dt_ref, A_ref, B_ref, C_ref, s0_ref, y_ref, starts_ref, final_ref, S_ref, *, chunks
):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        S_ref[...] = s0_ref[...]

    S = S_ref[...]
    starts_ref[...] = S
    B, C = B_ref[...].astype(F32), C_ref[...].astype(F32)
    ch = _Chunk.of(dt_ref[pl.ds(k, 1), :], A_ref[pl.program_id(1)], B, C)
    xd = x_ref[...].astype(F32) * ch.dt_col
    y_ref[...] = _dot(ch.G * ch.L, xd) + ch.e_col * _dot(C, S, (1, 1))
    S = jnp.exp(ch.c_last) * S + _dot(xd, B * ch.w_col, (0, 0))
    S_ref[...] = S

    @pl.when(k == chunks - 1)
    def _():
        final_ref[...] = S


def _backward_kernel(
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
    dS_ref,
    *,
    chunks,
):
    """The chunks in reverse (grid step r is chunk ``chunks - 1 - r``), carrying ``dS``, the
    gradient of the state after the chunk; the derivation is the Triton backward's
    (:mod:`kernels_pallas.ssd`), with the transposed products as ``_dot`` contractions."""
    r = pl.program_id(2)
    k = chunks - 1 - r

    @pl.when(r == 0)
    def _():
        dS_ref[...] = dsL_ref[...]
        dA_ref[...] = jnp.zeros(dA_ref.shape, F32)

    A = A_ref[pl.program_id(1)]
    dS, S = dS_ref[...], starts_ref[...]
    x, B, C, dy = (ref[...].astype(F32) for ref in (x_ref, B_ref, C_ref, dy_ref))
    dt_row = dt_ref[pl.ds(k, 1), :]
    ch = _Chunk.of(dt_row, A, B, C)
    q = dt_row.shape[1]
    xd = x * ch.dt_col
    Bw = B * ch.w_col
    M = ch.G * ch.L
    # y = M xd + e * (C S^T);  S_new = exp(c_q) S + xd^T Bw.
    dxd = _dot(M, dy, (0, 0)) + _dot(Bw, dS, (1, 1))
    dM = _dot(dy, xd, (1, 1))
    dG, dL = dM * ch.L, dM * ch.G
    dBw = _dot(xd, dS)
    dC_ref[...] = _dot(dG, B) + ch.e_col * _dot(dy, S)
    dB_ref[...] = _dot(dG, C, (0, 0)) + dBw * ch.w_col
    dS_ref[...] = jnp.exp(ch.c_last) * dS + _dot(dy * ch.e_col, C, (0, 0))
    # The gradient of the cumulative decays c (a row), through L, e, w and exp(c_q).
    dLL = dL * ch.L
    e_row, w_row = jnp.exp(ch.c_row), jnp.exp(ch.c_last - ch.c_row)
    dw_row = _row_sums(dBw * B) * w_row
    dc = _row_sums(dLL) - jnp.sum(dLL, axis=0, keepdims=True)
    dc += _row_sums(dy * _dot(C, S, (1, 1))) * e_row - dw_row
    last = lax.broadcasted_iota(jnp.int32, (1, q), 1) == q - 1
    dc += jnp.where(
        last,
        jnp.exp(ch.c_last) * jnp.sum(dS * S, keepdims=True) + jnp.sum(dw_row, keepdims=True),
        0.0,
    )
    # c = cumsum(a): da_i = sum_{j >= i} dc_j.
    rows, cols = _iotas(q)
    da = _dot(dc, (rows >= cols).astype(F32))
    dx_ref[...] = dxd * ch.dt_col
    ddt_ref[pl.ds(k, 1), :] = da * A + _row_sums(dxd * x)
    dA_ref[...] += jnp.sum(da * dt_row, axis=1, keepdims=True)

    @pl.when(r == chunks - 1)
    def _():
        ds0_ref[...] = dS_ref[...]


@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    interpret: bool


def _specs(static, shape, groups, state, *, reverse=False):
    """Block specs over the (batch, head, chunk) grid for x-like arrays ``shape``: the tiles of
    x-like arrays, of B/C (shared by a group) and of per-head B/C gradients, the dt rows, A,
    the states and the per-chunk starts; ``reverse``: grid step k is chunk ``chunks - 1 - k``."""
    _, heads, seq, head_dim = shape
    q = static.chunk
    chunks = seq // q
    per_group = heads // groups

    def chunk(k):
        return chunks - 1 - k if reverse else k

    return dict(
        x=pl.BlockSpec((None, None, q, head_dim), lambda b, h, k: (b, h, chunk(k), 0)),
        # lax.div: h >= 0, and floor division lowers through sign(), which Mosaic lowers only
        # on a TPU host.
        bc=pl.BlockSpec(
            (None, None, q, state), lambda b, h, k: (b, lax.div(h, per_group), chunk(k), 0)
        ),
        per_head=pl.BlockSpec((None, None, q, state), lambda b, h, k: (b, h, chunk(k), 0)),
        dt=pl.BlockSpec((None, None, chunks, q), lambda b, h, k: (b, h, 0, 0)),
        A=pl.BlockSpec(memory_space=pltpu.SMEM),
        s=pl.BlockSpec((None, None, head_dim, state), lambda b, h, k: (b, h, 0, 0)),
        starts=pl.BlockSpec(
            (None, None, None, head_dim, state), lambda b, h, k: (b, h, chunk(k), 0, 0)
        ),
    )


def _call(kernel, static, grid, name, **kw):
    return pl.pallas_call(
        kernel,
        grid=grid,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=pltpu.InterpretParams() if static.interpret else False,
        name=name,
        **kw,
    )


def _forward(static, x, dt, A, B, C, s0):
    batch, heads, seq, head_dim = x.shape
    groups, state = B.shape[1], B.shape[3]
    chunks = seq // static.chunk
    sp = _specs(static, x.shape, groups, state)
    return _call(
        functools.partial(_forward_kernel, chunks=chunks),
        static,
        (batch, heads, chunks),
        "ssd_chunked_fwd_tpu",
        in_specs=[sp["x"], sp["dt"], sp["A"], sp["bc"], sp["bc"], sp["s"]],
        out_specs=[sp["x"], sp["starts"], sp["s"]],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, F32),
            jax.ShapeDtypeStruct((batch, heads, chunks, head_dim, state), F32),
            jax.ShapeDtypeStruct(s0.shape, F32),
        ],
        scratch_shapes=[pltpu.VMEM((head_dim, state), F32)],
    )(x, dt, A, B, C, s0)


def _backward(static, x, dt, A, B, C, starts, dy, dsL):
    batch, heads, seq, head_dim = x.shape
    groups, state = B.shape[1], B.shape[3]
    chunks = seq // static.chunk
    sp = _specs(static, x.shape, groups, state, reverse=True)
    dA_spec = pl.BlockSpec((None, None, 1, 1), lambda b, h, k: (b, h, 0, 0))
    dx, ddt, dA, dB, dC, ds0 = _call(
        functools.partial(_backward_kernel, chunks=chunks),
        static,
        (batch, heads, chunks),
        "ssd_chunked_bwd_tpu",
        in_specs=[
            sp["x"],
            sp["dt"],
            sp["A"],
            sp["bc"],
            sp["bc"],
            sp["starts"],
            sp["x"],
            sp["s"],
        ],
        out_specs=[sp["x"], sp["dt"], dA_spec, sp["per_head"], sp["per_head"], sp["s"]],
        out_shape=[
            jax.ShapeDtypeStruct(x.shape, F32),
            jax.ShapeDtypeStruct(dt.shape, F32),
            jax.ShapeDtypeStruct((batch, heads, 1, 1), F32),
            jax.ShapeDtypeStruct((batch, heads, seq, state), F32),
            jax.ShapeDtypeStruct((batch, heads, seq, state), F32),
            jax.ShapeDtypeStruct(dsL.shape, F32),
        ],
        scratch_shapes=[pltpu.VMEM((head_dim, state), F32)],
    )(x, dt, A, B, C, starts, dy, dsL)

    # Heads of a group share B and C: their gradients add up.
    def fold(v):
        return v.reshape(batch, groups, heads // groups, seq, state).sum(axis=2)

    return dx, ddt, dA[:, :, 0, 0].sum(axis=0), fold(dB), fold(dC), ds0


_core = chunked_scan_core(_forward, _backward)


def ssd_core(x, dt, A, B, C, s0, *, chunk_size, interpret):
    """``(y, final state)`` of the bare recurrence (no D, no gate) in float32.

    ``x [batch, seq, heads, head_dim]``, ``dt [batch, seq, heads]`` (after bias and softplus),
    ``A [heads]``, ``B, C [batch, seq, groups, state]``, ``s0 [batch, heads, head_dim, state]``;
    ``chunk_size``: see :func:`chunk_tile`; ``interpret``: run in Pallas' TPU interpret mode.
    Pads the sequence to whole chunks (dt = 0 there: no decay, no input) and head_dim and state
    to multiples of 8, in the head-major layout the kernels read.
    """
    batch, seq, heads, head_dim = x.shape
    state = B.shape[3]
    q = chunk_tile(chunk_size)
    t_pad = round_up(seq, q) - seq
    p_pad, n_pad = round_up(head_dim, 8) - head_dim, round_up(state, 8) - state
    static = _Static(chunk=q, interpret=interpret)

    def head_major(v, last_pad):  # [batch, seq, h, d] -> [batch, h, seq + t_pad, d + last_pad]
        return pad_trailing(v.astype(F32), (0, t_pad, 0, last_pad)).transpose(0, 2, 1, 3)

    dt_rows = pad_trailing(dt.astype(F32), (0, t_pad)).transpose(0, 2, 1)
    y, final = _core(
        static,
        head_major(x, p_pad),
        dt_rows.reshape(batch, heads, (seq + t_pad) // q, q),
        A.astype(F32),
        head_major(B, n_pad),
        head_major(C, n_pad),
        pad_trailing(s0.astype(F32), (0, 0, p_pad, n_pad)),
    )
    return y.transpose(0, 2, 1, 3)[:, :seq, :, :head_dim], final[:, :, :head_dim, :state]
