"""Dynamic sparse causal flash attention (Pagliardini et al. 2023) for Pallas GPU (Triton).

Two sparsity patterns, both exact (no approximation of the attention they define):

* QK-sparse: query ``i`` of head ``h`` attends to key ``j`` iff ``q_keep[b, i, h]``,
  ``k_keep[b, j, h_kv]`` and ``j <= i``.
* Hash-sparse: query ``i`` attends to key ``j`` iff ``q_buckets[b, i, h] == k_buckets[b, j, h_kv]``
  and ``j <= i`` (inclusive: a token sees itself, unlike the authors' strict Reformer rule).

A query with no allowed key (dropped, or first of its bucket under a dropped key) outputs exactly 0.
Layout: q ``[batch, seq, heads, head_dim]``, k and v ``[batch, seq, kv_heads, head_dim]``
(``heads % kv_heads == 0``, grouped-query attention); ``h_kv = h // (heads // kv_heads)``.

Both reduce to one core: reorder each (batch, head) row (QK: stable sort kept-first, so kept tokens
are compacted to the front; hash: stable sort by bucket), run a causal flash-attention kernel whose
mask is on the tokens' *original* positions (and buckets), then gather the output back. Because the
sort is stable, positions are increasing within a run, so per-tile min/max of positions and buckets
decide which (query tile, key tile) pairs can hold an allowed pair. Those decisions become per-tile
lists of live tiles, computed with jnp before the kernel; the kernels loop only over the lists, so
the work is proportional to the non-empty tiles.

Kernels (Triton lowering, one program per tile, loops inside; no atomics). The tile index is the
fastest grid axis, as in jax's own flash attention, so programs running side by side share K/V
in L2:
* forward, grid ``(q_tiles, batch, heads)``: online softmax in base 2, saves log-sum-exp;
* dQ, grid ``(q_tiles, batch, heads)``: loops over the live key tiles;
* dK/dV, grid ``(k_tiles, batch, kv_heads)``: loops over the heads of the group and their live
  query tiles, so GQA gradients are summed in registers, not in an extra buffer.

Matmuls accumulate in float32 for every input dtype; outputs have the input dtype. Head dims are
zero-padded to a power of two (>= 16), sequences to a multiple of the tiles. TPU is not supported by
these kernels (they use Triton pointer loads and in-kernel loops over data-dependent lists;
Mosaic TPU would need scalar prefetch): ``jaxlab.ops`` runs the XLA path there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Large finite negative instead of -inf: fully masked rows stay finite inside the kernel.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# Sentinel positions for padding: no real key is at or below -1, no real query at or above this.
_PAD_Q_POS = -1
_PAD_K_POS = 2**30
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two; clamped to the sequence for short inputs).

    ``block_q``/``block_k`` tile the forward pass; ``block_q_bwd``/``block_k_bwd`` both backward
    kernels. All are halved when a padded row takes 512 bytes or more (float32 at head_dim 128,
    bf16 at 256), to fit shared memory. ``num_warps=None`` picks 4 for head_dim <= 64, else 8.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {value}")


# ------------------------------------------------------------------------------------ reference


def masked_attention_reference(q, k, v, mask, sm_scale=None):
    """Dense attention with an explicit mask; rows with no allowed key give 0.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
      mask: [batch, heads, q_len, kv_len] bool.
    Returns [batch, q_len, heads, head_dim], computed in the promoted dtype of q and float32.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim**-0.5 if sm_scale is None else sm_scale
    kh = jnp.repeat(k.astype(dtype), heads // kv_heads, axis=2)
    vh = jnp.repeat(v.astype(dtype), heads // kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), kh) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, vh).astype(q.dtype)


def _group_heads(x, heads):
    """[batch, seq, kv_heads] -> [batch, seq, heads] by repeating each kv head over its group."""
    return jnp.repeat(x, heads // x.shape[2], axis=2)


def _causal(seq, segment_ids):
    """[batch or 1, 1, seq, seq] causal mask, within segments when segment_ids is given."""
    causal = (jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None])[None, None]
    if segment_ids is not None:
        causal = causal & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return causal


def qk_sparse_attention_reference(q, k, v, q_keep, k_keep, sm_scale=None, segment_ids=None):
    """Dense masked QK-sparse attention (same arguments as :func:`qk_sparse_attention`)."""
    causal = _causal(q.shape[1], segment_ids)
    kk = _group_heads(k_keep, q.shape[2])
    mask = q_keep.transpose(0, 2, 1)[:, :, :, None] & kk.transpose(0, 2, 1)[:, :, None, :] & causal
    return masked_attention_reference(q, k, v, mask, sm_scale)


def hash_sparse_attention_reference(q, k, v, q_buckets, k_buckets, sm_scale=None, segment_ids=None):
    """Dense masked hash-sparse attention (same arguments as :func:`hash_sparse_attention`)."""
    causal = _causal(q.shape[1], segment_ids)
    kb = _group_heads(k_buckets, q.shape[2])
    mask = q_buckets.transpose(0, 2, 1)[:, :, :, None] == kb.transpose(0, 2, 1)[:, :, None, :]
    return masked_attention_reference(q, k, v, mask & causal, sm_scale)


# ----------------------------------------------------------------------------------- tile lists


def _tile_bounds(pos, buckets, block, valid):
    """Per-tile (max or min position, min bucket, max bucket) over the valid rows.

    pos, buckets, valid: [batch, hh, seq] -> each [batch, hh, seq // block].
    """
    shape = pos.shape[:2] + (pos.shape[2] // block, block)
    big = jnp.iinfo(jnp.int32).max
    b = buckets.reshape(shape)
    v = valid.reshape(shape)
    bmin = jnp.min(jnp.where(v, b, big), axis=-1)
    bmax = jnp.max(jnp.where(v, b, -big), axis=-1)
    return pos.reshape(shape), bmin, bmax


def live_tiles(q_pos, k_pos, q_buckets, k_buckets, block_q, block_k):
    """Which (query tile, key tile) pairs may hold an allowed pair, as compacted lists.

    A pair is live if the key tile's smallest position is <= the query tile's largest, and the
    tiles' bucket ranges overlap (conservative: a live tile may still be fully masked).

    Args:
      q_pos: [batch, heads, q_len] original positions (-1 for padding), increasing within runs.
      k_pos: [batch, kv_heads, kv_len] (2**30 for padding).
      q_buckets, k_buckets: same shapes, int32 (zeros for QK-sparse).
    Returns:
      kv_tiles [batch, heads, nq, nk], kv_count [batch, heads, nq]: for each query tile, the live
      key tiles first (ascending) and how many; q_tiles [batch, heads, nk, nq], q_count
      [batch, heads, nk]: the same seen from each key tile.
    """
    heads = q_pos.shape[1]
    groups = heads // k_pos.shape[1]
    qp, qbmin, qbmax = _tile_bounds(q_pos, q_buckets, block_q, q_pos >= 0)
    kp, kbmin, kbmax = _tile_bounds(k_pos, k_buckets, block_k, k_pos < _PAD_K_POS)
    q_max = jnp.max(qp, axis=-1)  # [b, h, nq]
    k_min = jnp.repeat(jnp.min(kp, axis=-1), groups, axis=1)  # [b, h, nk]
    kbmin = jnp.repeat(kbmin, groups, axis=1)
    kbmax = jnp.repeat(kbmax, groups, axis=1)
    live = (
        (k_min[:, :, None, :] <= q_max[:, :, :, None])
        & (kbmin[:, :, None, :] <= qbmax[:, :, :, None])
        & (kbmax[:, :, None, :] >= qbmin[:, :, :, None])
    )

    def compact(mask):
        order = jnp.argsort(~mask, axis=-1, stable=True).astype(jnp.int32)
        return order, jnp.sum(mask, axis=-1, dtype=jnp.int32)

    kv_tiles, kv_count = compact(live)
    q_tiles, q_count = compact(live.transpose(0, 1, 3, 2))
    return kv_tiles, kv_count, q_tiles, q_count


# -------------------------------------------------------------------------------------- kernels


def _logits_and_mask(q, k, qp, kp, qb, kb, scale):
    """Base-2 scaled logits [bq, bk] in float32 and the allowed-pair mask."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
    mask = qp[:, None] >= kp[None, :]
    if qb is not None:
        mask &= qb[:, None] == kb[None, :]
    return s, mask


def _forward_kernel(
    kv_tiles_ref,
    kv_count_ref,
    q_ref,
    k_ref,
    v_ref,
    qp_ref,
    kp_ref,
    *rest,
    scale,
    block_k,
    use_buckets,
):
    if use_buckets:
        qb_ref, kb_ref, o_ref, lse_ref = rest
    else:
        (o_ref, lse_ref), qb_ref, kb_ref = rest, None, None
    q = q_ref[...]
    qp = qp_ref[...]
    qb = qb_ref[...] if use_buckets else None
    block_q, head_dim = q.shape

    def body(t, carry):
        acc, row_max, row_sum = carry
        keys = pl.ds(kv_tiles_ref[t] * block_k, block_k)
        kb = kb_ref[keys] if use_buckets else None
        s, mask = _logits_and_mask(q, k_ref[keys, :], qp, kp_ref[keys], qb, kb, scale)
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(row_max, jnp.max(s, axis=1))
        correction = jnp.exp2(row_max - m_new)
        # The where matters while every key so far was masked (m_new is still the mask value).
        p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        v = v_ref[keys, :]
        acc = correction[:, None] * acc + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return acc, m_new, correction * row_sum + jnp.sum(p, axis=1)

    init = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, row_max, row_sum = lax.fori_loop(0, kv_count_ref[pl.program_id(0)], body, init)
    seen = row_sum > 0
    safe_l = jnp.where(seen, row_sum, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, row_max + jnp.log2(safe_l), 0.0)


def _dq_kernel(
    kv_tiles_ref,
    kv_count_ref,
    q_ref,
    k_ref,
    v_ref,
    qp_ref,
    kp_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *rest,
    scale,
    sm_scale,
    block_k,
    use_buckets,
):
    if use_buckets:
        qb_ref, kb_ref, dq_ref = rest
    else:
        (dq_ref,), qb_ref, kb_ref = rest, None, None
    q, do = q_ref[...], do_ref[...]
    qp, lse, delta = qp_ref[...], lse_ref[...], delta_ref[...]
    qb = qb_ref[...] if use_buckets else None

    def body(t, dq):
        keys = pl.ds(kv_tiles_ref[t] * block_k, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        kb = kb_ref[keys] if use_buckets else None
        s, mask = _logits_and_mask(q, k, qp, kp_ref[keys], qb, kb, scale)
        p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, kv_count_ref[pl.program_id(0)], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_tiles_ref,
    q_count_ref,
    q_ref,
    k_ref,
    v_ref,
    qp_ref,
    kp_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *rest,
    scale,
    sm_scale,
    block_q,
    groups,
    use_buckets,
):
    if use_buckets:
        qb_ref, kb_ref, dk_ref, dv_ref = rest
    else:
        (dk_ref, dv_ref), qb_ref, kb_ref = rest, None, None
    k, v, kp = k_ref[...], v_ref[...], kp_ref[...]
    kb = kb_ref[...] if use_buckets else None
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for g in range(groups):  # the query heads sharing this kv head; static and small

        def body(t, carry, g=g):
            dk, dv = carry
            rows = pl.ds(q_tiles_ref[g, t] * block_q, block_q)
            q, do = q_ref[rows, g, :], do_ref[rows, g, :]
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            qb = qb_ref[g, rows] if use_buckets else None
            s, mask = _logits_and_mask(q, k, qp_ref[g, rows], kp, qb, kb, scale)
            p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, None])
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv

        dk, dv = lax.fori_loop(0, q_count_ref[g], body, (dk, dv))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------- core


@dataclasses.dataclass(frozen=True)
class _Static:
    sm_scale: float
    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    num_warps: int
    num_stages: int
    interpret: bool


def _compiler_params(static):
    return plgpu.CompilerParams(num_warps=static.num_warps, num_stages=static.num_stages)


def _query_tile_specs(bq, nq, nk, kv_len, head_dim, groups):
    """BlockSpecs over the grid (query tile, batch, head): the tile lists, a query tile, the
    whole K/V sequence of the head's kv head, and per-row query and key tables."""
    return dict(
        kv_tiles=pl.BlockSpec((None, None, None, nk), lambda i, b, h: (b, h, i, 0)),
        kv_count=pl.BlockSpec((None, None, nq), lambda i, b, h: (b, h, 0)),
        q=pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        kv=pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // groups, 0)),
        q_row=pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        kv_row=pl.BlockSpec((None, None, kv_len), lambda i, b, h: (b, h // groups, 0)),
    )


def _forward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = static.block_q, static.block_k
    use_buckets = q_bkt is not None
    buckets = (q_bkt, k_bkt) if use_buckets else (jnp.zeros_like(q_pos), jnp.zeros_like(k_pos))
    kv_tiles, kv_count, _, _ = live_tiles(q_pos, k_pos, *buckets, bq, bk)
    nq, nk = q_len // bq, kv_len // bk
    sp = _query_tile_specs(bq, nq, nk, kv_len, head_dim, groups)
    q_block, kv_block, q_row, kv_row = sp["q"], sp["kv"], sp["q_row"], sp["kv_row"]
    in_specs = [
        sp["kv_tiles"],
        sp["kv_count"],
        q_block,
        kv_block,
        kv_block,
        q_row,
        kv_row,
    ]
    args = [kv_tiles, kv_count, q, k, v, q_pos, k_pos]
    if use_buckets:
        in_specs += [q_row, kv_row]
        args += [q_bkt, k_bkt]
    kernel = functools.partial(
        _forward_kernel, scale=static.sm_scale * _LOG2E, block_k=bk, use_buckets=use_buckets
    )
    return pl.pallas_call(
        kernel,
        grid=(nq, batch, heads),
        in_specs=in_specs,
        out_specs=[q_block, q_row],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
        ],
        compiler_params=_compiler_params(static),
        interpret=static.interpret,
        name="sparse_flash_attention_fwd",
    )(*args)


def _backward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt, o, lse, do):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    bq, bk = static.block_q_bwd, static.block_k_bwd
    nq, nk = q_len // bq, kv_len // bk
    use_buckets = q_bkt is not None
    buckets = (q_bkt, k_bkt) if use_buckets else (jnp.zeros_like(q_pos), jnp.zeros_like(k_pos))
    kv_tiles, kv_count, q_tiles, q_count = live_tiles(q_pos, k_pos, *buckets, bq, bk)
    # delta_i = sum_d o_id * do_id (FlashAttention-2); a cheap elementwise pass left to XLA.
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    scale = static.sm_scale * _LOG2E
    common = dict(compiler_params=_compiler_params(static), interpret=static.interpret)

    # dQ: grid over (batch, head, query tile), loop over live key tiles.
    sp = _query_tile_specs(bq, nq, nk, kv_len, head_dim, groups)
    q_block, kv_block, q_row, kv_row = sp["q"], sp["kv"], sp["q_row"], sp["kv_row"]
    in_specs = [
        sp["kv_tiles"],
        sp["kv_count"],
        q_block,
        kv_block,
        kv_block,
        q_row,
        kv_row,
        q_block,
        q_row,
        q_row,
    ]
    args = [kv_tiles, kv_count, q, k, v, q_pos, k_pos, do, lse, delta]
    if use_buckets:
        in_specs += [q_row, kv_row]
        args += [q_bkt, k_bkt]
    dq = pl.pallas_call(
        functools.partial(
            _dq_kernel, scale=scale, sm_scale=static.sm_scale, block_k=bk, use_buckets=use_buckets
        ),
        grid=(nq, batch, heads),
        in_specs=in_specs,
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="sparse_flash_attention_dq",
        **common,
    )(*args)

    # dK, dV: grid over (batch, kv head, key tile), loop over the group's heads and their tiles.
    group_rows = pl.BlockSpec((None, groups, q_len), lambda j, b, g: (b, g, 0))
    q_group = pl.BlockSpec((None, q_len, groups, head_dim), lambda j, b, g: (b, 0, g, 0))
    k_block = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, g: (b, j, g, 0))
    k_row = pl.BlockSpec((None, None, bk), lambda j, b, g: (b, g, j))
    in_specs = [
        pl.BlockSpec((None, groups, None, nq), lambda j, b, g: (b, g, j, 0)),
        pl.BlockSpec((None, groups, None), lambda j, b, g: (b, g, j)),
        q_group,
        k_block,
        k_block,
        group_rows,
        k_row,
        q_group,
        group_rows,
        group_rows,
    ]
    args = [q_tiles, q_count, q, k, v, q_pos, k_pos, do, lse, delta]
    if use_buckets:
        in_specs += [group_rows, k_row]
        args += [q_bkt, k_bkt]
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkv_kernel,
            scale=scale,
            sm_scale=static.sm_scale,
            block_q=bq,
            groups=groups,
            use_buckets=use_buckets,
        ),
        grid=(nk, batch, kv_heads),
        in_specs=in_specs,
        out_specs=[k_block, k_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="sparse_flash_attention_dkv",
        **common,
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt):
    return _forward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt)[0]


def _core_fwd(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt):
    o, lse = _forward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt)
    return o, (q, k, v, q_pos, k_pos, q_bkt, k_bkt, o, lse)


def _core_bwd(static, residuals, do):
    q, k, v, q_pos, k_pos, q_bkt, k_bkt, o, lse = residuals
    dq, dk, dv = _backward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt, o, lse, do)
    return dq, dk, dv, None, None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _round_up(n, m):
    return -(-n // m) * m


def _next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def index_masked_attention(
    q, k, v, q_pos, k_pos, q_buckets=None, k_buckets=None, *, sm_scale, block_sizes, interpret
):
    """Causal flash attention on reordered rows, masked on original positions (and buckets).

    This is the shared core; most users want :func:`qk_sparse_attention` or
    :func:`hash_sparse_attention`, which do the reordering.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
      q_pos: [batch, heads, q_len] int32 original position of each stored query, -1 for rows that
        attend to nothing; positions must increase within runs of equal bucket (stable order).
      k_pos: [batch, kv_heads, kv_len] int32, >= 2**30 for rows nobody attends to.
      q_buckets, k_buckets: None, or int32 with the shapes of q_pos and k_pos.
    Returns:
      [batch, q_len, heads, head_dim]: query ``i`` attends to key ``j`` iff
      ``q_pos[i] >= k_pos[j]`` (and the buckets are equal); rows with no such key are 0.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    bs = block_sizes
    d_full = max(16, _next_power_of_2(head_dim))
    # Wide rows (fp32 at head_dim 128, bf16 at 256) halve the tiles to stay in shared memory.
    shrink = 2 if d_full * q.dtype.itemsize >= 512 else 1

    def fit_block(blk, n):
        """blk (halved for wide rows) capped at n's next power of two, at least 16."""
        return max(16, min(blk // shrink, _next_power_of_2(n)))

    bq, bq_bwd = fit_block(bs.block_q, q_len), fit_block(bs.block_q_bwd, q_len)
    bk, bk_bwd = fit_block(bs.block_k, kv_len), fit_block(bs.block_k_bwd, kv_len)
    q_pad = _round_up(q_len, max(bq, bq_bwd)) - q_len
    k_pad = _round_up(kv_len, max(bk, bk_bwd)) - kv_len
    d_pad = d_full - head_dim
    q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, d_pad)))
    k = jnp.pad(k, ((0, 0), (0, k_pad), (0, 0), (0, d_pad)))
    v = jnp.pad(v, ((0, 0), (0, k_pad), (0, 0), (0, d_pad)))
    q_pos = jnp.pad(
        q_pos.astype(jnp.int32), ((0, 0), (0, 0), (0, q_pad)), constant_values=_PAD_Q_POS
    )
    k_pos = jnp.pad(
        k_pos.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad)), constant_values=_PAD_K_POS
    )
    if q_buckets is not None:
        q_buckets = jnp.pad(q_buckets.astype(jnp.int32), ((0, 0), (0, 0), (0, q_pad)))
        k_buckets = jnp.pad(k_buckets.astype(jnp.int32), ((0, 0), (0, 0), (0, k_pad)))
    num_warps = bs.num_warps if bs.num_warps is not None else (4 if head_dim <= 64 else 8)
    static = _Static(
        sm_scale=float(sm_scale),
        block_q=bq,
        block_k=bk,
        block_q_bwd=bq_bwd,
        block_k_bwd=bk_bwd,
        num_warps=num_warps,
        num_stages=bs.num_stages,
        interpret=bool(interpret),
    )
    out = _core(static, q, k, v, q_pos, k_pos, q_buckets, k_buckets)
    return out[:, :q_len, :, :head_dim]


# ------------------------------------------------------------------------------- public wrappers


def _check_qkv(name, q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{name}: q, k, v must be rank 4 [batch, seq, heads, head_dim], got "
            f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}"
        )
    batch, seq, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != seq or k.shape[3] != head_dim:
        raise ValueError(
            f"{name}: k and v must both be [batch={batch}, seq={seq}, kv_heads, "
            f"head_dim={head_dim}], got k.shape={k.shape}, v.shape={v.shape}"
        )
    if heads % k.shape[2]:
        raise ValueError(
            f"{name}: heads={heads} (q.shape[2]) must be a multiple of "
            f"kv_heads={k.shape[2]} (k.shape[2])"
        )
    for arg, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: {arg} must be floating point, got dtype {x.dtype}")


def _check_rows(name, arg, x, shape, kind):
    if x.shape != shape:
        raise ValueError(
            f"{name}: {arg} must have shape {shape} [batch, seq, heads], got {x.shape}"
        )
    if kind == "bool" and x.dtype != jnp.bool_:
        raise ValueError(f"{name}: {arg} must be a bool mask, got dtype {x.dtype}")
    if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name}: {arg} must be integer bucket ids, got dtype {x.dtype}")


def _check_nonnegative(name, arg, x):
    """Checks concrete ids (traced ones cannot be inspected without a host sync)."""
    if isinstance(x, jax.core.Tracer) or not x.size:
        return
    smallest = int(np.min(np.asarray(x)))
    if smallest < 0:
        raise ValueError(f"{name}: {arg} must be >= 0, got a minimum of {smallest}")


def _check_segments(name, segment_ids, q):
    if segment_ids is None:
        return
    if segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(
            f"{name}: segment_ids must be integers of shape {q.shape[:2]} "
            f"[batch, seq], got {segment_ids.dtype}{list(segment_ids.shape)}"
        )
    _check_nonnegative(name, "segment_ids", segment_ids)


def check_qk_arguments(q, k, v, q_keep, k_keep, segment_ids=None):
    """Raises ValueError naming the argument when shapes or dtypes do not fit."""
    name = "qk_sparse_attention"
    _check_qkv(name, q, k, v)
    _check_rows(name, "q_keep", q_keep, q.shape[:3], "bool")
    _check_rows(name, "k_keep", k_keep, k.shape[:3], "bool")
    _check_segments(name, segment_ids, q)


def check_hash_arguments(q, k, v, q_buckets, k_buckets, segment_ids=None):
    """As :func:`check_qk_arguments`; also rejects negative bucket ids when they are concrete."""
    name = "hash_sparse_attention"
    _check_qkv(name, q, k, v)
    _check_rows(name, "q_buckets", q_buckets, q.shape[:3], "int")
    _check_rows(name, "k_buckets", k_buckets, k.shape[:3], "int")
    for arg, x in (("q_buckets", q_buckets), ("k_buckets", k_buckets)):
        _check_nonnegative(name, arg, x)
    _check_segments(name, segment_ids, q)


def _resolve(q, sm_scale, block_sizes, interpret):
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    backend = jax.default_backend()
    interpret = backend == "cpu" if interpret is None else interpret
    if backend == "tpu" and not interpret:
        raise NotImplementedError(
            "sparse attention kernels lower to Triton (GPU) only; on TPU use jaxlab.ops with "
            "impl='xla', or run the kernels in interpret mode"
        )
    return sm_scale, block_sizes, interpret


def gather_rows(x, order):
    """x: [batch, seq, hh, ...], order: [batch, rows, hh] indices along seq -> [batch, rows, hh,
    ...], per (batch, hh)."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=1)


def inverse_permutation(order):
    """order: [batch, seq, hh] permutations along seq -> their inverses (a scatter, not a sort)."""
    batch, seq, hh = order.shape
    rows = jnp.broadcast_to(jnp.arange(seq, dtype=order.dtype)[None, :, None], order.shape)
    b = jnp.arange(batch)[:, None, None]
    h = jnp.arange(hh)[None, None, :]
    return jnp.zeros_like(order).at[b, order, h].set(rows, unique_indices=True)


@jax.custom_vjp
def permute_rows(x, order, inverse):
    """``x`` gathered by ``order`` along seq; the gradient is a gather by ``inverse``.

    ``order`` may be the first rows of a permutation (``inverse`` is always the full inverse).
    Autodiff of a gather would scatter-add, which GPUs do with atomics (compare-and-swap loops
    for bf16); for a permutation the transpose is just the inverse gather.
    """
    return gather_rows(x, order)


def _permute_rows_fwd(x, order, inverse):
    return gather_rows(x, order), (order, inverse)


def _permute_rows_bwd(residuals, g):
    order, inverse = residuals
    missing = inverse.shape[1] - g.shape[1]  # rows not gathered get no gradient
    g = jnp.pad(g, ((0, 0), (0, missing)) + ((0, 0),) * (g.ndim - 2))
    return gather_rows(g, inverse), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _to_rows(x):
    """[batch, seq, hh] -> [batch, hh, seq] int32, the kernels' layout for per-row tables."""
    return x.transpose(0, 2, 1).astype(jnp.int32)


def _reordered(q, k, v, q_order, k_order, q_pos, k_pos, q_bkt, k_bkt, static_args):
    """Runs the core on rows permuted by q_order/k_order and puts the output back in place."""
    q_inverse, k_inverse = inverse_permutation(q_order), inverse_permutation(k_order)
    qs = permute_rows(q, q_order, q_inverse)
    ks, vs = permute_rows(k, k_order, k_inverse), permute_rows(v, k_order, k_inverse)
    out = index_masked_attention(
        qs,
        ks,
        vs,
        _to_rows(q_pos),
        _to_rows(k_pos),
        None if q_bkt is None else _to_rows(q_bkt),
        None if k_bkt is None else _to_rows(k_bkt),
        **static_args,
    )
    return permute_rows(out, q_inverse, q_order)


def qk_sparse_attention(
    q, k, v, q_keep, k_keep, *, segment_ids=None, sm_scale=None, block_sizes=None, interpret=None
):
    """Causal attention with dropped queries and keys, skipping the dropped work.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
      q_keep: [batch, seq, heads] bool; k_keep: [batch, seq, kv_heads] bool.
      segment_ids: optional [batch, seq] ints (packed documents): attend only within a segment.
      sm_scale: logit scale, default ``head_dim ** -0.5``.
      block_sizes: :class:`BlockSizes`; interpret: run the kernels in interpret mode (None = on
        CPU).
    Returns:
      [batch, seq, heads, head_dim]; query ``i`` attends to key ``j`` iff ``q_keep[i]``,
      ``k_keep[j]`` and ``j <= i``; other rows are exactly 0.
    """
    check_qk_arguments(q, k, v, q_keep, k_keep, segment_ids)
    sm_scale, block_sizes, interpret = _resolve(q, sm_scale, block_sizes, interpret)
    return _qk_sparse(
        q,
        k,
        v,
        q_keep,
        k_keep,
        segment_ids,
        sm_scale=sm_scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )


def compact_order(keep):
    """Stable kept-first order along seq, and whether each slot of that order holds a kept row."""
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)
    count = jnp.sum(keep, axis=1, dtype=jnp.int32)
    kept = jnp.arange(keep.shape[1], dtype=jnp.int32)[None, :, None] < count[:, None, :]
    return order, kept


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def _qk_sparse(q, k, v, q_keep, k_keep, segment_ids, *, sm_scale, block_sizes, interpret):
    q_order, q_kept = compact_order(q_keep)
    k_order, k_kept = compact_order(k_keep)
    q_pos = jnp.where(q_kept, q_order, _PAD_Q_POS)
    k_pos = jnp.where(k_kept, k_order, _PAD_K_POS)
    # Segments ride in the kernels' bucket channel: equal ids are required either way.
    q_seg = k_seg = None
    if segment_ids is not None:
        q_seg = jnp.take_along_axis(segment_ids[:, :, None], q_order, axis=1)
        k_seg = jnp.take_along_axis(segment_ids[:, :, None], k_order, axis=1)
    static_args = dict(sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
    return _reordered(q, k, v, q_order, k_order, q_pos, k_pos, q_seg, k_seg, static_args)


def hash_sparse_attention(
    q,
    k,
    v,
    q_buckets,
    k_buckets,
    *,
    segment_ids=None,
    sm_scale=None,
    block_sizes=None,
    interpret=None,
):
    """Causal attention within hash buckets, skipping the tiles of other buckets.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
      q_buckets: [batch, seq, heads] int; k_buckets: [batch, seq, kv_heads] int; ids >= 0.
      segment_ids: optional [batch, seq] ints >= 0 (packed documents): attend only within one.
      sm_scale, block_sizes, interpret: as :func:`qk_sparse_attention`.
    Returns:
      [batch, seq, heads, head_dim]; query ``i`` attends to key ``j`` iff the buckets are equal
      and ``j <= i``; a row with no such key is 0.
    """
    check_hash_arguments(q, k, v, q_buckets, k_buckets, segment_ids)
    sm_scale, block_sizes, interpret = _resolve(q, sm_scale, block_sizes, interpret)
    return _hash_sparse(
        q,
        k,
        v,
        q_buckets,
        k_buckets,
        segment_ids,
        sm_scale=sm_scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )


def segmented_buckets(q_buckets, k_buckets, segment_ids):
    """One id per (segment, bucket) pair, so that sorting groups documents, then buckets."""
    if segment_ids is None:
        return q_buckets, k_buckets
    width = jnp.maximum(jnp.max(q_buckets), jnp.max(k_buckets)).astype(jnp.int32) + 1
    seg = segment_ids.astype(jnp.int32)[:, :, None] * width
    return seg + q_buckets.astype(jnp.int32), seg + k_buckets.astype(jnp.int32)


def bucket_order(buckets):
    """Stable order by bucket along seq, and the buckets in that order."""
    order = jnp.argsort(buckets, axis=1, stable=True).astype(jnp.int32)
    return order, jnp.take_along_axis(buckets, order, axis=1)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def _hash_sparse(q, k, v, q_buckets, k_buckets, segment_ids, *, sm_scale, block_sizes, interpret):
    q_buckets, k_buckets = segmented_buckets(q_buckets, k_buckets, segment_ids)
    q_order, q_sorted = bucket_order(q_buckets)
    k_order, k_sorted = bucket_order(k_buckets)
    static_args = dict(sm_scale=sm_scale, block_sizes=block_sizes, interpret=interpret)
    return _reordered(q, k, v, q_order, k_order, q_order, k_order, q_sorted, k_sorted, static_args)
