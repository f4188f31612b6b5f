"""Tile metadata: which (query tile, key tile) pairs of the reordered rows can hold an allowed
pair, as compacted per-tile lists the kernels loop over (jax's splash attention calls this the
mask info). Computed with jnp before the kernels run."""

from __future__ import annotations

import jax.numpy as jnp

# Sentinel positions for padding: no real key is at or below -1, no real query at or above this.
PAD_Q_POS = -1
PAD_K_POS = 2**30


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
    kp, kbmin, kbmax = _tile_bounds(k_pos, k_buckets, block_k, k_pos < PAD_K_POS)
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


def tile_ranges(tiles, count):
    """The lists of :func:`live_tiles` as ranges: each list's first live tile and the number of
    tiles from it to its last (0 for an empty list), two ints per list instead of one per tile.

    For the TPU kernels, whose per-tile metadata sits in SMEM (1 MiB on v4 and later): the lists
    of 16 heads at 32k tokens in 128-row tiles would take 4 MiB. A range is exact where the live
    tiles are contiguous (always for QK: kept keys, and kept queries, are sorted by position);
    for hash buckets it also covers the dead tiles between two buckets' live ones.
    """
    first = tiles[..., 0]
    last = jnp.take_along_axis(tiles, jnp.maximum(count - 1, 0)[..., None], axis=-1)[..., 0]
    return first, jnp.where(count > 0, last - first + 1, 0)
