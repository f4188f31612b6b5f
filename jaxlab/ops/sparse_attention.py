"""Dynamic sparse causal attention: QK-dropping and hash buckets, Pallas or XLA.

Same signatures and meaning as :mod:`kernels_pallas.sparse_attention` (read its docstring for the
masks), plus ``impl``: ``'pallas'`` runs the kernels (Triton on GPU, Mosaic on TPU, interpret mode
on CPU), ``'xla'`` the sparse paths below, ``'dense'`` the same function as dense masked attention
in the original order (no sort), ``'auto'`` the kernels on GPU and TPU and on CPU the XLA path
where its static hint says it skips enough work, else ``'dense'`` (:data:`XLA_MAX_WORK`).

The XLA paths keep static shapes, so they save work only through static size hints, and stay exact
when a hint is too small by falling back (``lax.cond``) to the full-size computation:

* QK: compact kept tokens to the front (stable sort), then dense masked attention on the first
  ``capacity = (q_capacity, k_capacity)`` rows; without a hint the compacted length is ``seq``.
* Hash: sort by bucket (stable), then each query tile of ``block`` rows attends to a window of
  ``window`` key tiles starting at the first key of its smallest bucket; without a hint the window
  is the whole sequence. :func:`hash_window` suggests a window for a number of buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxlab.registry import Registry
from kernels_pallas import sparse_attention as kernels
from kernels_pallas._common import platform as kernel_platform

_BIG = jnp.iinfo(jnp.int32).max
QK_SPARSE_IMPLS: Registry[Callable[..., jax.Array]] = Registry(
    "qk_sparse_attention implementation", field="qk_sparse_attention: impl"
)
HASH_SPARSE_IMPLS: Registry[Callable[..., jax.Array]] = Registry(
    "hash_sparse_attention implementation", field="hash_sparse_attention: impl"
)


def available_impls() -> tuple[str, ...]:
    """The ``impl`` names both sparse attentions accept (what a model's config may name)."""
    return tuple(name for name in QK_SPARSE_IMPLS.names() if name in HASH_SPARSE_IMPLS)


def _resolve_auto(impl: str) -> str:
    """``impl``, with ``'auto'`` resolved by platform: the kernels on GPU and TPU, the XLA paths
    on CPU (where the kernels would be emulated); which XLA path, the shapes decide
    (:func:`qk_auto_impl`, :func:`hash_auto_impl`)."""
    if impl != "auto":
        return impl
    return "pallas" if kernel_platform() in ("gpu", "tpu") else "xla"


def needs_per_shard(impl: str) -> bool:
    """Whether a sharded model must run ``impl`` per shard (``jax.shard_map``): the Pallas
    kernels, which XLA cannot partition (it refuses Mosaic calls, and would gather a Triton
    call's operands onto every device); the XLA paths it partitions itself, as the scans' per
    shard helper does for every path. The platform is the one traced for."""
    return _resolve_auto(impl) == "pallas" and kernel_platform() in ("gpu", "tpu")


def _masked(qs, ks, vs, q_pos, k_pos, q_bkt, k_bkt, scale):
    """Dense masked attention of reordered rows; *_pos/*_bkt: [batch, rows, heads or kv_heads]."""
    groups = qs.shape[2] // ks.shape[2]

    def per_q_head(x):
        return jnp.repeat(x, groups, axis=2).transpose(0, 2, 1)

    mask = q_pos.transpose(0, 2, 1)[..., :, None] >= per_q_head(k_pos)[..., None, :]
    if q_bkt is not None:
        mask &= q_bkt.transpose(0, 2, 1)[..., :, None] == per_q_head(k_bkt)[..., None, :]
    return masked_attention(qs, ks, vs, mask, scale=scale)


def masked_attention(q, k, v, mask, *, scale=None):
    """Dense attention under an explicit mask ``[batch, heads, q_len, kv_len]``; a query with no
    visible key gives 0 (decoding with a sparse pattern, where the mask is cheap to build).

    The function of ``kernels_pallas.sparse_attention.masked_attention_reference``, but computed
    by ``jax.nn.dot_product_attention`` (XLA; its softmax is float32 even for float64 inputs,
    use the reference for float64 precision), with empty rows
    zeroed on the output: the reference's explicit max/exp/sum, differentiated as written, made
    forward+backward 1.6-1.8x slower on a 2-core CPU (seq 1k-2k, 4 heads of 64, QK mask), and
    jax's form was another 1.2-1.3x faster than the same formula with ``jax.nn.softmax``.
    """
    batch, q_len, heads, _ = q.shape
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(mask).astype(bool), (batch, heads, q_len, k.shape[1]))
    q32, k32, v32 = (x.astype(dtype) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q32, k32, v32, mask=mask, scale=scale, implementation="xla")
    seen = jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]  # [batch, q_len, heads, 1]
    return jnp.where(seen, out, 0.0).astype(q.dtype)


def _unsort(out, order, inverse):
    """Output rows back to original positions; rows past ``out``'s length (not computed) are 0."""
    out = jnp.pad(out, ((0, 0), (0, order.shape[1] - out.shape[1]), (0, 0), (0, 0)))
    return kernels.permute_rows(out, inverse, order)


def _exact_cond(fits, small, full):
    """``small()`` when ``fits``, else ``full()``, both rematerialised in the backward pass.

    Without the remat, differentiating ``lax.cond`` keeps the residuals of both branches (the
    untaken one as zeros): the full-size branch's attention matrices would cost memory and time
    even when the small branch runs.
    """
    return lax.cond(fits, jax.checkpoint(small), jax.checkpoint(full))


def _rows_of(x, batch, seq, hh):
    """``x`` ([seq] or [batch, seq]) broadcast to the per-row layout ``[batch, seq, hh]``."""
    return jnp.broadcast_to(x[..., None], (batch, seq, hh))


def qk_dense_xla(q, k, v, q_keep, k_keep, *, scale, segment_ids=None):
    """The QK-sparse function by dense masked attention in the original order: the XLA path's
    masking (:func:`_masked` on positions, dropped queries at -1 and keys past every query)
    without its sort, for when the sort and gathers cost more than the dropped work saves."""
    batch, seq, heads, _ = q.shape
    kv_heads = k.shape[2]
    pos = jnp.arange(seq, dtype=jnp.int32)
    q_pos = jnp.where(q_keep, _rows_of(pos, batch, seq, heads), -1)
    k_pos = jnp.where(k_keep, _rows_of(pos, batch, seq, kv_heads), _BIG)
    q_seg = k_seg = None
    if segment_ids is not None:
        q_seg = _rows_of(segment_ids, batch, seq, heads)
        k_seg = _rows_of(segment_ids, batch, seq, kv_heads)
    return _masked(q, k, v, q_pos, k_pos, q_seg, k_seg, scale)


def _capacity_rows(seq, capacity):
    """The (q_rows, k_rows) the QK XLA path computes under ``capacity``: rounded up to multiples
    of 128 rows, which keep the matmuls on shapes XLA tiles well, and at most ``seq``."""
    return tuple(min(-(-int(c) // 128) * 128, seq) for c in capacity)


def qk_sparse_xla(q, k, v, q_keep, k_keep, *, scale, segment_ids=None, capacity=None):
    """XLA QK-sparse attention: compaction then dense attention on ``capacity`` rows."""
    seq = q.shape[1]
    q_order, q_kept = kernels.compact_order(q_keep)
    k_order, k_kept = kernels.compact_order(k_keep)
    q_inverse = kernels.inverse_permutation(q_order)
    k_inverse = kernels.inverse_permutation(k_order)

    def run(q_rows, k_rows):
        qo, ko = q_order[:, :q_rows], k_order[:, :k_rows]
        q_pos = jnp.where(q_kept[:, :q_rows], qo, -1)
        k_pos = jnp.where(k_kept[:, :k_rows], ko, _BIG)
        q_seg = k_seg = None
        if segment_ids is not None:
            q_seg, k_seg = (
                kernels.gather_rows(segment_ids[:, :, None], qo),
                kernels.gather_rows(segment_ids[:, :, None], ko),
            )
        qs = kernels.permute_rows(q, qo, q_inverse)
        ks, vs = kernels.permute_rows(k, ko, k_inverse), kernels.permute_rows(v, ko, k_inverse)
        out = _masked(qs, ks, vs, q_pos, k_pos, q_seg, k_seg, scale)
        return _unsort(out, q_order, q_inverse)

    if capacity is None or tuple(capacity) == (seq, seq):
        return run(seq, seq)
    q_rows, k_rows = _capacity_rows(seq, capacity)
    fits = (jnp.max(jnp.sum(q_keep, axis=1)) <= q_rows) & (
        jnp.max(jnp.sum(k_keep, axis=1)) <= k_rows
    )
    return _exact_cond(fits, lambda: run(q_rows, k_rows), lambda: run(seq, seq))


def hash_window(seq: int, num_buckets: int, block: int = 128, slack: float = 2.0) -> int:
    """Key tiles per query tile for buckets up to ``slack`` times their mean size.

    A query tile of ``block`` sorted rows needs the keys of the buckets it touches: about
    ``block + bucket size`` keys when queries and keys are spread alike, plus one tile for
    misalignment at each end.
    """
    mean_bucket = seq / num_buckets
    tiles = math.ceil((block + slack * mean_bucket) / block) + 2
    return min(tiles, math.ceil(seq / block))


def hash_dense_xla(q, k, v, q_buckets, k_buckets, *, scale, segment_ids=None):
    """The hash-sparse function by dense masked attention in the original order: the XLA path's
    masking (:func:`_masked` on positions and per-document buckets) without its sort."""
    batch, seq, heads, _ = q.shape
    pos = jnp.arange(seq, dtype=jnp.int32)
    q_bkt, k_bkt = kernels.segmented_buckets(q_buckets, k_buckets, segment_ids)
    q_pos, k_pos = (_rows_of(pos, batch, seq, x.shape[2]) for x in (q_bkt, k_bkt))
    return _masked(q, k, v, q_pos, k_pos, q_bkt, k_bkt, scale)


def _hash_tiles(seq, block):
    """(block, tiles): the hash XLA path's tile rows (at most ``seq``) and query tiles."""
    block = min(block, seq)
    return block, -(-seq // block)


def hash_sparse_xla(
    q, k, v, q_buckets, k_buckets, *, scale, segment_ids=None, block=128, window=None
):
    """XLA hash-sparse attention: sort by bucket, query tiles attend to windows of key tiles."""
    batch, seq, heads, _ = q.shape
    groups = heads // k.shape[2]
    block, tiles = _hash_tiles(seq, block)
    padded = tiles * block
    q_buckets, k_buckets = kernels.segmented_buckets(q_buckets, k_buckets, segment_ids)
    q_order, q_sorted = kernels.bucket_order(q_buckets)
    k_order, k_sorted = kernels.bucket_order(k_buckets)

    def pad(x, value):
        return jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0)), constant_values=value)

    # Keys per query head (GQA), sorted by bucket; padding sorts last and matches nothing.
    head_of = jnp.arange(heads) // groups
    q_inverse = kernels.inverse_permutation(q_order)
    k_inverse = kernels.inverse_permutation(k_order)
    ks = kernels.permute_rows(k, k_order, k_inverse)[:, :, head_of]
    vs = kernels.permute_rows(v, k_order, k_inverse)[:, :, head_of]
    ks = jnp.pad(ks, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
    vs = jnp.pad(vs, ((0, 0), (0, padded - seq), (0, 0), (0, 0)))
    k_pos, k_bkt = pad(k_order[:, :, head_of], _BIG), pad(k_sorted[:, :, head_of], _BIG)
    qs = jnp.pad(
        kernels.permute_rows(q, q_order, q_inverse), ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    )
    q_pos, q_bkt = pad(q_order, -1), pad(q_sorted, -1)

    def tile_rows(x):
        return x.reshape(batch, tiles, block, *x.shape[2:])

    def run(width):
        start = jnp.clip(first, 0, tiles - width)  # [batch, q_tiles, heads]
        rows = start[..., None] * block + jnp.arange(width * block)  # [b, qt, h, width*block]
        rows = rows.transpose(0, 1, 3, 2)  # [b, qt, width*block, h]

        def gather(x):
            return jnp.take_along_axis(
                x[:, None], rows.reshape(rows.shape + (1,) * (x.ndim - 3)), axis=2
            )

        kw, vw, kpw, kbw = gather(ks), gather(vs), gather(k_pos), gather(k_bkt)

        def q_tiles(x):
            return tile_rows(x)

        def rows_q(x):
            return q_tiles(x).transpose(0, 1, 3, 2)[..., :, None]

        def cols_k(x):
            return x.transpose(0, 1, 3, 2)[..., None, :]

        mask = (rows_q(q_pos) >= cols_k(kpw)) & (rows_q(q_bkt) == cols_k(kbw))

        def fold(x):
            return x.reshape(batch * tiles, *x.shape[2:])

        out = masked_attention(fold(q_tiles(qs)), fold(kw), fold(vw), fold(mask), scale=scale)
        return _unsort(out.reshape(batch, padded, heads, -1)[:, :seq], q_order, q_inverse)

    def dense():  # every query against every key, on the sorted rows
        out = _masked(
            qs[:, :seq],
            ks[:, :seq],
            vs[:, :seq],
            q_pos[:, :seq],
            k_pos[:, :seq],
            q_bkt[:, :seq],
            k_bkt[:, :seq],
            scale,
        )
        return _unsort(out, q_order, q_inverse)

    if window is None or window >= tiles:
        return dense()
    valid = tile_rows(q_pos >= 0)
    bmin = jnp.min(jnp.where(valid, tile_rows(q_bkt), _BIG), axis=2)  # [batch, tiles, heads]
    bmax = jnp.max(jnp.where(valid, tile_rows(q_bkt), -1), axis=2)
    # First and one-past-last key of each query tile's bucket range, in tiles.
    first = jnp.sum(k_bkt[:, None] < bmin[:, :, None], axis=2) // block
    last = -(-jnp.sum(k_bkt[:, None] <= bmax[:, :, None], axis=2) // block)
    fits = jnp.all(last - first <= window)
    return _exact_cond(fits, lambda: run(window), dense)


# The largest fraction of dense work at which ``'auto'`` runs an XLA sparse path on CPU. Measured
# on the bench's shapes and inputs (experiments/bench/attention.py: forward+backward, batch 1,
# 4 heads of 64, float32; QK capacity = rows kept, hash windows from hash_window for 4-32
# buckets), 2 cores at load 6-7, as the sparse path's time over the dense masked path's (the
# same function), median of 5:
#   seq 1k  QK work 0.25 / 0.39 / 0.56 / 0.77: 0.39 / 0.47 / 0.93 / 1.22
#           hash work 0.62 / 0.88: 0.74 / 1.24
#   seq 2k  QK work 0.25 / 0.39 / 0.56 / 0.77: 0.21 / 0.24 / 0.37 / 0.60
#           hash work 0.25 / 0.31 / 0.44 / 0.69: 0.21 / 0.29 / 0.47 / 0.53
# The sort, gathers and windows pay for themselves at every measured fraction from seq 2k on, and
# at seq 1k up to about 0.6 of the work but not from 0.77: the threshold sits between.
XLA_MAX_WORK = 0.7


def qk_xla_work(seq: int, capacity=None) -> float:
    """Fraction of the dense ``[seq, seq]`` logits that the QK XLA path computes under
    ``capacity`` (the static hint of :func:`qk_sparse_attention`)."""
    if capacity is None:
        return 1.0
    q_rows, k_rows = _capacity_rows(seq, capacity)
    return q_rows * k_rows / seq**2


def hash_xla_work(seq: int, window=None, block: int = 128) -> float:
    """Fraction of the dense ``[seq, seq]`` logits that the hash XLA path computes with
    ``window`` key tiles of ``block`` rows per query tile (:func:`hash_sparse_attention`)."""
    block, tiles = _hash_tiles(seq, block)
    if window is None or window >= tiles:
        return 1.0
    return tiles * block * window * block / seq**2


def _auto_impl(work: float) -> str:
    """The kernels on GPU and TPU; on CPU the XLA sparse path when it computes at most
    :data:`XLA_MAX_WORK` of the dense logits (``work``), else ``'dense'``."""
    impl = _resolve_auto("auto")
    return "dense" if impl == "xla" and work > XLA_MAX_WORK else impl


def qk_auto_impl(seq: int, capacity=None) -> str:
    """The implementation ``impl='auto'`` runs for QK-sparse attention (:func:`_auto_impl` of
    :func:`qk_xla_work`)."""
    return _auto_impl(qk_xla_work(seq, capacity))


def hash_auto_impl(seq: int, window=None, block: int = 128) -> str:
    """The implementation ``impl='auto'`` runs for hash-sparse attention (:func:`_auto_impl` of
    :func:`hash_xla_work`)."""
    return _auto_impl(hash_xla_work(seq, window, block))


def _qk_auto(q, k, v, q_keep, k_keep, *, capacity, **kw):
    kernels.check_qk_arguments(q, k, v, q_keep, k_keep, kw["segment_ids"])
    impl = QK_SPARSE_IMPLS.get(qk_auto_impl(q.shape[1], capacity))
    return impl(q, k, v, q_keep, k_keep, capacity=capacity, **kw)


def _qk_dense(q, k, v, q_keep, k_keep, *, segment_ids, scale, block_sizes, interpret, capacity):
    del block_sizes, interpret, capacity
    kernels.check_qk_arguments(q, k, v, q_keep, k_keep, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return qk_dense_xla(q, k, v, q_keep, k_keep, scale=scale, segment_ids=segment_ids)


def _qk_pallas(q, k, v, q_keep, k_keep, *, capacity, **kw):
    del capacity  # the kernels skip dropped tiles without a hint
    return kernels.qk_sparse_attention(q, k, v, q_keep, k_keep, **kw)


def _qk_xla(q, k, v, q_keep, k_keep, *, segment_ids, scale, block_sizes, interpret, capacity):
    del block_sizes, interpret
    kernels.check_qk_arguments(q, k, v, q_keep, k_keep, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return qk_sparse_xla(
        q, k, v, q_keep, k_keep, scale=scale, segment_ids=segment_ids, capacity=capacity
    )


QK_SPARSE_IMPLS.register("auto", _qk_auto)
QK_SPARSE_IMPLS.register("pallas", _qk_pallas)
QK_SPARSE_IMPLS.register("xla", _qk_xla)
QK_SPARSE_IMPLS.register("dense", _qk_dense)


def qk_sparse_attention(
    q,
    k,
    v,
    q_keep,
    k_keep,
    *,
    segment_ids=None,
    scale=None,
    impl="auto",
    block_sizes=None,
    interpret=None,
    capacity=None,
):
    """QK-sparse causal attention (as ``kernels_pallas.sparse_attention.qk_sparse_attention``).

    Args:
      impl: a name in :data:`QK_SPARSE_IMPLS` (see the module docstring).
      capacity: XLA only: static (q_rows, k_rows) bounds on kept tokens per (batch, head).
    """
    return QK_SPARSE_IMPLS.get(impl)(
        q,
        k,
        v,
        q_keep,
        k_keep,
        segment_ids=segment_ids,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
        capacity=capacity,
    )


def _hash_auto(q, k, v, q_buckets, k_buckets, *, window, block, **kw):
    kernels.check_hash_arguments(q, k, v, q_buckets, k_buckets, kw["segment_ids"])
    impl = HASH_SPARSE_IMPLS.get(hash_auto_impl(q.shape[1], window, block))
    return impl(q, k, v, q_buckets, k_buckets, window=window, block=block, **kw)


def _hash_dense(
    q, k, v, q_buckets, k_buckets, *, segment_ids, scale, block_sizes, interpret, window, block
):
    del block_sizes, interpret, window, block
    kernels.check_hash_arguments(q, k, v, q_buckets, k_buckets, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return hash_dense_xla(q, k, v, q_buckets, k_buckets, scale=scale, segment_ids=segment_ids)


def _hash_pallas(q, k, v, q_buckets, k_buckets, *, window, block, **kw):
    del window, block  # the kernels find each tile's keys themselves
    return kernels.hash_sparse_attention(q, k, v, q_buckets, k_buckets, **kw)


def _hash_xla(
    q, k, v, q_buckets, k_buckets, *, segment_ids, scale, block_sizes, interpret, window, block
):
    del block_sizes, interpret
    kernels.check_hash_arguments(q, k, v, q_buckets, k_buckets, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return hash_sparse_xla(
        q,
        k,
        v,
        q_buckets,
        k_buckets,
        scale=scale,
        segment_ids=segment_ids,
        block=block,
        window=window,
    )


HASH_SPARSE_IMPLS.register("auto", _hash_auto)
HASH_SPARSE_IMPLS.register("pallas", _hash_pallas)
HASH_SPARSE_IMPLS.register("xla", _hash_xla)
HASH_SPARSE_IMPLS.register("dense", _hash_dense)


def hash_sparse_attention(
    q,
    k,
    v,
    q_buckets,
    k_buckets,
    *,
    segment_ids=None,
    scale=None,
    impl="auto",
    block_sizes=None,
    interpret=None,
    window=None,
    block=128,
):
    """Hash-sparse causal attention (as ``kernels_pallas.sparse_attention.hash_sparse_attention``).

    Args:
      impl: a name in :data:`HASH_SPARSE_IMPLS` (see the module docstring).
      window, block: XLA only: key tiles of ``block`` rows per query tile (:func:`hash_window`).
    """
    return HASH_SPARSE_IMPLS.get(impl)(
        q,
        k,
        v,
        q_buckets,
        k_buckets,
        segment_ids=segment_ids,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
        window=window,
        block=block,
    )
