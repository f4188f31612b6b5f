"""Dynamic sparse causal flash attention (Pagliardini et al. 2023) for Pallas: Triton (GPU) and
Mosaic (TPU).

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
zero-padded to a power of two (>= 16), sequences to a multiple of the tiles.

On TPU (:func:`kernels_pallas._common.platform`, which follows ``target_platform('tpu')``) the
same core runs as Mosaic kernels (:mod:`.kernel_tpu`): the live tile lists are scalar-prefetched
and walked by the grid's last axis, so dead K/V tiles are never fetched; tiles are multiples of
128 rows and head dims are padded to 128 lanes. ``interpret=None`` compiles them there;
asking for interpret mode under ``target_platform('tpu')`` runs them in Pallas' TPU interpret
mode on a CPU (how the tests check them).

Modules, split as jax's splash attention splits mask, mask info and kernel:
:mod:`.reorder` (row orders and permutations), :mod:`.tiles` (live tile lists),
:mod:`.kernel` (the Triton kernels and their custom VJP), :mod:`.kernel_tpu` (the Mosaic
ones), :mod:`.reference` (dense masked definitions). This module checks arguments and composes
them; it re-exports their public names.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas._common import platform, resolve_interpret
from kernels_pallas.sparse_attention.kernel import BlockSizes, index_masked_attention
from kernels_pallas.sparse_attention.kernel_tpu import (
    index_masked_attention as index_masked_attention_tpu,
)
from kernels_pallas.sparse_attention.reference import (
    hash_sparse_attention_reference,
    masked_attention_reference,
    qk_sparse_attention_reference,
)
from kernels_pallas.sparse_attention.reorder import (
    bucket_order,
    compact_order,
    gather_rows,
    inverse_permutation,
    permute_rows,
    segmented_buckets,
    to_rows,
)
from kernels_pallas.sparse_attention.tiles import PAD_K_POS, PAD_Q_POS, live_tiles, tile_ranges


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


def _resolve(q, scale, block_sizes, interpret):
    """Defaults of the public wrappers: the logit scale, the tiles, and the platform."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_sizes = (
        BlockSizes.get_default(head_dim=q.shape[-1]) if block_sizes is None else block_sizes
    )
    interpret = resolve_interpret(interpret)
    return scale, block_sizes, interpret


def _reordered(q, k, v, q_order, k_order, q_pos, k_pos, q_bkt, k_bkt, static_args):
    """Runs the core on rows permuted by q_order/k_order and puts the output back in place."""
    q_inverse, k_inverse = inverse_permutation(q_order), inverse_permutation(k_order)
    qs = permute_rows(q, q_order, q_inverse)
    ks, vs = permute_rows(k, k_order, k_inverse), permute_rows(v, k_order, k_inverse)
    # The platform is read while tracing (the jitted entries' caches are cleared by
    # target_platform), so one trace never serves two platforms.
    core = index_masked_attention_tpu if platform() == "tpu" else index_masked_attention
    out = core(
        qs,
        ks,
        vs,
        to_rows(q_pos),
        to_rows(k_pos),
        None if q_bkt is None else to_rows(q_bkt),
        None if k_bkt is None else to_rows(k_bkt),
        **static_args,
    )
    return permute_rows(out, q_inverse, q_order)


def qk_sparse_attention(
    q, k, v, q_keep, k_keep, *, segment_ids=None, scale=None, block_sizes=None, interpret=None
):
    """Causal attention with dropped queries and keys, skipping the dropped work.

    Validates eagerly (the id checks need concrete values, which ``jax.jit`` would hide), then
    runs the jitted entry point (``scale``, ``block_sizes`` and ``interpret`` static).

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
      q_keep: [batch, seq, heads] bool; k_keep: [batch, seq, kv_heads] bool.
      segment_ids: optional [batch, seq] ints (packed documents): attend only within a segment.
      scale: logit scale, default ``head_dim ** -0.5``.
      block_sizes: :class:`BlockSizes` (default :meth:`BlockSizes.get_default`).
      interpret: run the kernels in interpret mode (None = on CPU); under
        ``target_platform('tpu')`` the Mosaic kernels in Pallas' TPU interpret mode.
    Returns:
      [batch, seq, heads, head_dim]; query ``i`` attends to key ``j`` iff ``q_keep[i]``,
      ``k_keep[j]`` and ``j <= i``; other rows are exactly 0.
    """
    check_qk_arguments(q, k, v, q_keep, k_keep, segment_ids)
    scale, block_sizes, interpret = _resolve(q, scale, block_sizes, interpret)
    return _qk_sparse(
        q,
        k,
        v,
        q_keep,
        k_keep,
        segment_ids,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def _qk_sparse(q, k, v, q_keep, k_keep, segment_ids, *, scale, block_sizes, interpret):
    q_order, q_kept = compact_order(q_keep)
    k_order, k_kept = compact_order(k_keep)
    q_pos = jnp.where(q_kept, q_order, PAD_Q_POS)
    k_pos = jnp.where(k_kept, k_order, PAD_K_POS)
    # Segments ride in the kernels' bucket channel: equal ids are required either way.
    q_seg = k_seg = None
    if segment_ids is not None:
        q_seg = jnp.take_along_axis(segment_ids[:, :, None], q_order, axis=1)
        k_seg = jnp.take_along_axis(segment_ids[:, :, None], k_order, axis=1)
    static_args = dict(scale=scale, block_sizes=block_sizes, interpret=interpret)
    return _reordered(q, k, v, q_order, k_order, q_pos, k_pos, q_seg, k_seg, static_args)


def hash_sparse_attention(
    q,
    k,
    v,
    q_buckets,
    k_buckets,
    *,
    segment_ids=None,
    scale=None,
    block_sizes=None,
    interpret=None,
):
    """Causal attention within hash buckets, skipping the tiles of other buckets.

    Args:
      q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim].
      q_buckets: [batch, seq, heads] int; k_buckets: [batch, seq, kv_heads] int; ids >= 0.
      segment_ids: optional [batch, seq] ints >= 0 (packed documents): attend only within one.
      scale, block_sizes, interpret: as :func:`qk_sparse_attention`.
    Returns:
      [batch, seq, heads, head_dim]; query ``i`` attends to key ``j`` iff the buckets are equal
      and ``j <= i``; a row with no such key is 0.
    """
    check_hash_arguments(q, k, v, q_buckets, k_buckets, segment_ids)
    scale, block_sizes, interpret = _resolve(q, scale, block_sizes, interpret)
    return _hash_sparse(
        q,
        k,
        v,
        q_buckets,
        k_buckets,
        segment_ids,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))
def _hash_sparse(q, k, v, q_buckets, k_buckets, segment_ids, *, scale, block_sizes, interpret):
    q_buckets, k_buckets = segmented_buckets(q_buckets, k_buckets, segment_ids)
    q_order, q_sorted = bucket_order(q_buckets)
    k_order, k_sorted = bucket_order(k_buckets)
    static_args = dict(scale=scale, block_sizes=block_sizes, interpret=interpret)
    return _reordered(q, k, v, q_order, k_order, q_order, k_order, q_sorted, k_sorted, static_args)


__all__ = [
    "BlockSizes",
    "PAD_K_POS",
    "PAD_Q_POS",
    "bucket_order",
    "check_hash_arguments",
    "check_qk_arguments",
    "compact_order",
    "gather_rows",
    "hash_sparse_attention",
    "hash_sparse_attention_reference",
    "index_masked_attention",
    "index_masked_attention_tpu",
    "inverse_permutation",
    "live_tiles",
    "masked_attention_reference",
    "permute_rows",
    "qk_sparse_attention",
    "qk_sparse_attention_reference",
    "segmented_buckets",
    "tile_ranges",
    "to_rows",
]
