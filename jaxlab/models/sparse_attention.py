"""Dynamic sparse attention variants for the Transformer (Pagliardini et al. 2023).

``TransformerConfig.sparse_attention = SparseAttentionConfig(kind=...)`` replaces every layer's
dense causal attention by one of:

* ``hash``: each query and key is hashed per head by a fixed random projection (the paper's LM):
  ``bucket(x) = argmax([x R, -x R])`` with ``R: [head_dim, num_buckets / 2]`` drawn from
  ``(seed, layer, kv head)`` and normalised per column; queries use their kv head's ``R``, so
  queries and keys that point the same way share a bucket. Hashing happens after RoPE, on the very
  vectors whose dot products are the logits. Attention is causal within a bucket.
* ``qk``: each (layer, head, position) keeps its query and its key with probability ``keep_rate``,
  decided by a fixed integer hash of ``(seed, layer, head, position)``: the random query/key
  dropping of the paper's QK-sparse LM, reproducible across steps, evaluation and decoding
  because it depends on the position only. A dropped query's attention output is 0 (the residual
  carries the token on).

Training and prefill run :mod:`jaxlab.ops.sparse_attention` (the Pallas kernels on GPU and TPU,
XLA on CPU); decoding with a KV cache computes the same mask densely (buckets of cached keys are
recomputed from the cache), so generation sees exactly the attention the model was trained with.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlab.models.partitioning import per_shard
from jaxlab.ops import sparse_attention as sparse_ops

KINDS = ("hash", "qk")


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Attributes:
    kind: ``'hash'`` or ``'qk'``.
    num_buckets: hash buckets per head (even, >= 2).
    keep_rate: QK: probability that a query (and, independently, a key) is kept.
    impl: ``'auto'`` (Pallas on GPU and TPU; on CPU the XLA sparse path where its work bound
      skips enough, else dense masked attention), ``'xla'``, ``'dense'`` or ``'pallas'``.
    seed: seed of the hash projections / keep decisions.
    slack: XLA paths: static work bound as a multiple of the expected size (exact regardless).
    """

    kind: str
    num_buckets: int = 8
    keep_rate: float = 0.5
    impl: str = "auto"
    seed: int = 0
    slack: float = 2.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(
                f"SparseAttentionConfig.kind must be one of {KINDS}, got {self.kind!r}"
            )
        if self.num_buckets < 2 or self.num_buckets % 2:
            raise ValueError(
                f"SparseAttentionConfig.num_buckets must be even and >= 2, got {self.num_buckets}"
            )
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(
                f"SparseAttentionConfig.keep_rate must be in (0, 1], got {self.keep_rate}"
            )
        if self.impl not in sparse_ops.available_impls():
            raise ValueError(
                f"SparseAttentionConfig.impl must be one of {sparse_ops.available_impls()}, "
                f"got {self.impl!r}"
            )
        if self.slack < 1.0:
            raise ValueError(f"SparseAttentionConfig.slack must be >= 1, got {self.slack}")


def hash_projections(config: SparseAttentionConfig, layer: int, kv_heads: int, head_dim: int):
    """[kv_heads, head_dim, num_buckets // 2] unit-norm columns, fixed by (seed, layer)."""
    key = jax.random.fold_in(jax.random.key(config.seed), layer)
    r = jax.random.normal(key, (kv_heads, head_dim, config.num_buckets // 2), jnp.float32)
    return r / jnp.linalg.norm(r, axis=1, keepdims=True)


def hash_buckets(x: jax.Array, projections: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim] (heads a multiple of kv_heads) -> [batch, seq, heads]."""
    groups = x.shape[2] // projections.shape[0]
    r = jnp.repeat(projections, groups, axis=0)
    proj = jnp.einsum("bshd,hdn->bshn", x.astype(jnp.float32), r)
    return jnp.argmax(jnp.concatenate([proj, -proj], axis=-1), axis=-1).astype(jnp.int32)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (murmur3 fmix32): nearby inputs give unrelated outputs."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def keep_mask(
    config: SparseAttentionConfig, layer: int, role: int, positions: jax.Array, heads: int
) -> jax.Array:
    """[batch, seq, heads] bool: keep decisions for queries (role 0) or keys (role 1)."""
    salt = _mix(jnp.uint32((config.seed * 7919 + layer * 2 + role + 1) % 2**32))
    pos = positions.astype(jnp.uint32)[:, :, None]
    head = jnp.arange(heads, dtype=jnp.uint32)[None, None, :]
    bits = _mix(_mix(pos ^ salt) + head * jnp.uint32(0x9E3779B9))
    threshold = min(int(config.keep_rate * 2.0**32), 2**32 - 1)
    return bits < jnp.uint32(threshold) if config.keep_rate < 1.0 else jnp.ones(bits.shape, bool)


# Logical axes of the sparse attention's arguments: independent per (batch, head), so a mesh
# may split both (GQA: a kv head's group of query heads stays on its device when kv_heads
# divides by the same axes as heads).
_Q_AXES = ("batch", "seq", "heads", "head_dim")
_KV_AXES = ("batch", "seq", "kv_heads", "head_dim")
_Q_ROWS = ("batch", "seq", "heads")
_KV_ROWS = ("batch", "seq", "kv_heads")
_SEGMENTS = ("batch", "seq")


def sparse_attention(config: SparseAttentionConfig, layer: int, q, k, v, positions, segment_ids):
    """Training / prefill attention of one layer; q, k, v as in ``jaxlab.ops.attention``.

    The kernels run per shard inside a sharded model where XLA cannot partition them (the TPU
    kernels: :func:`jaxlab.ops.sparse_attention.needs_per_shard`)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if config.kind == "hash":
        r = hash_projections(config, layer, kv_heads, head_dim)
        block = min(128, seq)
        window = sparse_ops.hash_window(seq, config.num_buckets, block, config.slack)
        q_rows, k_rows = hash_buckets(q, r), hash_buckets(k, r)

        def attend(q, k, v, q_buckets, k_buckets, segment_ids):
            return sparse_ops.hash_sparse_attention(
                q,
                k,
                v,
                q_buckets,
                k_buckets,
                segment_ids=segment_ids,
                impl=config.impl,
                window=window,
                block=block,
            )

    else:
        q_rows = keep_mask(config, layer, 0, positions, heads)
        k_rows = keep_mask(config, layer, 1, positions, kv_heads)
        p = config.keep_rate
        rows = min(seq, math.ceil(seq * p + config.slack * 2.0 * math.sqrt(seq * p * (1 - p)) + 1))

        def attend(q, k, v, q_keep, k_keep, segment_ids):
            return sparse_ops.qk_sparse_attention(
                q,
                k,
                v,
                q_keep,
                k_keep,
                segment_ids=segment_ids,
                impl=config.impl,
                capacity=(rows, rows),
            )

    if sparse_ops.needs_per_shard(config.impl):
        in_axes = (_Q_AXES, _KV_AXES, _KV_AXES, _Q_ROWS, _KV_ROWS, _SEGMENTS)
        # Attention reads every earlier key and sums over head_dim: neither may split.
        attend = per_shard(attend, in_axes, _Q_AXES, whole=("seq", "head_dim"))
    return attend(q, k, v, q_rows, k_rows, segment_ids)


def sparse_attention_mask(
    config: SparseAttentionConfig, layer: int, q, k, q_positions, kv_positions
) -> jax.Array:
    """[batch, heads, q_len, kv_len] bool: the sparse pattern (causal included) for decoding."""
    heads, kv_heads = q.shape[2], k.shape[2]
    groups = heads // kv_heads
    causal = kv_positions[:, None, None, :] <= q_positions[:, None, :, None]

    def to_rows(x):
        return x.transpose(0, 2, 1)

    if config.kind == "hash":
        r = hash_projections(config, layer, kv_heads, q.shape[3])
        qb = to_rows(hash_buckets(q, r))
        kb = to_rows(jnp.repeat(hash_buckets(k, r), groups, axis=2))
        return causal & (qb[:, :, :, None] == kb[:, :, None, :])
    q_keep = to_rows(keep_mask(config, layer, 0, q_positions, heads))
    k_keep = to_rows(jnp.repeat(keep_mask(config, layer, 1, kv_positions, kv_heads), groups, 2))
    return causal & q_keep[:, :, :, None] & k_keep[:, :, None, :]
