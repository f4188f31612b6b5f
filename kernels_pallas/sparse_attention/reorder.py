"""Row orders of the sparse patterns: the kept-first compaction (QK) and the sort by bucket
(hash), both stable along seq, and the permutations that move rows there and back."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def to_rows(x):
    """[batch, seq, hh] -> [batch, hh, seq] int32, the kernels' layout for per-row tables."""
    return x.transpose(0, 2, 1).astype(jnp.int32)


def compact_order(keep):
    """Stable kept-first order along seq, and whether each slot of that order holds a kept row."""
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)
    count = jnp.sum(keep, axis=1, dtype=jnp.int32)
    kept = jnp.arange(keep.shape[1], dtype=jnp.int32)[None, :, None] < count[:, None, :]
    return order, kept


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
