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

import functools
import numbers
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
    forward unchanged within noise). The backward is written out (:func:`_attention_core`), so
    forward-mode differentiation straight through it (``jax.jvp``, ``jax.jacfwd``) is refused;
    forward-over-reverse (``jax.jvp`` of ``jax.grad``, as virtual adversarial training uses) works.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qh = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    qh = qh.reshape(batch, kv_heads, groups * q_len, head_dim)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mask = attention_mask(
        q_positions,
        kv_positions,
        causal=causal,
        sliding_window=sliding_window,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    mask = jnp.tile(mask, (1, groups, 1))[:, None]  # [batch, 1, groups * q_len, kv_len]
    if isinstance(scale, numbers.Real):
        out = _attention_core(qh, kh, vh, mask, float(scale))
    else:  # a scale that is no Python number (traced, learned) keeps autodiff's backward
        out = _attention_core_forward(qh, kh, vh, mask, scale)[0]
    out = out.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_core(qh, kh, vh, mask, scale):
    """``softmax(where(mask, qh kh^T * scale, -big)) vh`` heads-major, the output in float32.

    Its backward is flash attention's, densely: it keeps the softmax's log-normaliser per query
    instead of the probabilities ``P`` and recomputes them from ``qh kh^T``; with
    ``dP = dO vh^T``, the softmax's ``sum_s P * dP`` is ``sum_d dO * O`` (``O = P vh``), a
    reduction over ``head_dim`` instead of over the keys; masked logits get zero gradient, and a
    query that sees no key (uniform weights) gives each value its share of ``dO`` directly.
    Against jax's autodiff of the softmax forward (lm_tiny's loss and gradients, CPU, 2 cores,
    same process, alternating): XLA temp 236 -> 212 MiB and time equal within noise (medians
    437 vs 438, 462 vs 475 ms) at batch 16 x 128; 428 -> 309 MiB and 699 vs 781 ms at 4 x 512.
    (Keeping ``P`` instead, attention alone ran faster, the whole step not, and held more.) As in
    flash attention, the recomputed ``P`` carries the log-normaliser's float32 rounding: a relative
    error ~|logit| * 2^-24, so gradients as exact as autodiff's for logits of order 1 to 10 and
    about 10x further off at |logits| ~ 1e3.
    """
    return _attention_core_forward(qh, kh, vh, mask, scale)[0]


def _masked_logits(qh, kh, mask, scale, fill=_MASK_VALUE):
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    return jnp.where(mask, logits * scale, fill)


def _attention_core_forward(qh, kh, vh, mask, scale):
    logits = _masked_logits(qh, kh, mask, scale)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - row_max)
    row_sum = jnp.sum(exp, axis=-1, keepdims=True)
    probs = exp / row_sum
    out = jnp.einsum(
        "bkqs,bksd->bkqd", probs.astype(vh.dtype), vh, preferred_element_type=jnp.float32
    )
    return out, (qh, kh, vh, mask, row_max + jnp.log(row_sum), out)


def _attention_core_backward(scale, residuals, d_out):
    qh, kh, vh, mask, log_normaliser, out = residuals
    probs = jnp.exp(_masked_logits(qh, kh, mask, scale, fill=-jnp.inf) - log_normaliser)
    dv = jnp.einsum(
        "bkqs,bkqd->bksd", probs.astype(vh.dtype), d_out, preferred_element_type=jnp.float32
    )
    # A query that sees no key averaged all values uniformly (its probs above are 0): its share.
    sees_none = jnp.logical_not(jnp.any(mask, axis=-1, keepdims=True))  # [batch, 1, rows, 1]
    uniform = jnp.sum(jnp.where(sees_none, d_out, 0.0), axis=2, keepdims=True) / probs.shape[-1]
    dv = dv + uniform.astype(dv.dtype)
    d_probs = jnp.einsum("bkqd,bksd->bkqs", d_out, vh, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out * out, axis=-1, keepdims=True)  # = sum over keys of probs * d_probs
    # Masked logits (all of a row that sees no key) have probs 0 here: no gradient.
    d_logits = probs * (d_probs - row) * scale
    dq = jnp.einsum("bkqs,bksd->bkqd", d_logits, kh, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkqs,bkqd->bksd", d_logits, qh, preferred_element_type=jnp.float32)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype), None


_attention_core.defvjp(_attention_core_forward, _attention_core_backward)


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
