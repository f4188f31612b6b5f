"""Attention dispatch: one signature, implementations chosen by name.

Layout everywhere: ``q: [batch, q_len, heads, head_dim]``, ``k, v: [batch, kv_len, kv_heads,
head_dim]`` with ``heads`` a multiple of ``kv_heads`` (grouped-query attention). Masking is defined
on *positions*, not on array indices, so that caches, packed sequences and (later) sparse kernels
that drop or reorder tokens share one meaning of "causal":

* causal: key ``j`` is visible to query ``i`` iff ``kv_positions[j] <= q_positions[i]``;
* sliding window ``w``: additionally ``kv_positions[j] > q_positions[i] - w``;
* segments: additionally ``kv_segment_ids[j] == q_segment_ids[i]`` (packed documents).

A query that sees no key (only possible for padding) gets a uniform average instead of NaN.
Kernels register themselves under a name with :func:`register_attention_impl`; models pick one
through their config (``attention_impl``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlab.registry import Registry

# Large finite negative instead of -inf: a fully masked row stays finite.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

AttentionFn = Callable[..., jax.Array]
ATTENTION_IMPLS: Registry[AttentionFn] = Registry(
    "attention implementation", field="attention: impl"
)


def register_attention_impl(name: str, fn: AttentionFn, *, replace: bool = False) -> None:
    """Makes ``fn`` (same keyword signature as :func:`attention`) selectable by ``name``;
    registering a taken name is an error unless ``replace``."""
    ATTENTION_IMPLS.register(name, fn, replace=replace)


def available_impls() -> tuple[str, ...]:
    return ATTENTION_IMPLS.names()


def attention_mask(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    causal: bool,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Boolean visibility mask ``[batch, q_len, kv_len]`` from positions and segment ids."""
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if causal:
        mask &= kp <= qp
    if sliding_window is not None:
        mask &= kp > qp - sliding_window
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return mask


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool,
    sliding_window: int | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    scale: float,
) -> jax.Array:
    """Dense attention in plain jnp; logits and softmax in float32.

    Computed heads-major: queries ``[batch, kv_heads, groups * q_len, head_dim]`` (row
    ``g * q_len + i`` is query ``i`` of the ``g``-th head sharing a kv head) against keys and
    values ``[batch, kv_heads, kv_len, head_dim]``, so both matmuls batch over the leading axes
    and the scores ``[batch, kv_heads, groups * q_len, kv_len]`` are contiguous along the softmax
    axis. From ``[batch, q_len, kv_heads, groups, ...]`` einsums XLA:CPU transposed the scores
    in the softmax and its backward (CPU time on one core, lm_tiny's attention alone: forward
    0.65x, forward + backward 0.77x; the whole model's forward + backward 0.93-0.95x, its
    forward unchanged within noise).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qh = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    qh = qh.reshape(batch, kv_heads, groups * q_len, head_dim)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    logits = logits * scale
    mask = attention_mask(
        q_positions,
        kv_positions,
        causal=causal,
        sliding_window=sliding_window,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    mask = jnp.tile(mask, (1, groups, 1))[:, None]  # [batch, 1, groups * q_len, kv_len]
    logits = jnp.where(mask, logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh, preferred_element_type=jnp.float32)
    out = out.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


register_attention_impl("xla", xla_attention)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Multi-head (grouped-query) attention.

    Args:
      q: [batch, q_len, heads, head_dim] queries.
      k: [batch, kv_len, kv_heads, head_dim] keys; ``heads % kv_heads == 0``.
      v: [batch, kv_len, kv_heads, head_dim] values.
      q_positions: [batch, q_len] int positions; default ``arange(q_len)``.
      kv_positions: [batch, kv_len] int positions; default ``arange(kv_len)``.
      causal: mask keys at later positions than the query.
      sliding_window: if set, also mask keys ``sliding_window`` or more positions back.
      q_segment_ids: [batch, q_len] ints; attention only within equal ids. Needs
        ``kv_segment_ids`` too.
      kv_segment_ids: [batch, kv_len] ints.
      scale: logit scale, default ``head_dim ** -0.5``.
      impl: name of a registered implementation (see :func:`available_impls`).

    Returns:
      [batch, q_len, heads, head_dim] in the dtype of ``q``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects q, k, v of rank 4 [batch, seq, heads, head_dim], got "
            f"q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}"
        )
    batch, q_len, heads, head_dim = q.shape
    _, kv_len, kv_heads, _ = k.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"attention: k and v must be [batch={batch}, kv_len, kv_heads, head_dim={head_dim}] "
            f"and equal, got k.shape={k.shape}, v.shape={v.shape}"
        )
    if heads % kv_heads:
        raise ValueError(f"attention: heads={heads} must be a multiple of kv_heads={kv_heads}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("attention: give both q_segment_ids and kv_segment_ids, or neither")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"attention: sliding_window must be >= 1 or None, got {sliding_window}")
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention: impl={impl!r} is not one of {available_impls()}")
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
    if q_positions.shape != (batch, q_len) or kv_positions.shape != (batch, kv_len):
        raise ValueError(
            f"attention: q_positions must be {(batch, q_len)} and kv_positions {(batch, kv_len)}, "
            f"got {q_positions.shape} and {kv_positions.shape}"
        )
    return ATTENTION_IMPLS.get(impl)(
        q,
        k,
        v,
        q_positions=q_positions,
        kv_positions=kv_positions,
        causal=causal,
        sliding_window=sliding_window,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
        scale=head_dim**-0.5 if scale is None else scale,
    )
