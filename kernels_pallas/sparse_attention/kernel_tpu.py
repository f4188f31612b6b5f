"""The Pallas (Mosaic TPU) kernels of sparse flash attention and their custom-VJP core.

The same problem as :mod:`.kernel` (causal flash attention on reordered rows, masked on the rows'
original positions and buckets, visiting only the live tiles of :mod:`.tiles`), in the form
Mosaic wants: no loops over data-dependent lists inside a kernel, but a grid whose innermost
("arbitrary") axis walks a tile's live tiles, as jax's splash attention does. Each list becomes a
range (:func:`.tiles.tile_ranges`: its first live tile and the span to its last), and the ranges
are scalar-prefetched into SMEM, where whole lists would not fit at long sequences; the index
maps read them, so the step ``t`` of query tile ``i`` fetches key tile ``first[i] + t``. Steps
past the span repeat its last tile (an unchanged block index: the pipeline issues no copy) and
skip the compute under ``pl.when``, so tiles outside the range are never read from HBM.
SMEM holds two int32 per (batch, head, tile) per kernel: 16 KiB at 32k tokens, 16 heads, batch 1
and 128-row tiles, where the lists took 4 MiB and the v5e compile refused them (its SMEM is 1 MiB);
larger tiles shrink it for big per-device batches.

Grids (fastest axis last):
* forward and dQ ``(batch, heads, q_tiles, k_tiles)``: the output tile stays in VMEM scratch
  while the last axis walks the live key tiles;
* dK/dV ``(batch, kv_heads, k_tiles, groups, q_tiles)``: each key tile walks the query heads of
  its group and their live query tiles, so GQA gradients are summed in VMEM, not in HBM.

Layout: heads before the sequence (``[batch, heads, len, head_dim]``), so a tile is a contiguous
``(rows, head_dim)`` block; head_dim padded to a multiple of 128 lanes, tiles multiples of 128
rows. Per-row tables enter as ``(rows, 1)`` columns (queries: positions, buckets, log-sum-exp,
delta) and ``(1, rows)`` rows (keys), so masks broadcast without transposes. Matmuls accumulate
in float32; outputs have the input dtype. Natural-base exponentials (the log-sum-exp is internal).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas._common import next_power_of_2, round_up
from kernels_pallas.sparse_attention.kernel import _MASK_VALUE, attention_core, pad_problem
from kernels_pallas.sparse_attention.tiles import live_tiles, tile_ranges

LANES = 128  # TPU vector lanes: tiles and head_dim are multiples of this
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    interpret: bool


def _call_options(static, semantics):
    """pallas_call's compiler parameters and interpret mode (TPU interpret mode on a CPU)."""
    return dict(
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if static.interpret else False,
    )


def _scores(q_ref, k_ref, qp_ref, kp_ref, qb_ref, kb_ref, scale):
    """Scaled logits [bq, bk] in float32 and the allowed-pair mask of the current tiles."""
    s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32)
    mask = qp_ref[...] >= kp_ref[...]  # (bq, 1) against (1, bk)
    if qb_ref is not None:
        mask &= qb_ref[...] == kb_ref[...]
    return s * scale, mask


def _unpack(refs, n_in, use_buckets):
    """Splits the kernel's refs after the scalar-prefetched ones: the first ``n_in`` inputs, the
    buckets' two (or None, None), and the rest (outputs, scratch)."""
    inputs, rest = refs[:n_in], refs[n_in:]
    buckets, rest = (rest[:2], rest[2:]) if use_buckets else ((None, None), rest)
    return inputs, buckets, rest


# -------------------------------------------------------------------------------------- kernels


def _forward_kernel(first_ref, span_ref, *refs, scale, heads, nq, use_buckets):
    (q_ref, k_ref, v_ref, qp_ref, kp_ref), (qb_ref, kb_ref), rest = _unpack(refs, 5, use_buckets)
    o_ref, lse_ref, acc_ref, max_ref, sum_ref = rest
    b, h, i, t = (pl.program_id(axis) for axis in range(4))

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        max_ref[...] = jnp.full(max_ref.shape, _MASK_VALUE, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)

    @pl.when(t < span_ref[(b * heads + h) * nq + i])
    def _step():
        s, mask = _scores(q_ref, k_ref, qp_ref, kp_ref, qb_ref, kb_ref, scale)
        s = jnp.where(mask, s, _MASK_VALUE)
        row_max = max_ref[...]
        m_new = jnp.maximum(row_max, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(row_max - m_new)
        # The where matters while every key so far was masked (m_new is still the mask value).
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        v = v_ref[...]
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc_ref[...] = correction * acc_ref[...] + pv
        sum_ref[...] = correction * sum_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        max_ref[...] = m_new

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        row_sum = sum_ref[...]
        seen = row_sum > 0
        safe = jnp.where(seen, row_sum, 1.0)
        o_ref[...] = jnp.where(seen, acc_ref[...] / safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, max_ref[...] + jnp.log(safe), 0.0)


def _dq_kernel(first_ref, span_ref, *refs, scale, heads, nq, use_buckets):
    inputs, (qb_ref, kb_ref), (dq_ref, acc_ref) = _unpack(refs, 8, use_buckets)
    q_ref, k_ref, v_ref, qp_ref, kp_ref, do_ref, lse_ref, delta_ref = inputs
    b, h, i, t = (pl.program_id(axis) for axis in range(4))

    @pl.when(t == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(t < span_ref[(b * heads + h) * nq + i])
    def _step():
        s, mask = _scores(q_ref, k_ref, qp_ref, kp_ref, qb_ref, kb_ref, scale)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        k = k_ref[...]
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        acc_ref[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(first_ref, span_ref, *refs, scale, heads, groups, nk, use_buckets):
    inputs, (qb_ref, kb_ref), rest = _unpack(refs, 8, use_buckets)
    q_ref, k_ref, v_ref, qp_ref, kp_ref, do_ref, lse_ref, delta_ref = inputs
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    b, g_kv, j, g, t = (pl.program_id(axis) for axis in range(5))
    first = (g == 0) & (t == 0)
    last = (g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(t < span_ref[(b * heads + g_kv * groups + g) * nk + j])
    def _step():
        s, mask = _scores(q_ref, k_ref, qp_ref, kp_ref, qb_ref, kb_ref, scale)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        q, do = q_ref[...], do_ref[...]
        dv_acc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[...])
        dk_acc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------- core


def _live_entry(first, span, row, t):
    """Step ``t``'s tile of range ``row``, or its last tile past the span: an unchanged block
    index, so padding steps fetch nothing."""
    return first[row] + jnp.minimum(t, jnp.maximum(span[row] - 1, 0))


def _as_column(x):
    """[batch, hh, len] -> [batch, hh, len, 1]: one value per row of a query tile."""
    return x[..., None]


def _as_row(x):
    """[batch, hh, len] -> [batch, hh, 1, len]: one value per column of a key tile."""
    return x[:, :, None, :]


def _tile_ranges(q_pos, k_pos, q_bkt, k_bkt, bq, bk):
    """The live key tiles of each query tile and the live query tiles of each key tile as
    flat ranges (``first``, ``span``), from :func:`.tiles.live_tiles` (bucket 0 for QK)."""
    if q_bkt is None:
        q_bkt, k_bkt = jnp.zeros_like(q_pos), jnp.zeros_like(k_pos)
    kv_tiles, kv_count, q_tiles, q_count = live_tiles(q_pos, k_pos, q_bkt, k_bkt, bq, bk)
    flat = [
        x.reshape(-1) for x in (*tile_ranges(kv_tiles, kv_count), *tile_ranges(q_tiles, q_count))
    ]
    return flat[:2], flat[2:]


def _query_grid(q, k, kv_ranges, q_bkt, k_bkt, bq, bk):
    """What the forward and dQ kernels share, on grid (batch, head, query tile, step): the ranges
    of live key tiles per query tile, the block specs, the bucket inputs, the static sizes."""
    batch, heads, q_len, d = q.shape
    kv_len = k.shape[2]
    groups = heads // k.shape[1]
    nq, nk = q_len // bq, kv_len // bk

    def key_tile(b, h, i, t, first, span):
        return _live_entry(first, span, (b * heads + h) * nq + i, t)

    def k_block(b, h, i, t, first, span):
        return b, h // groups, key_tile(b, h, i, t, first, span), 0

    def k_row(b, h, i, t, first, span):
        return b, h // groups, 0, key_tile(b, h, i, t, first, span)

    specs = dict(
        q=pl.BlockSpec((None, None, bq, d), lambda b, h, i, t, *_: (b, h, i, 0)),
        kv=pl.BlockSpec((None, None, bk, d), k_block),
        q_col=pl.BlockSpec((None, None, bq, 1), lambda b, h, i, t, *_: (b, h, i, 0)),
        k_row=pl.BlockSpec((None, None, 1, bk), k_row),
    )
    bucket_args = [] if q_bkt is None else [_as_column(q_bkt), _as_row(k_bkt)]
    bucket_specs = [] if q_bkt is None else [specs["q_col"], specs["k_row"]]
    sizes = dict(grid=(batch, heads, nq, nk), heads=heads, nq=nq)
    return specs, bucket_args, bucket_specs, sizes


_QUERY_GRID_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def _forward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt):
    batch, heads, q_len, d = q.shape
    bq = static.block_q
    bk = static.block_k
    kv_ranges, _ = _tile_ranges(q_pos, k_pos, q_bkt, k_bkt, bq, bk)
    sp, bucket_args, bucket_specs, sizes = _query_grid(q, k, kv_ranges, q_bkt, k_bkt, bq, bk)
    kernel = functools.partial(
        _forward_kernel,
        scale=static.scale,
        heads=sizes["heads"],
        nq=sizes["nq"],
        use_buckets=q_bkt is not None,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=sizes["grid"],
        in_specs=[sp["q"], sp["kv"], sp["kv"], sp["q_col"], sp["k_row"], *bucket_specs],
        out_specs=[sp["q"], sp["q_col"]],
        scratch_shapes=[
            pltpu.VMEM((bq, d), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
        ],
    )
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
        ],
        name="sparse_flash_attention_fwd",
        **_call_options(static, _QUERY_GRID_SEMANTICS),
    )(*kv_ranges, q, k, v, _as_column(q_pos), _as_row(k_pos), *bucket_args)
    return o, lse[..., 0]


def _backward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt, o, lse, do):
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = static.block_q_bwd, static.block_k_bwd
    nq, nk = q_len // bq, kv_len // bk
    use_buckets = q_bkt is not None
    # delta_i = sum_d o_id * do_id (FlashAttention-2); a cheap elementwise pass left to XLA.
    delta = jnp.einsum("bhqd,bhqd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    rows = [_as_column(q_pos), _as_row(k_pos)]
    stats = [_as_column(lse), _as_column(delta)]

    # dQ: grid (batch, head, query tile, step over its live key tiles).
    kv_ranges, q_ranges = _tile_ranges(q_pos, k_pos, q_bkt, k_bkt, bq, bk)
    sp, bucket_args, bucket_specs, sizes = _query_grid(q, k, kv_ranges, q_bkt, k_bkt, bq, bk)
    in_specs = [sp["q"], sp["kv"], sp["kv"], sp["q_col"], sp["k_row"], sp["q"], sp["q_col"]]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=sizes["grid"],
        in_specs=in_specs + [sp["q_col"], *bucket_specs],
        out_specs=sp["q"],
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
    )
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel,
            scale=static.scale,
            heads=heads,
            nq=nq,
            use_buckets=use_buckets,
        ),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="sparse_flash_attention_dq",
        **_call_options(static, _QUERY_GRID_SEMANTICS),
    )(*kv_ranges, q, k, v, *rows, do, *stats, *bucket_args)

    # dK, dV: grid (batch, kv head, key tile, head of the group, step over its live query tiles).
    def query_tile(b, g_kv, j, g, t, first, span):
        return _live_entry(first, span, (b * heads + g_kv * groups + g) * nk + j, t)

    def q_block(b, g_kv, j, g, t, first, span):
        return b, g_kv * groups + g, query_tile(b, g_kv, j, g, t, first, span), 0

    q_spec = pl.BlockSpec((None, None, bq, d), q_block)
    q_col = pl.BlockSpec((None, None, bq, 1), q_block)
    k_spec = pl.BlockSpec((None, None, bk, d), lambda b, g_kv, j, g, t, *_: (b, g_kv, j, 0))
    k_row = pl.BlockSpec((None, None, 1, bk), lambda b, g_kv, j, g, t, *_: (b, g_kv, 0, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, kv_heads, nk, groups, nq),
        in_specs=[q_spec, k_spec, k_spec, q_col, k_row, q_spec, q_col, q_col]
        + ([q_col, k_row] if use_buckets else []),
        out_specs=[k_spec, k_spec],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
    )
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            scale=static.scale,
            heads=heads,
            groups=groups,
            nk=nk,
            use_buckets=use_buckets,
        ),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="sparse_flash_attention_dkv",
        **_call_options(static, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(*q_ranges, q, k, v, *rows, do, *stats, *bucket_args)
    return dq, dk, dv


_core = attention_core(_forward, _backward)


def _fit_block(block, n):
    """``block`` raised to the 128 lanes, capped at n's tiles rounded up to a power of two (so
    that the forward and backward tiles divide one padded length)."""
    return min(max(block, LANES), LANES * next_power_of_2(-(-n // LANES)))


def index_masked_attention(
    q, k, v, q_pos, k_pos, q_buckets=None, k_buckets=None, *, scale, block_sizes, interpret
):
    """The Mosaic counterpart of :func:`.kernel.index_masked_attention`: same arguments and
    result; ``block_sizes`` (the same :class:`.kernel.BlockSizes`) are raised to multiples of 128
    rows (``num_warps``/``num_stages`` are GPU-only), and ``interpret`` runs the kernels in
    Pallas' TPU interpret mode (on a CPU)."""
    q_len, kv_len, head_dim = q.shape[1], k.shape[1], q.shape[-1]
    bs = block_sizes
    bq, bq_bwd = _fit_block(bs.block_q, q_len), _fit_block(bs.block_q_bwd, q_len)
    bk, bk_bwd = _fit_block(bs.block_k, kv_len), _fit_block(bs.block_k_bwd, kv_len)
    q, k, v, *tables = pad_problem(
        q,
        k,
        v,
        q_pos,
        k_pos,
        q_buckets,
        k_buckets,
        q_multiple=max(bq, bq_bwd),
        k_multiple=max(bk, bk_bwd),
        d_full=round_up(head_dim, LANES),
    )
    static = _Static(
        scale=float(scale),
        block_q=bq,
        block_k=bk,
        block_q_bwd=bq_bwd,
        block_k_bwd=bk_bwd,
        interpret=bool(interpret),
    )

    def heads_first(x):
        return x.transpose(0, 2, 1, 3)

    out = _core(static, heads_first(q), heads_first(k), heads_first(v), *tables)
    return heads_first(out)[:, :q_len, :, :head_dim]
