"""The Pallas (Triton) kernels of sparse flash attention and their custom-VJP core.

:func:`index_masked_attention` runs causal flash attention on reordered rows, masked on the
rows' original positions (and buckets), visiting only the live tiles of :mod:`.tiles`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas._common import next_power_of_2, pad_trailing, round_up
from kernels_pallas.sparse_attention.tiles import PAD_K_POS, PAD_Q_POS, live_tiles

# Large finite negative instead of -inf: fully masked rows stay finite inside the kernel.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
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

    @classmethod
    def get_default(cls, *, head_dim: int) -> BlockSizes:
        """The defaults, with ``num_warps`` chosen for ``head_dim``."""
        return cls(num_warps=_default_num_warps(head_dim))


def _default_num_warps(head_dim):
    return 4 if head_dim <= 64 else 8


# -------------------------------------------------------------------------------------- kernels


def _logits_and_mask(q, k, qp, kp, qb, kb, scale_log2):
    """Base-2 scaled logits [bq, bk] in float32 and the allowed-pair mask."""
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale_log2
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
    scale_log2,
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
        s, mask = _logits_and_mask(q, k_ref[keys, :], qp, kp_ref[keys], qb, kb, scale_log2)
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
    scale_log2,
    scale,
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
        s, mask = _logits_and_mask(q, k, qp, kp_ref[keys], qb, kb, scale_log2)
        p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, kv_count_ref[pl.program_id(0)], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


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
    scale_log2,
    scale,
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
            s, mask = _logits_and_mask(q, k, qp_ref[g, rows], kp, qb, kb, scale_log2)
            p = jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
            dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, None])
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
            return dk, dv

        dk, dv = lax.fori_loop(0, q_count_ref[g], body, (dk, dv))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------------------- core


@dataclasses.dataclass(frozen=True)
class _Static:
    scale: float
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
        _forward_kernel, scale_log2=static.scale * _LOG2E, block_k=bk, use_buckets=use_buckets
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
    scale_log2 = static.scale * _LOG2E
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
            _dq_kernel,
            scale_log2=scale_log2,
            scale=static.scale,
            block_k=bk,
            use_buckets=use_buckets,
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
            scale_log2=scale_log2,
            scale=static.scale,
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


def attention_core(forward, backward):
    """The differentiable core of a kernel family: ``forward(static, q, k, v, q_pos, k_pos,
    q_bkt, k_bkt) -> (o, lse)`` and ``backward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt, o,
    lse, do) -> (dq, dk, dv)``. Returns ``core(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt) ->
    o``, differentiable in q, k and v, whose backward keeps the inputs, o and the log-sum-exp."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def core(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt):
        return forward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt)[0]

    def core_fwd(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt):
        o, lse = forward(static, q, k, v, q_pos, k_pos, q_bkt, k_bkt)
        return o, (q, k, v, q_pos, k_pos, q_bkt, k_bkt, o, lse)

    def core_bwd(static, residuals, do):
        dq, dk, dv = backward(static, *residuals, do)
        return dq, dk, dv, None, None, None, None

    core.defvjp(core_fwd, core_bwd)
    return core


_core = attention_core(_forward, _backward)


def pad_problem(q, k, v, q_pos, k_pos, q_buckets, k_buckets, *, q_multiple, k_multiple, d_full):
    """Pads the sequences to multiples of the tiles and head_dim to ``d_full``: zero rows and
    columns, positions no pair allows (:data:`PAD_Q_POS`, :data:`PAD_K_POS`), bucket 0.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim]; the tables
    [batch, heads or kv_heads, len]. Returns them padded, the tables as int32.
    """
    q_pad = round_up(q.shape[1], q_multiple) - q.shape[1]
    k_pad = round_up(k.shape[1], k_multiple) - k.shape[1]
    d_pad = d_full - q.shape[-1]
    q = pad_trailing(q, (0, q_pad, 0, d_pad))
    k = pad_trailing(k, (0, k_pad, 0, d_pad))
    v = pad_trailing(v, (0, k_pad, 0, d_pad))
    q_pos = pad_trailing(q_pos.astype(jnp.int32), (0, 0, q_pad), PAD_Q_POS)
    k_pos = pad_trailing(k_pos.astype(jnp.int32), (0, 0, k_pad), PAD_K_POS)
    if q_buckets is not None:
        q_buckets = pad_trailing(q_buckets.astype(jnp.int32), (0, 0, q_pad))
        k_buckets = pad_trailing(k_buckets.astype(jnp.int32), (0, 0, k_pad))
    return q, k, v, q_pos, k_pos, q_buckets, k_buckets


def index_masked_attention(
    q, k, v, q_pos, k_pos, q_buckets=None, k_buckets=None, *, scale, block_sizes, interpret
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
    d_full = next_power_of_2(head_dim, minimum=16)
    # Wide rows (fp32 at head_dim 128, bf16 at 256) halve the tiles to stay in shared memory.
    shrink = 2 if d_full * q.dtype.itemsize >= 512 else 1

    def fit_block(blk, n):
        """blk (halved for wide rows) capped at n's next power of two, at least 16."""
        return max(16, min(blk // shrink, next_power_of_2(n)))

    bq, bq_bwd = fit_block(bs.block_q, q_len), fit_block(bs.block_q_bwd, q_len)
    bk, bk_bwd = fit_block(bs.block_k, kv_len), fit_block(bs.block_k_bwd, kv_len)
    padded = pad_problem(
        q,
        k,
        v,
        q_pos,
        k_pos,
        q_buckets,
        k_buckets,
        q_multiple=max(bq, bq_bwd),
        k_multiple=max(bk, bk_bwd),
        d_full=d_full,
    )
    num_warps = bs.num_warps if bs.num_warps is not None else _default_num_warps(head_dim)
    static = _Static(
        scale=float(scale),
        block_q=bq,
        block_k=bk,
        block_q_bwd=bq_bwd,
        block_k_bwd=bk_bwd,
        num_warps=num_warps,
        num_stages=bs.num_stages,
        interpret=bool(interpret),
    )
    out = _core(static, *padded)
    return out[:, :q_len, :, :head_dim]
