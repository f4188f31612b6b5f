"""Dense masked references for the sparse attention kernels: the definition, in jnp."""

from __future__ import annotations

import jax.numpy as jnp


def masked_attention_reference(q, k, v, mask, scale=None):
    """Dense attention with an explicit mask; rows with no allowed key give 0.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim].
      mask: [batch, heads, q_len, kv_len] bool.
    Returns [batch, q_len, heads, head_dim], computed in the promoted dtype of q and float32.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    scale = head_dim**-0.5 if scale is None else scale
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


def qk_sparse_attention_reference(q, k, v, q_keep, k_keep, scale=None, segment_ids=None):
    """Dense masked QK-sparse attention (same arguments as :func:`qk_sparse_attention`)."""
    causal = _causal(q.shape[1], segment_ids)
    kk = _group_heads(k_keep, q.shape[2])
    mask = q_keep.transpose(0, 2, 1)[:, :, :, None] & kk.transpose(0, 2, 1)[:, :, None, :] & causal
    return masked_attention_reference(q, k, v, mask, scale)


def hash_sparse_attention_reference(q, k, v, q_buckets, k_buckets, scale=None, segment_ids=None):
    """Dense masked hash-sparse attention (same arguments as :func:`hash_sparse_attention`)."""
    causal = _causal(q.shape[1], segment_ids)
    kb = _group_heads(k_buckets, q.shape[2])
    mask = q_buckets.transpose(0, 2, 1)[:, :, :, None] == kb.transpose(0, 2, 1)[:, :, None, :]
    return masked_attention_reference(q, k, v, mask & causal, scale)
