"""Hidden states and attention probabilities returned by model calls.

Residuals are checked against the blocks called one by one by hand (and the DenseFormer's depth
averages recomputed from its weights in float64 NumPy); attention probabilities against a float64
NumPy softmax of ``q k^T / sqrt(d)`` under the causal / sliding-window / segment mask, with q and k
projected, normalised and rotated in NumPy from the layer's own parameters.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.models import HiddenStates, MambaConfig, TransformerConfig
from jaxlab.models.denseformer import DWAConfig
from jaxlab.models.mamba import MambaBlock

BATCH, SEQ = 2, 13
TRANSFORMER = TransformerConfig(
    vocab_size=37,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
MAMBA = MambaConfig(
    vocab_size=37,
    hidden_size=32,
    num_layers=3,
    state_size=8,
    head_dim=16,
    chunk_size=8,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)


def randomize(model, seed, scale=0.2):
    """Replaces every parameter by random normal values (biases and DWA weights included, which
    start at constants, so that each of them matters to the checks)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(0, scale, x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def packed_inputs(seed, vocab):
    """Row 0 one document; row 1 two packed documents (positions restart, segment ids change)."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (BATCH, SEQ)), jnp.int32)
    positions = np.stack([np.arange(SEQ), np.r_[np.arange(6), np.arange(SEQ - 6)]])
    segments = np.stack([np.zeros(SEQ), np.r_[np.zeros(6), np.ones(SEQ - 6)]])
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)


# ----------------------------------------------------------------------------- NumPy references


def np_rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, positions, theta):
    """Half-split rotary embedding of x: [batch, seq, heads, head_dim], unscaled frequencies."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2) / d)
    angles = positions[:, :, None, None] * inv_freq
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate(
        [x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1
    )


def np_attention_probs(block, h, positions, segments, config):
    """[batch, heads, seq, seq] float64 probabilities of ``block`` (a Llama block) on input h."""

    def f64(a):
        return np.asarray(a[...], np.float64)

    attn = block.attn
    x = np_rmsnorm(np.asarray(h, np.float64), f64(block.input_norm.scale), config.rms_norm_eps)
    q = np.einsum("bse,ehd->bshd", x, f64(attn.q_proj))
    k = np.einsum("bse,ehd->bshd", x, f64(attn.k_proj))
    if config.attention_bias:
        q, k = q + f64(attn.q_bias), k + f64(attn.k_bias)
    positions = np.asarray(positions, np.float64)
    q, k = np_rope(q, positions, config.rope_theta), np_rope(k, positions, config.rope_theta)
    heads, kv_heads, d = q.shape[2], k.shape[2], q.shape[3]
    kv_of = np.arange(heads) // (heads // kv_heads)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv_of]) / np.sqrt(d)
    qp, kp = positions[:, :, None], positions[:, None, :]
    mask = kp <= qp
    if config.sliding_window is not None:
        mask &= qp - kp < config.sliding_window
    if segments is not None:
        segments = np.asarray(segments)
        mask &= segments[:, :, None] == segments[:, None, :]
    logits = np.where(mask[:, None], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def check_attention(hidden: HiddenStates, model, inputs, positions, segments, config):
    """Each attention layer's probabilities against the NumPy reference on that layer's input."""
    assert len(hidden.attention) == len(model.layers)
    for i, (layer, probs) in enumerate(zip(model.layers, hidden.attention, strict=True)):
        if isinstance(layer, MambaBlock):
            assert probs is None, f"layer {i} is a Mamba layer"
            continue
        assert probs.dtype == jnp.float32
        assert probs.shape == (BATCH, config.num_heads, SEQ, SEQ)
        want = np_attention_probs(layer, inputs[i], positions, segments, config)
        np.testing.assert_allclose(np.asarray(probs), want, atol=2e-6, err_msg=f"layer {i}")
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)


def by_hand(model, tokens, positions, segments):
    """The embedding, then ``model.layers[i]`` one at a time: ``[X_0, ..., X_L]``."""
    x = jnp.take(model.embed[...], tokens, axis=0).astype(model.config.compute_dtype)
    out = [x]
    for layer in model.layers:
        x, _ = layer(x, positions, segments, None)
        out.append(x)
    return out


def assert_sequence_equal(got, want, atol=0.0):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, (i, g.shape, w.shape)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0, err_msg=str(i))


# ----------------------------------------------------------------------------- Transformer


TRANSFORMER_VARIANTS = {
    "gqa": dict(),
    "gqa sliding window, biases": dict(sliding_window=4, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("variant", sorted(TRANSFORMER_VARIANTS))
def test_transformer_hidden_states_equal_the_blocks_called_by_hand(variant):
    config = dataclasses.replace(TRANSFORMER, **TRANSFORMER_VARIANTS[variant])
    model = models.build(config, nnx.Rngs(0))
    randomize(model, 1)
    tokens, positions, segments = packed_inputs(2, config.vocab_size)
    call = dict(positions=positions, segment_ids=segments)
    plain = model(tokens, **call)
    logits, hidden = model(tokens, **call, return_hidden=True, return_attention=True)
    assert isinstance(hidden, HiddenStates) and hidden.averaged is None
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
    want = by_hand(model, tokens, positions, segments)
    assert_sequence_equal(hidden.residuals, want)
    check_attention(hidden, model, hidden.residuals, positions, segments, config)
    # Packed documents do not see each other.
    assert float(jnp.abs(hidden.attention[0][1, :, 6:, :6]).max()) == 0.0

    # return_hidden alone: the same residuals, no attention.
    logits_h, only_hidden = model(tokens, **call, return_hidden=True)
    np.testing.assert_array_equal(np.asarray(logits_h), np.asarray(plain))
    assert only_hidden.attention is None
    assert_sequence_equal(only_hidden.residuals, want)
    # return_attention alone implies the residuals.
    _, only_attention = model(tokens, **call, return_attention=True)
    assert_sequence_equal(only_attention.residuals, want)
    # logits_at: residuals stay over the whole sequence.
    last = jnp.full((BATCH,), SEQ - 1)
    logits_at, at_hidden = model(tokens, **call, logits_at=last, return_hidden=True)
    np.testing.assert_allclose(np.asarray(logits_at[:, 0]), np.asarray(plain[:, -1]), atol=1e-6)
    assert_sequence_equal(at_hidden.residuals, want)


def test_transformer_hidden_states_with_a_cache():
    config = dataclasses.replace(TRANSFORMER, sliding_window=5)
    model = models.build(config, nnx.Rngs(0))
    randomize(model, 3)
    tokens, _, _ = packed_inputs(4, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    _, full = model(tokens, return_attention=True)
    max_len = SEQ + 3
    cache = models.make_cache(config, BATCH, max_len)
    logits, new_cache, hidden = model.decode(
        tokens, cache, positions=positions, return_hidden=True, return_attention=True
    )
    plain_logits, plain_cache = model.decode(tokens, cache, positions=positions)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain_logits))
    for got, want in zip(jax.tree.leaves(new_cache), jax.tree.leaves(plain_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert_sequence_equal(hidden.residuals, full.residuals, atol=1e-6)
    for probs, want in zip(hidden.attention, full.attention, strict=True):
        assert probs.shape == (BATCH, config.num_heads, SEQ, max_len)
        np.testing.assert_allclose(np.asarray(probs[..., :SEQ]), np.asarray(want), atol=1e-6)
        assert float(jnp.abs(probs[..., SEQ:]).max()) == 0.0  # empty cache slots are unseen


def test_hidden_states_under_remat_and_jit_match_without_remat():
    config = dataclasses.replace(TRANSFORMER, sliding_window=6)
    tokens, positions, segments = packed_inputs(5, config.vocab_size)

    def run(remat):
        model = models.build(dataclasses.replace(config, remat=remat), nnx.Rngs(0))
        randomize(model, 6)
        graphdef, params = nnx.split(model)

        def loss(params):
            m = nnx.merge(graphdef, params)
            logits, hidden = m(
                tokens,
                positions=positions,
                segment_ids=segments,
                return_hidden=True,
                return_attention=True,
            )
            total = jnp.mean(logits**2) + sum(jnp.mean(r**2) for r in hidden.residuals)
            return total + sum(jnp.mean(p**2) for p in hidden.attention), hidden

        (value, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return value, hidden, grads

    value, hidden, grads = run(remat=False)
    value_r, hidden_r, grads_r = run(remat=True)
    np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6)
    assert_sequence_equal(hidden_r.residuals, hidden.residuals, atol=1e-6)
    assert_sequence_equal(hidden_r.attention, hidden.attention, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)


def test_sparse_attention_probabilities_follow_the_sparse_pattern():
    from jaxlab.models.sparse_attention import SparseAttentionConfig

    config = dataclasses.replace(
        TRANSFORMER, sparse_attention=SparseAttentionConfig(kind="qk", keep_rate=0.6, seed=1)
    )
    model = models.build(config, nnx.Rngs(0))
    randomize(model, 7)
    tokens, positions, segments = packed_inputs(8, config.vocab_size)
    _, hidden = model(tokens, positions=positions, segment_ids=segments, return_attention=True)
    dense = np_attention_probs(model.layers[0], hidden.residuals[0], positions, segments, config)
    probs = np.asarray(hidden.attention[0])
    seen = probs > 0
    # Only causal keys of the same document are ever seen, and some of those are dropped.
    assert not (seen & (dense == 0)).any()
    assert (~seen & (dense > 0)).any()
    sums = probs.sum(-1)
    np.testing.assert_allclose(sums[sums > 0], 1.0, atol=1e-5)  # dropped queries: all zero


# ----------------------------------------------------------------------------- DenseFormer


def test_denseformer_hidden_states_are_block_outputs_and_averages():
    config = dataclasses.replace(
        TRANSFORMER, num_layers=5, sliding_window=7, dwa=DWAConfig(dilation=2, period=2)
    )
    model = models.build(config, nnx.Rngs(0))
    randomize(model, 9)  # DWA weights too: no longer the identity
    tokens, positions, segments = packed_inputs(10, config.vocab_size)
    call = dict(positions=positions, segment_ids=segments)
    plain = model(tokens, **call)
    logits, hidden = model(tokens, **call, return_hidden=True, return_attention=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))

    # By hand: X_i = block_i(Y_{i-1}); after blocks 2 and 4, Y_i = sum_j alpha_ij X_j over
    # j <= i, j = i (mod 2), in float64 from the weights.
    x = jnp.take(model.embed[...], tokens, axis=0)
    xs, ys, y, dwa = [x], [x], x, 0
    for i, layer in enumerate(model.layers, start=1):
        x, _ = layer(y, positions, segments, None)
        xs.append(x)
        if i % 2 == 0:
            alpha = np.asarray(model.dwa.weights[dwa][...], np.float64)
            dwa += 1
            reps = [np.asarray(xs[j], np.float64) for j in range(i % 2, i + 1, 2)]
            assert len(reps) == len(alpha)
            y = jnp.asarray(sum(a * r for a, r in zip(alpha, reps, strict=True)), jnp.float32)
        else:
            y = x
        ys.append(y)
    assert dwa == 2
    # The by-hand chain rounds its averages differently (float64 sums), hence the tolerance.
    assert_sequence_equal(hidden.residuals, xs, atol=2e-5)
    assert_sequence_equal(hidden.averaged, ys, atol=2e-5)
    # The blocks read the averages: attention probabilities from Y_{i-1}.
    check_attention(hidden, model, hidden.averaged, positions, segments, config)


# ----------------------------------------------------------------------------- Mamba and hybrids


MAMBA_VARIANTS = {
    "mamba1": dict(mixer="mamba1"),
    "mamba2": dict(mixer="mamba2", num_groups=2, intermediate_size=48),
    "hybrid mamba2": dict(
        mixer="mamba2",
        intermediate_size=48,
        attention_layers=(0, 2),
        sliding_window=5,
        attention_bias=True,
    ),
}


@pytest.mark.parametrize("variant", sorted(MAMBA_VARIANTS))
def test_mamba_hidden_states_equal_the_blocks_called_by_hand(variant):
    config = dataclasses.replace(MAMBA, **MAMBA_VARIANTS[variant])
    model = models.build(config, nnx.Rngs(0))
    randomize(model, 11, scale=0.1)
    tokens, positions, segments = packed_inputs(12, config.vocab_size)
    call = dict(positions=positions, segment_ids=segments)
    plain = model(tokens, **call)
    logits, hidden = model(tokens, **call, return_hidden=True, return_attention=True)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))
    assert hidden.averaged is None
    assert_sequence_equal(hidden.residuals, by_hand(model, tokens, positions, segments))
    attention_config = config.attention_config() if config.attention_layers else None
    check_attention(hidden, model, hidden.residuals, positions, segments, attention_config)
    _, only_hidden = model(tokens, **call, return_hidden=True)
    assert only_hidden.attention is None

    # With a cache: (logits, cache, hidden), the same residuals as the full call.
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    _, full = model(tokens, return_hidden=True)
    cache = models.make_cache(config, BATCH, SEQ + 2)
    logits, _, cached = model.decode(tokens, cache, positions=positions, return_hidden=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(tokens)), atol=1e-5)
    assert_sequence_equal(cached.residuals, full.residuals, atol=1e-5)


def test_mamba_hidden_states_under_remat():
    config = dataclasses.replace(MAMBA, **MAMBA_VARIANTS["hybrid mamba2"])
    tokens, positions, segments = packed_inputs(13, config.vocab_size)

    def run(remat):
        model = models.build(dataclasses.replace(config, remat=remat), nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            model = nnx.merge(graphdef, params)
            call = dict(positions=positions, segment_ids=segments, return_attention=True)
            _, hidden = model(tokens, **call)
            total = sum(jnp.mean(r**2) for r in hidden.residuals)
            return total + sum(jnp.mean(p**2) for p in hidden.attention if p is not None)

        return jax.jit(jax.value_and_grad(loss))(params)

    (value, grads), (value_r, grads_r) = run(remat=False), run(remat=True)
    np.testing.assert_allclose(float(value_r), float(value), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-5)
