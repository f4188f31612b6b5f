"""The Mamba-1 selective scan as Mosaic (TPU Pallas) kernels, forward and backward: the TPU side
of :func:`kernels_pallas.selective_scan.selective_scan`, which checks the arguments, applies
``delta_bias``/softplus, ``D`` and the ``z`` gate, and calls :func:`scan_core` here on TPU.

Layout: channels on lanes, the state on sublanes. The caller's XLA program makes group-major
copies (free reshapes for one group): u, delta ``[batch, groups, seq, width]``, B and C
``[batch, groups, seq, state]``, A and the states ``[..., state, width]``, with ``width`` the
channels per group padded to a multiple of 128 lanes when above 128 (:func:`group_width`). A
channel block is 128 lanes, or a whole group of at most 128 channels (narrow groups, e.g.
``mamba1_qkv``'s one per ``state`` channels, leave lanes idle), so that every channel of a
block reads the same B and C.

Grid ``(batch, channel blocks, chunks)``: batch and channel blocks are parallel (megacore chips
split them), the chunk axis is sequential ("arbitrary") and carries the state ``h [state,
block]`` (the backward: its gradient) in VMEM scratch from one chunk to the next.

Inside a chunk the recurrence runs one step at a time, as a ``fori_loop`` over tiles of 8 steps
with the 8 steps unrolled. The per-channel decay ``exp(delta_t A[d, n])`` differs for every
(channel, state) pair, so the SSD's matmul form (one decay per head) does not apply, and a
log-space form (``h_t = exp(c_t) (h_0 + sum_s exp(-c_s) ...)``) overflows over long chunks. One
step is a few ``[state, block]`` elementwise ops, an exp and a sublane sum. Each tile of 8 rows
is read and written whole (aligned, one load or store per tile): B and C rows ``[8, state]`` are
turned into columns ``[state, 8]`` by a matmul with the identity (exact at float32 precision),
whose static lane slices broadcast across the channels; the outputs' rows are assembled with
selects. The backward recomputes the chunk's states from the saved chunk start into a VMEM
scratch ``[chunk + 1, state, block]``, then walks the steps in reverse, emitting du and ddelta
rows, per-block partial dB and dC (summed over blocks by XLA) and accumulating dA in its output
block, resident across the chunk axis.
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

# The chunk's bounds: whole tiles of 8 sublanes; beyond 256 the backward's state scratch
# ([chunk + 1, state, 128] float32) grows past 2 MiB at state 16 for no gain.
TILE, MAX_CHUNK, DEFAULT_CHUNK, LANES = 8, 256, 128, 128
F32 = jnp.float32


def chunk_tile(chunk_size: int | None) -> int:
    """The kernels' chunk for a requested ``chunk_size``: a power of two in [8, 256] (default
    128). The result does not depend on it, only the tiling does."""
    return min(next_power_of_2(chunk_size or DEFAULT_CHUNK, minimum=TILE), MAX_CHUNK)


def group_width(per_group: int) -> int:
    """A group's channels in the kernels' layout: padded to a multiple of 128 lanes above 128
    (whole blocks, of bounded VMEM), as they are up to 128."""
    return per_group if per_group <= LANES else round_up(per_group, LANES)


def channel_block(width: int) -> int:
    """Channels per program for a group of ``width`` (:func:`group_width`) channels."""
    return min(width, LANES)


def _dot(a, b):
    """``a @ b.T`` in float32 at float32 precision."""
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=F32
    )


def _eye(n):
    rows, cols = (lax.broadcasted_iota(jnp.int32, (n, n), axis) for axis in (0, 1))
    return (rows == cols).astype(F32)


def _columns(rows):
    """``[8, w] -> [w, 8]``: the identity times the rows' transpose."""
    return _dot(_eye(rows.shape[1]), rows)


def _rows(columns):
    """``[w, 8] -> [8, w]``."""
    return _dot(_eye(columns.shape[1]), columns)


def _place(acc, value, i, axis):
    """``acc`` with its row (``axis=0``) or column (``axis=1``) ``i`` set to ``value``."""
    return jnp.where(lax.broadcasted_iota(jnp.int32, acc.shape, axis) == i, value, acc)


def _tile(s):
    """The rows of tile ``s`` of 8 steps."""
    return pl.ds(pl.multiple_of(s * TILE, TILE), TILE)


def _step(h, A, d, u, b):
    """One step of the recurrence: ``h [state, block]``, ``A [state, block]``, ``d, u [1,
    block]``, ``b [state, 1]``; returns the new state."""
    return jnp.exp(d * A) * h + (d * u) * b


def _forward_kernel(
    u_ref, delta_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, starts_ref, hL_ref, h_ref, *, chunks
):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        h_ref[...] = h0_ref[...]

    starts_ref[...] = h_ref[...]
    A = A_ref[...]

    def tile(s, h):
        rows = _tile(s)
        u, d = u_ref[rows, :], delta_ref[rows, :]
        b, c = _columns(B_ref[rows, :]), _columns(C_ref[rows, :])
        y = jnp.zeros(u.shape, F32)
        for i in range(TILE):
            h = _step(h, A, d[i : i + 1], u[i : i + 1], b[:, i : i + 1])
            y = _place(y, jnp.sum(h * c[:, i : i + 1], axis=0, keepdims=True), i, 0)
        y_ref[rows, :] = y
        return h

    h = lax.fori_loop(0, u_ref.shape[0] // TILE, tile, h_ref[...])
    h_ref[...] = h

    @pl.when(k == chunks - 1)
    def _():
        hL_ref[...] = h


def _backward_kernel(
    u_ref,
    delta_ref,
    A_ref,
    B_ref,
    C_ref,
    starts_ref,
    dy_ref,
    dhL_ref,
    du_ref,
    ddelta_ref,
    dA_ref,
    dB_ref,
    dC_ref,
    dh0_ref,
    dh_ref,
    hs_ref,
    *,
    chunks,
):
    """The chunks in reverse (grid step r is chunk ``chunks - 1 - r``), carrying ``dh``, the
    gradient of the state after the chunk; per step, in reverse (``a = exp(delta A)``)::

        dC_t = sum_d dy_t h_t;      dh += C_t dy_t;     da = dh h_{t-1} a
        dA += da delta_t;           g = sum_n dh B_t
        ddelta_t = sum_n da A + g u_t;  du_t = g delta_t;  dB_t = sum_d dh delta_t u_t
        dh *= a
    """
    r = pl.program_id(2)
    tiles = u_ref.shape[0] // TILE

    @pl.when(r == 0)
    def _():
        dh_ref[...] = dhL_ref[...]
        dA_ref[...] = jnp.zeros(dA_ref.shape, F32)

    A = A_ref[...]
    hs_ref[0] = starts_ref[...]

    def recompute(s, h):  # hs[t] is the state before step t of the chunk, hs[chunk] after it
        rows = _tile(s)
        u, d, b = u_ref[rows, :], delta_ref[rows, :], _columns(B_ref[rows, :])
        for i in range(TILE):
            h = _step(h, A, d[i : i + 1], u[i : i + 1], b[:, i : i + 1])
            hs_ref[s * TILE + i + 1] = h
        return h

    lax.fori_loop(0, tiles, recompute, hs_ref[0])

    def tile(s_rev, carry):
        dh, dA = carry
        s = tiles - 1 - s_rev
        rows = _tile(s)
        u, d, dy = u_ref[rows, :], delta_ref[rows, :], dy_ref[rows, :]
        b, c = _columns(B_ref[rows, :]), _columns(C_ref[rows, :])
        du = ddelta = jnp.zeros(u.shape, F32)
        dB = dC = jnp.zeros(b.shape, F32)
        for i in reversed(range(TILE)):
            t = s * TILE + i
            d_i, u_i, dy_i = d[i : i + 1], u[i : i + 1], dy[i : i + 1]
            a = jnp.exp(d_i * A)
            dC = _place(dC, jnp.sum(dy_i * hs_ref[t + 1], axis=1, keepdims=True), i, 1)
            dh = dh + c[:, i : i + 1] * dy_i
            da = dh * hs_ref[t] * a
            dA = dA + da * d_i
            g = jnp.sum(dh * b[:, i : i + 1], axis=0, keepdims=True)
            ddelta = _place(ddelta, jnp.sum(da * A, axis=0, keepdims=True) + g * u_i, i, 0)
            du = _place(du, g * d_i, i, 0)
            dB = _place(dB, jnp.sum(dh * (d_i * u_i), axis=1, keepdims=True), i, 1)
            dh = dh * a
        du_ref[rows, :] = du
        ddelta_ref[rows, :] = ddelta
        dB_ref[rows, :] = _rows(dB)
        dC_ref[rows, :] = _rows(dC)
        return dh, dA

    dh, dA = lax.fori_loop(0, tiles, tile, (dh_ref[...], jnp.zeros(A.shape, F32)))
    dh_ref[...] = dh
    dA_ref[...] += dA

    @pl.when(r == chunks - 1)
    def _():
        dh0_ref[...] = dh


@dataclasses.dataclass(frozen=True)
class _Static:
    chunk: int
    block: int
    interpret: bool


def _specs(static, shape, state, *, reverse=False):
    """Block specs over the (batch, channel block, chunk) grid for group-major arrays of
    ``shape = (batch, groups, seq, width)``: channel rows, B/C rows (shared by a group) and
    per-block B/C gradients, A, the states and the per-chunk starts; ``reverse``: grid step k is
    chunk ``chunks - 1 - k``."""
    q, w = static.chunk, static.block
    chunks = shape[2] // q
    blocks = shape[3] // w  # per group

    def chunk(k):
        return chunks - 1 - k if reverse else k

    # lax.div/rem: j >= 0, and floor division lowers through sign(), which Mosaic lowers only
    # on a TPU host.
    def group(j):
        return lax.div(j, blocks)

    def block(j):
        return lax.rem(j, blocks)

    return dict(
        rows=pl.BlockSpec((None, None, q, w), lambda b, j, k: (b, group(j), chunk(k), block(j))),
        bc=pl.BlockSpec((None, None, q, state), lambda b, j, k: (b, group(j), chunk(k), 0)),
        per_block=pl.BlockSpec((None, None, q, state), lambda b, j, k: (b, j, chunk(k), 0)),
        A=pl.BlockSpec((None, state, w), lambda b, j, k: (group(j), 0, block(j))),
        h=pl.BlockSpec((None, None, state, w), lambda b, j, k: (b, group(j), 0, block(j))),
        starts=pl.BlockSpec(
            (None, None, None, state, w), lambda b, j, k: (b, group(j), chunk(k), 0, block(j))
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


def _grid(static, u):
    batch, groups, seq, width = u.shape
    return (batch, groups * (width // static.block), seq // static.chunk)


def _forward(static, u, delta, A, B, C, h0):
    batch, groups, seq, width = u.shape
    state = B.shape[3]
    grid = _grid(static, u)
    sp = _specs(static, u.shape, state)
    return _call(
        functools.partial(_forward_kernel, chunks=grid[2]),
        static,
        grid,
        "selective_scan_fwd_tpu",
        in_specs=[sp["rows"], sp["rows"], sp["A"], sp["bc"], sp["bc"], sp["h"]],
        out_specs=[sp["rows"], sp["starts"], sp["h"]],
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, F32),
            jax.ShapeDtypeStruct((batch, groups, grid[2], state, width), F32),
            jax.ShapeDtypeStruct(h0.shape, F32),
        ],
        scratch_shapes=[pltpu.VMEM((state, static.block), F32)],
    )(u, delta, A, B, C, h0)


def _backward(static, u, delta, A, B, C, starts, dy, dhL):
    batch, groups, seq, width = u.shape
    state = B.shape[3]
    grid = _grid(static, u)
    sp = _specs(static, u.shape, state, reverse=True)
    du, ddelta, dA, dB, dC, dh0 = _call(
        functools.partial(_backward_kernel, chunks=grid[2]),
        static,
        grid,
        "selective_scan_bwd_tpu",
        in_specs=[
            sp["rows"],
            sp["rows"],
            sp["A"],
            sp["bc"],
            sp["bc"],
            sp["starts"],
            sp["rows"],
            sp["h"],
        ],
        out_specs=[sp["rows"], sp["rows"], sp["h"], sp["per_block"], sp["per_block"], sp["h"]],
        out_shape=[
            jax.ShapeDtypeStruct(u.shape, F32),
            jax.ShapeDtypeStruct(u.shape, F32),
            jax.ShapeDtypeStruct(dhL.shape, F32),
            jax.ShapeDtypeStruct((batch, grid[1], seq, state), F32),
            jax.ShapeDtypeStruct((batch, grid[1], seq, state), F32),
            jax.ShapeDtypeStruct(dhL.shape, F32),
        ],
        scratch_shapes=[
            pltpu.VMEM((state, static.block), F32),
            pltpu.VMEM((static.chunk + 1, state, static.block), F32),
        ],
    )(u, delta, A, B, C, starts, dy, dhL)

    # The channel blocks of a group share its B and C: their partial gradients add up.
    def fold(v):
        return v.reshape(batch, groups, grid[1] // groups, seq, state).sum(axis=2)

    return du, ddelta, dA.sum(axis=0), fold(dB), fold(dC), dh0


_core = chunked_scan_core(_forward, _backward)


def scan_core(u, delta, A, B, C, h0, *, chunk_size, interpret):
    """``(y, final state)`` of the bare recurrence (no D, no gate) in float32.

    ``u, delta [batch, seq, dim]`` (delta after bias and softplus), ``A [dim, state]``, ``B, C
    [batch, seq, groups, state]``, ``h0 [batch, dim, state]``; ``chunk_size``: see
    :func:`chunk_tile`; ``interpret``: run in Pallas' TPU interpret mode. Pads the sequence to
    whole chunks (delta = 0 there: no decay, no input), the state to a multiple of 8 (A = 0
    and B = C = 0 there: those slots stay 0) and the channels of a group to
    :func:`group_width`, in the group-major layout the kernels read.
    """
    batch, seq, dim = u.shape
    groups, state = B.shape[2], B.shape[3]
    per_group = dim // groups
    q = chunk_tile(chunk_size)
    t_pad, n_pad = round_up(seq, q) - seq, round_up(state, TILE) - state
    width = group_width(per_group)
    w_pad = width - per_group
    static = _Static(chunk=q, block=channel_block(width), interpret=interpret)

    def group_major(v, last_pad):  # [batch, seq, groups, w] -> [batch, groups, seq_pad, w + pad]
        return pad_trailing(v.astype(F32), (0, t_pad, 0, last_pad)).transpose(0, 2, 1, 3)

    def channels(v):  # padded channels: u = delta = 0, A = 0, h0 = 0; their outputs are dropped
        return group_major(v.reshape(batch, seq, groups, per_group), w_pad)

    def state_major(v):  # [..., dim, state] -> [..., groups, state_pad, width]
        v = v.reshape(*v.shape[:-2], groups, per_group, state).astype(F32)
        return jnp.swapaxes(pad_trailing(v, (0,) * (v.ndim - 2) + (w_pad, n_pad)), -1, -2)

    y, hL = _core(
        static,
        channels(u),
        channels(delta),
        state_major(A),
        group_major(B, n_pad),
        group_major(C, n_pad),
        state_major(h0),
    )
    y = y[:, :, :seq, :per_group].transpose(0, 2, 1, 3).reshape(batch, seq, dim)
    hL = jnp.swapaxes(hL, -1, -2)[:, :, :per_group, :state]
    return y, hL.reshape(batch, dim, state)
