"""jaxlab.ops.attention against a float64 NumPy reference written from the definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import ops


def reference_attention(q, k, v, q_pos, kv_pos, *, causal, window=None, q_seg=None, kv_seg=None):
    """softmax(q k^T / sqrt(d) + mask) v, one (batch, head) at a time in float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    groups = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            kh = h // groups
            logits = q[b, :, h] @ k[b, :, kh].T / np.sqrt(dim)
            visible = np.ones_like(logits, dtype=bool)
            for i in range(q_len):
                for j in range(k.shape[1]):
                    if causal and kv_pos[b, j] > q_pos[b, i]:
                        visible[i, j] = False
                    if window is not None and kv_pos[b, j] <= q_pos[b, i] - window:
                        visible[i, j] = False
                    if q_seg is not None and q_seg[b, i] != kv_seg[b, j]:
                        visible[i, j] = False
            logits = np.where(visible, logits, -np.inf)
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            out[b, :, h] = weights @ v[b, :, kh]
    return out


def _inputs(rng, batch, q_len, kv_len, heads, kv_heads, dim):
    q = rng.standard_normal((batch, q_len, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_len, kv_heads, dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 3])
def test_causal_gqa_matches_reference(heads, kv_heads, window):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    q, k, v = _inputs(rng, 2, 11, 11, heads, kv_heads, 8)
    pos = np.broadcast_to(np.arange(11), (2, 11))
    out = ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), sliding_window=window)
    ref = reference_attention(q, k, v, pos, pos, causal=True, window=window)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_positions_define_causality_not_indices():
    """Shuffled keys with their positions give the same output as ordered keys."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 2, 7, 9, 4, 2, 8)
    q_pos = np.stack([rng.permutation(9)[:7] for _ in range(2)])
    kv_pos = np.stack([rng.permutation(9) for _ in range(2)])
    out = ops.attention(
        *(jnp.asarray(x) for x in (q, k, v)),
        q_positions=jnp.asarray(q_pos),
        kv_positions=jnp.asarray(kv_pos),
    )
    ref = reference_attention(q, k, v, q_pos, kv_pos, causal=True)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_segments_block_cross_document_attention():
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, 2, 12, 12, 4, 2, 8)
    seg = np.sort(rng.integers(0, 3, (2, 12)), axis=1)
    pos = np.broadcast_to(np.arange(12), (2, 12))
    out = ops.attention(
        *(jnp.asarray(x) for x in (q, k, v)),
        q_segment_ids=jnp.asarray(seg),
        kv_segment_ids=jnp.asarray(seg),
    )
    ref = reference_attention(q, k, v, pos, pos, causal=True, q_seg=seg, kv_seg=seg)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


def test_non_causal():
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 1, 5, 7, 2, 1, 4)
    pos_q, pos_k = np.broadcast_to(np.arange(5), (1, 5)), np.broadcast_to(np.arange(7), (1, 7))
    out = ops.attention(*(jnp.asarray(x) for x in (q, k, v)), causal=False)
    ref = reference_attention(q, k, v, pos_q, pos_k, causal=False)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)


@pytest.mark.parametrize("q_len, kv_len, window", [(9, 9, None), (4, 9, 3)])
def test_gradients_match_float64_finite_differences(q_len, kv_len, window):
    """q, k and v gradients of the jitted attention (GQA, packed segments) against central
    differences of the float64 reference along random directions."""
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, 2, q_len, kv_len, 6, 2, 8)
    kv_pos = np.broadcast_to(np.arange(kv_len), (2, kv_len))
    q_pos = kv_pos[:, kv_len - q_len :]  # the last q_len positions: every query sees a key
    seg = np.sort(rng.integers(0, 2, (2, kv_len)), axis=1)
    seg[:, -1] = seg[:, -q_len] = seg.max()  # no query sees only keys of other segments
    q_seg = seg[:, kv_len - q_len :]
    weights = rng.standard_normal((2, q_len, 6, 8))
    masks = dict(causal=True, window=window, q_seg=q_seg, kv_seg=seg)

    def loss(q, k, v):
        out = ops.attention(
            q,
            k,
            v,
            q_positions=jnp.asarray(q_pos),
            kv_positions=jnp.asarray(kv_pos),
            sliding_window=window,
            q_segment_ids=jnp.asarray(q_seg),
            kv_segment_ids=jnp.asarray(seg),
        )
        return jnp.sum(out * jnp.asarray(weights, jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    inputs = [np.asarray(x, np.float64) for x in (q, k, v)]
    eps = 1e-6
    for i, g in enumerate(grads):
        direction = rng.standard_normal(inputs[i].shape)

        def reference_loss(step, i=i, direction=direction):
            moved = list(inputs)
            moved[i] = inputs[i] + step * direction
            return np.sum(reference_attention(*moved, q_pos, kv_pos, **masks) * weights)

        numeric = (reference_loss(eps) - reference_loss(-eps)) / (2 * eps)
        analytic = np.sum(np.asarray(g, np.float64) * direction)
        scale = np.sum(np.abs(np.asarray(g, np.float64) * direction))
        assert abs(analytic - numeric) <= 1e-4 * scale, ("qkv"[i], analytic, numeric, scale)


def test_bfloat16_inputs_close_to_float64():
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, 2, 16, 16, 4, 2, 16)
    pos = np.broadcast_to(np.arange(16), (2, 16))
    out = ops.attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    ref = reference_attention(q, k, v, pos, pos, causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(q=(2, 5, 3, 8), k=(2, 5, 2, 8)), "heads=3 must be a multiple of kv_heads=2"),
        (dict(q=(2, 5, 4, 8), k=(2, 5, 2, 4)), r"k\.shape=\(2, 5, 2, 4\)"),
        (dict(q=(2, 5, 4), k=(2, 5, 2, 8)), "rank 4"),
        (dict(impl="nope"), "impl='nope'"),
        (dict(sliding_window=0), "sliding_window must be >= 1"),
        (dict(q_segment_ids=np.zeros((2, 5), np.int32)), "both q_segment_ids and kv_segment_ids"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    q_shape = kwargs.pop("q", (2, 5, 4, 8))
    k_shape = kwargs.pop("k", (2, 5, 2, 8))
    q, k = jnp.zeros(q_shape), jnp.zeros(k_shape)
    with pytest.raises(ValueError, match=message):
        ops.attention(q, k, k, **kwargs)


def _masked_problem(rng, dtype=np.float32):
    """GQA with shuffled positions, two segments and one query that sees no key (its segment
    has no keys)."""
    q, k, v = _inputs(rng, 2, 7, 9, 4, 2, 8)
    q_pos = np.stack([rng.permutation(9)[:7] for _ in range(2)])
    kv_pos = np.stack([rng.permutation(9) for _ in range(2)])
    q_seg = rng.integers(0, 2, (2, 7))
    kv_seg = rng.integers(0, 2, (2, 9))
    q_seg[0, 3] = 5  # no key has segment 5
    masks = dict(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    return [jnp.asarray(x, dtype) for x in (q, k, v)], {
        key: jnp.asarray(x) for key, x in masks.items()
    }


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_written_out_backward_equals_autodiff_of_the_forward(dtype, tol):
    """A traced scale takes autodiff's backward of the same forward: the reference."""
    rng = np.random.default_rng(11)
    (q, k, v), masks = _masked_problem(rng, dtype)
    d_out = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def vjp(scale):
        out, pullback = jax.vjp(
            lambda q, k, v: ops.attention(q, k, v, scale=scale, **masks), q, k, v
        )
        return out, pullback(d_out)

    out, grads = jax.jit(lambda: vjp(8**-0.5))()
    want_out, want = jax.jit(lambda: vjp(jnp.asarray(8**-0.5, jnp.float32)))()
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want_out, np.float32))
    for name, g, w in zip("qkv", grads, want, strict=True):
        assert g.dtype == w.dtype == dtype, name
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), err_msg=name)
    # The query that sees no key averages the values uniformly but gets no gradient.
    assert not np.any(np.asarray(grads[0], np.float32)[0, 3])


def test_the_backward_under_vmap_equals_one_pullback_per_cotangent():
    """DoGE's per-domain gradients: the pullback vmapped over stacked cotangents."""
    rng = np.random.default_rng(12)
    (q, k, v), masks = _masked_problem(rng)
    cotangents = jnp.asarray(rng.standard_normal((3, *q.shape)), jnp.float32)
    _, pullback = jax.vjp(lambda q, k, v: ops.attention(q, k, v, **masks), q, k, v)
    stacked = jax.jit(jax.vmap(pullback))(cotangents)
    for i in range(3):
        for g, one in zip(stacked, jax.jit(pullback)(cotangents[i]), strict=True):
            np.testing.assert_allclose(np.asarray(g[i]), np.asarray(one), rtol=1e-5, atol=1e-6)


def test_forward_over_reverse_through_the_backward_matches_differences_of_gradients():
    """jax.jvp of jax.grad (virtual adversarial training's Hessian-vector product) goes
    through the written-out backward; checked against central differences of the gradient."""
    rng = np.random.default_rng(13)
    (q, k, v), masks = _masked_problem(rng)
    x = jnp.concatenate([q.ravel(), k.ravel(), v.ravel()])
    weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    sizes = np.cumsum([q.size, k.size])

    def loss(x):
        q_, k_, v_ = (
            p.reshape(t.shape) for p, t in zip(jnp.split(x, sizes), (q, k, v), strict=True)
        )
        return jnp.sum(jnp.tanh(ops.attention(q_, k_, v_, **masks)) * weights)

    grad = jax.jit(jax.grad(loss))
    direction = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    _, hvp = jax.jit(lambda x, d: jax.jvp(grad, (x,), (d,)))(x, direction)
    eps = 1e-2
    numeric = (grad(x + eps * direction) - grad(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(
        np.asarray(hvp), np.asarray(numeric), atol=2e-3 * np.abs(numeric).max()
    )
