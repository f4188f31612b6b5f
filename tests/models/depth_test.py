"""Layer Parallelism and its baselines (``jaxlab.models.depth``, issue 19), each checked against a
computation of its own: the pair formula written from the original model's blocks, a float64
NumPy layer, transformers' own decoder layers, hand-built models and the tensor-parallel HLO.

Every parameter is random (norm scales and biases included): with the default ones and zeros a
scale folded into the wrong rows, or a bias summed twice, would not change a single logit.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec
from transformers.masking_utils import create_causal_mask

from jaxlab import infer, models
from jaxlab.interop.hf import CheckpointError, load_hf_llama, save_hf_llama
from jaxlab.models import TransformerConfig, depth
from jaxlab.models.depth import (
    angular_distances,
    layer_parallel,
    merge_layers,
    prune_by_angular_distance,
    prune_layers,
    shuffle_layers,
    shuffled_order,
)
from jaxlab.models.partitioning import DEFAULT_RULES, activation_sharding
from jaxlab.objectives import init_train_state, make_train_step
from jaxlab.train.checkpoint import Checkpointer
from jaxlab.train.sharding import batch_sharding, make_mesh, state_shardings

# GQA (2 query heads per kv head) and every bias on, so the fold touches every parameter kind.
TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_layers=6,
    num_heads=4,
    num_kv_heads=2,
    attention_bias=True,
    mlp_bias=True,
    max_seq_len=64,
)
TOL = 1e-5  # float32 folded/unfolded/formula agreement


def _with_params(config, pure):
    """A model of ``config`` holding the parameter dict ``pure``, built without initialising
    parameters (that costs seconds per model on a CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


def _model(seed=0, **changes):
    """A model of ``TINY`` updated by ``changes`` whose every parameter is random: matrices
    N(0, 0.2^2), norm scales 1 + N(0, 0.3^2), biases N(0, 0.1^2)."""
    config = TransformerConfig(**{**TINY, **changes})
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1.0 + 0.3 * rng.standard_normal(leaf.shape)
        elif "bias" in name:
            value = 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = 0.2 * rng.standard_normal(leaf.shape)
        return np.asarray(value, leaf.dtype)

    abstract = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
    return _with_params(config, jax.tree_util.tree_map_with_path(draw, _pure(abstract)))


@pytest.fixture(scope="module")
def model():
    return _model()


def _tokens(seed=0, batch=2, seq=10):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, seq)))


def _pure(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _groups(num_layers, start, end):
    """Layer indices in the order Layer Parallelism runs them: pairs inside ``[start, end)``."""
    return (
        [(i,) for i in range(start)]
        + [(i, i + 1) for i in range(start, end, 2)]
        + [(i,) for i in range(end, num_layers)]
    )


# --- The formula, written from the original model's blocks ----------------------------------------


def _mlp_exact(blocks, h):
    """``sum_i M_i(N'_i h)``."""
    return sum(b.mlp(b.post_attention_norm(h)) for b in blocks)


def _mlp_shared(blocks, h):
    """The authors' 2-GPU layout: device k holds the k-th half of every MLP's columns and
    normalises ``h`` with block k's post-attention scale."""
    if len(blocks) == 1:  # an unpaired layer keeps its own norm
        return _mlp_exact(blocks, h)
    width = blocks[0].mlp.gate_proj.shape[1]
    halves = (slice(0, width // 2), slice(width // 2, width))
    out = 0.0
    for block in blocks:
        m = block.mlp
        for cols, device_block in zip(halves, blocks, strict=True):
            z = device_block.post_attention_norm(h)
            gate = z @ m.gate_proj[...][:, cols] + m.gate_bias[...][cols]
            up = z @ m.up_proj[...][:, cols] + m.up_bias[...][cols]
            out = out + (jax.nn.silu(gate) * up) @ m.down_proj[...][cols]
        out = out + m.down_bias[...]
    return out


def _reference_logits(model, tokens, groups, mlp=_mlp_exact):
    """Logits of the original ``model`` with its blocks run as ``groups`` (tuples of layer
    indices, in order): ``h = x + sum_i A_i(N_i x)``, ``y = h + mlp(blocks, h)`` per group (for a
    group of one, the ordinary pre-norm block)."""
    tokens = jnp.asarray(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed[...][tokens]
    for group in groups:
        blocks = [model.layers[i] for i in group]
        h = x + sum(b.attn(b.input_norm(x), positions, None, None)[0] for b in blocks)
        x = h + mlp(blocks, h)
    x = model.final_norm(x)
    head = model.embed[...].T if model.config.tie_embeddings else model.lm_head[...]
    return np.asarray(x @ head)


# --- 1. start == end ------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [True, False])
def test_no_pairs_returns_a_bitwise_equal_copy(model, fold):
    tokens = _tokens()
    logits = np.asarray(model(tokens))
    for start in (0, 3, 6):
        same = layer_parallel(model, start, start, fold=fold)
        assert same is not model
        assert same.config == model.config
        _assert_same_params(_pure(same), _pure(model))
        np.testing.assert_array_equal(np.asarray(same(tokens)), logits)


# --- 2. folded == unfolded == the formula (float32), and the fold math in float64 -----------------


@pytest.mark.parametrize("start, end", [(0, 2), (1, 5), (2, 6), (0, 6), (4, 6)])
def test_folded_and_unfolded_equal_the_pair_formula(model, start, end):
    tokens = _tokens(seed=1)
    before = jax.tree.map(np.asarray, _pure(model))
    expected = _reference_logits(model, tokens, _groups(6, start, end))
    # The formula really differs from running the layers one after another.
    assert np.abs(expected - np.asarray(model(tokens))).max() > 1e-2

    folded = layer_parallel(model, start, end)
    pairs = (end - start) // 2
    assert folded.config.num_layers == 6 - pairs
    assert folded.config.layer_widths == (1,) * start + (2,) * pairs + (1,) * (6 - end)
    assert folded.layers[start].attn.q_proj.shape == (32, 8, 8)
    assert folded.layers[start].attn.k_proj.shape == (32, 4, 8)
    assert folded.layers[start].mlp.gate_proj.shape == (32, 96)
    unfolded = layer_parallel(model, start, end, fold=False)
    assert unfolded.config.parallel_groups == (1,) * start + (2,) * pairs + (1,) * (6 - end)
    _assert_same_params(_pure(unfolded), _pure(model))

    np.testing.assert_allclose(np.asarray(folded(tokens)), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(unfolded(tokens)), expected, rtol=0, atol=TOL)
    np.testing.assert_allclose(
        np.asarray(folded(tokens)), np.asarray(unfolded(tokens)), rtol=0, atol=TOL
    )
    _assert_same_params(jax.tree.map(np.asarray, _pure(model)), before)  # input left as it was


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, positions, theta):
    """Half-split RoPE (dimension i pairs with i + dim/2) of ``x: [batch, seq, heads, dim]``."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(half) * 2.0 / x.shape[-1])
    angles = positions[..., None] * inv_freq
    cos, sin = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_attention(p, x, positions, c):
    """``A(N x)`` of one layer's params ``p`` in float64: RMSNorm, RoPE, causal softmax
    attention where query head h reads kv head ``h // (heads / kv_heads)``."""
    a = p["attn"]
    n = _np_rms(x, p["input_norm"]["scale"], c.rms_norm_eps)

    def project(name):
        return np.einsum("bse,ehd->bshd", n, a[f"{name}_proj"]) + a[f"{name}_bias"]

    q = _np_rope(project("q"), positions, c.rope_theta)
    k = _np_rope(project("k"), positions, c.rope_theta)
    v = project("v")
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    causal = positions[:, None, :, None] >= positions[:, None, None, :]
    logits = np.where(causal, logits, -np.inf)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v)
    return np.einsum("bqhd,hde->bqe", out, a["o_proj"]) + a["o_bias"]


def _np_mlp(p, h, c):
    """``M(N' h)``: SwiGLU with biases, in float64."""
    m = p["mlp"]
    z = _np_rms(h, p["post_attention_norm"]["scale"], c.rms_norm_eps)
    gate = z @ m["gate_proj"] + m["gate_bias"]
    up = z @ m["up_proj"] + m["up_bias"]
    return (gate / (1.0 + np.exp(-gate)) * up) @ m["down_proj"] + m["down_bias"]


def _np_block(p, x, positions, c):
    h = x + _np_attention(p, x, positions, c)
    return h + _np_mlp(p, h, c)


def _np_shared_mlp(a, b, h, c):
    """The authors' MLP layout in float64: columns of the first half of both MLPs read layer
    ``a``'s post-attention scale, the second half layer ``b``'s."""
    out = 0.0
    width = a["mlp"]["gate_proj"].shape[1]
    for p in (a, b):
        m = p["mlp"]
        for cols, owner in ((slice(0, width // 2), a), (slice(width // 2, width), b)):
            z = _np_rms(h, owner["post_attention_norm"]["scale"], c.rms_norm_eps)
            gate = z @ m["gate_proj"][:, cols] + m["gate_bias"][cols]
            up = z @ m["up_proj"][:, cols] + m["up_bias"][cols]
            out = out + (gate / (1.0 + np.exp(-gate)) * up) @ m["down_proj"][cols]
        out = out + m["down_bias"]
    return out


def test_fold_math_is_exact_in_float64(model):
    c = model.config
    layers = jax.tree.map(lambda a: np.asarray(a, np.float64), _pure(model)["layers"])
    rng = np.random.default_rng(7)
    x64 = rng.standard_normal((2, 10, c.hidden_size))
    positions = np.broadcast_to(np.arange(3, 13), (2, 10)).astype(np.float64)
    x32, pos32 = jnp.asarray(x64, jnp.float32), jnp.asarray(positions, jnp.int32)

    # The NumPy layer is the same function as jaxlab's block (in float32), for one layer and
    # for a folded pair run as one wide layer, so the float64 comparison below means something.
    np.testing.assert_allclose(
        _np_block(layers[2], x64, positions, c),
        np.asarray(model.layers[2](x32, pos32, None, None)[0]),
        atol=TOL,
    )
    folded_model = layer_parallel(model, 2, 4)
    np.testing.assert_allclose(
        _np_block(depth._fold_pair(layers[2], layers[3], "exact"), x64, positions, c),
        np.asarray(folded_model.layers[2](x32, pos32, None, None)[0]),
        atol=TOL,
    )

    for i in (0, 2, 4):
        a, b = layers[i], layers[i + 1]
        h = x64 + _np_attention(a, x64, positions, c) + _np_attention(b, x64, positions, c)
        formula = h + _np_mlp(a, h, c) + _np_mlp(b, h, c)
        folded = depth._fold_pair(a, b, "exact")
        assert folded["attn"]["q_proj"].dtype == np.float64
        np.testing.assert_allclose(
            _np_block(folded, x64, positions, c), formula, rtol=0, atol=1e-12
        )
        shared = h + _np_shared_mlp(a, b, h, c)
        np.testing.assert_allclose(
            _np_block(depth._fold_pair(a, b, "shared"), x64, positions, c),
            shared,
            rtol=0,
            atol=1e-12,
        )


# --- 3. norm="shared" -----------------------------------------------------------------------------


@pytest.mark.parametrize("start, end", [(0, 2), (1, 5)])
def test_shared_norm_is_the_authors_layout(model, start, end):
    tokens = _tokens(seed=2)
    groups = _groups(6, start, end)
    shared = np.asarray(layer_parallel(model, start, end, norm="shared")(tokens))
    np.testing.assert_allclose(
        shared, _reference_logits(model, tokens, groups, mlp=_mlp_shared), rtol=0, atol=TOL
    )
    exact = np.asarray(layer_parallel(model, start, end)(tokens))
    assert np.abs(shared - exact).max() > 1e-3

    # With equal post-attention scales within each pair the approximation is exact.
    pure = _pure(model)
    for i in range(start, end, 2):
        pure["layers"][i + 1]["post_attention_norm"]["scale"] = pure["layers"][i][
            "post_attention_norm"
        ]["scale"]
    same_scales = _with_params(model.config, pure)
    np.testing.assert_allclose(
        np.asarray(layer_parallel(same_scales, start, end, norm="shared")(tokens)),
        np.asarray(layer_parallel(same_scales, start, end)(tokens)),
        rtol=0,
        atol=TOL,
    )


# --- 4. Cached decoding and generation ------------------------------------------------------------


@pytest.mark.parametrize("fold", [True, False])
def test_cached_decoding_equals_the_full_forward(model, fold):
    lp = layer_parallel(model, 1, 5, fold=fold)
    tokens = np.asarray(_tokens(seed=3))
    full = np.asarray(lp(jnp.asarray(tokens)))

    cache = models.make_cache(lp.config, 2, 16)
    assert len(cache.layers) == lp.config.num_layers
    # Every original layer keeps its own KV slots: the same cache bytes as the original model.
    original_bytes = sum(a.nbytes for a in jax.tree.leaves(models.make_cache(model.config, 2, 16)))
    assert sum(a.nbytes for a in jax.tree.leaves(cache)) == original_bytes

    # Chunk 1: a 5-token prefill. Chunk 2: row 0 goes on at 5, row 1 goes back to 3 (its slots
    # 3, 4 are rewritten). Chunk 3: one token each.
    chunks = [
        np.broadcast_to(np.arange(5), (2, 5)),
        np.array([[5, 6, 7], [3, 4, 5]]),
        np.array([[8], [6]]),
    ]
    decode = nnx.jit(lambda m, chunk, c, p: m.decode(chunk, c, positions=p))  # eager: 3x slower
    for positions in chunks:
        chunk = np.take_along_axis(tokens, positions, axis=1)
        logits, cache = decode(lp, jnp.asarray(chunk), cache, jnp.asarray(positions))
        np.testing.assert_allclose(
            np.asarray(logits),
            np.take_along_axis(full, positions[..., None], axis=1),
            rtol=0,
            atol=TOL,
        )


@pytest.mark.parametrize("fold", [True, False])
def test_generate_on_a_layer_parallel_model_is_greedy_decoding(model, fold):
    lp = layer_parallel(model, 2, 6, fold=fold)
    prompts = np.asarray(_tokens(seed=4, batch=2, seq=5))
    out = infer.generate(lp, jnp.asarray(prompts), max_new_tokens=5, stop_tokens=())
    generated = np.asarray(out.tokens)
    np.testing.assert_array_equal(np.asarray(out.lengths), [5, 5])
    # Greedy: each token is the argmax of the full forward's logits at the position before it
    # (one causal forward of the whole sequence gives them all).
    full = np.asarray(lp(jnp.asarray(np.concatenate([prompts, generated], axis=1))))
    np.testing.assert_array_equal(generated, np.argmax(full[:, 4:9], axis=-1))
    log_softmax = np.asarray(jax.nn.log_softmax(full[:, 4:9]))
    np.testing.assert_allclose(
        np.asarray(out.logprobs),
        np.take_along_axis(log_softmax, generated[..., None], axis=-1)[..., 0],
        rtol=0,
        atol=1e-4,
    )


# --- 5. Tensor parallelism ------------------------------------------------------------------------


def _on_tensor_mesh(model, tokens, mesh):
    """Logits of ``model`` with its parameters placed on ``mesh`` by the sharding rules, and the
    number of all-reduces in the compiled forward."""
    graphdef, state = nnx.split(model)
    placed = nnx.State(state)
    nnx.replace_by_pure_dict(
        placed, jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh))
    )

    def forward(state, tokens):
        with activation_sharding(mesh, DEFAULT_RULES):  # as the training engine traces
            return nnx.merge(graphdef, state)(tokens)

    tokens = jax.device_put(tokens, batch_sharding(mesh))
    compiled = jax.jit(forward).lower(placed, tokens).compile()
    return np.asarray(compiled(placed, tokens)), compiled.as_text().count("all-reduce("), placed


def test_tensor_mesh_equals_one_device_with_one_all_reduce_per_sub_block():
    assert jax.device_count() == 8
    model = _model(seed=5, num_layers=4, vocab_size=64)  # vocab splits on tensor
    mesh = make_mesh(data=4, tensor=2)
    tokens = _tokens(seed=5, batch=8, seq=8)
    # (model, expected all-reduces): 2 per sequential block + 1 (the vocab-sharded embedding).
    cases = [
        (model, 9),  # 2 * 4 + 1, the count the issue states for a plain 4-layer Llama
        (layer_parallel(model, 1, 3), 7),  # L=4, Delta=2: 2 * (4 - 1) + 1
        (layer_parallel(model, 0, 4), 5),  # L=4, Delta=4: 2 * (4 - 2) + 1
        (layer_parallel(model, 0, 4, fold=False), 5),  # XLA sums the two partials first
    ]
    placements = []
    for lp, expected_count in cases:
        single = np.asarray(lp(tokens))
        sharded, count, placed = _on_tensor_mesh(lp, tokens, mesh)
        placements.append(placed)
        np.testing.assert_allclose(sharded, single, rtol=0, atol=TOL)
        assert count == expected_count, (lp.config, count)
    # A folded pair's heads and MLP columns are split over `tensor`: each device holds half of
    # them (one original layer's worth), as for an ordinary layer.
    folded_placed = placements[2]
    q_proj = folded_placed["layers"][0]["attn"]["q_proj"]
    assert {s.data.shape for s in q_proj.addressable_shards} == {(32, 4, 8)}
    gate = folded_placed["layers"][1]["mlp"]["gate_proj"]
    assert gate.sharding.spec == PartitionSpec(None, "tensor")
    assert {s.data.shape for s in gate.addressable_shards} == {(32, 48)}


# --- 6. Against transformers' own decoder layers --------------------------------------------------


def _hf_llama(num_layers=4, seed=0):
    config = transformers.LlamaConfig(
        vocab_size=TINY["vocab_size"],
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(1.0 + 0.3 * noise)
            elif "bias" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return hf.eval()


def _hf_reference_logits(hf, tokens, groups):
    """The pair formula with transformers' ``LlamaDecoderLayer`` submodules, rotary embeddings
    and causal mask."""
    m = hf.model
    ids = torch.tensor(np.asarray(tokens), dtype=torch.long)
    with torch.no_grad():
        x = m.embed_tokens(ids)
        position_ids = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        rotary = m.rotary_emb(x, position_ids=position_ids)
        mask = create_causal_mask(
            config=m.config,
            inputs_embeds=x,
            attention_mask=None,
            cache=None,
            position_ids=position_ids,
        )
        for group in groups:
            layers = [m.layers[i] for i in group]
            h = x + sum(
                layer.self_attn(
                    layer.input_layernorm(x), position_embeddings=rotary, attention_mask=mask
                )[0]
                for layer in layers
            )
            x = h + sum(layer.mlp(layer.post_attention_layernorm(h)) for layer in layers)
        return hf.lm_head(m.norm(x)).numpy()


def test_hugging_face_llama_pairs_equal_transformers_decoder_layers(tmp_path):
    hf = _hf_llama(num_layers=4, seed=6)
    hf.save_pretrained(str(tmp_path))
    loaded = load_hf_llama(str(tmp_path))
    tokens = np.asarray(_tokens(seed=6))
    with torch.no_grad():
        hf_logits = hf(torch.tensor(tokens)).logits.numpy()
    # The torch reference loop, run sequentially, is transformers' own forward.
    np.testing.assert_allclose(
        _hf_reference_logits(hf, tokens, _groups(4, 0, 0)), hf_logits, rtol=0, atol=1e-5
    )
    for start, end in ((1, 3), (0, 4)):
        expected = _hf_reference_logits(hf, tokens, _groups(4, start, end))
        assert np.abs(expected - hf_logits).max() > 1e-2
        for fold in (True, False):
            lp = layer_parallel(loaded, start, end, fold=fold)
            got = np.asarray(lp(jnp.asarray(tokens)))
            assert np.abs(got - expected).max() <= 1e-4, (start, end, fold)


# --- 7. Pruning, merging, shuffling, angular distances --------------------------------------------


def _hand_built(model, layers):
    """A plain Transformer with ``len(layers)`` layers holding ``model``'s embedding, final norm
    and head and the given per-layer parameter dicts."""
    config = TransformerConfig(**{**TINY, "num_layers": len(layers)})
    pure = _pure(model)
    pure["layers"] = dict(enumerate(layers))
    return _with_params(config, pure)


@pytest.mark.parametrize("start, end", [(0, 1), (1, 3), (2, 6), (0, 5)])
def test_prune_layers_drops_the_run(model, start, end):
    tokens = _tokens(seed=7)
    pruned = prune_layers(model, start, end)
    kept = [i for i in range(6) if not start <= i < end]
    assert pruned.config.num_layers == len(kept)
    assert pruned.config.layer_widths is None and pruned.config.parallel_groups is None
    layers = _pure(model)["layers"]
    hand = _hand_built(model, [layers[i] for i in kept])
    _assert_same_params(_pure(pruned), _pure(hand))
    expected = _reference_logits(model, tokens, [(i,) for i in kept])
    np.testing.assert_allclose(np.asarray(pruned(tokens)), expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("start, end", [(0, 2), (1, 5), (0, 6)])
def test_merge_layers_averages_consecutive_pairs(model, start, end):
    tokens = _tokens(seed=8)
    merged = merge_layers(model, start, end)
    layers = _pure(model)["layers"]
    averaged = [
        jax.tree.map(lambda p, q: (p + q) / 2, layers[i], layers[i + 1])
        for i in range(start, end, 2)
    ]
    hand = _hand_built(
        model,
        [layers[i] for i in range(start)] + averaged + [layers[i] for i in range(end, 6)],
    )
    assert merged.config.num_layers == 6 - (end - start) // 2
    for x, y in zip(jax.tree.leaves(_pure(merged)), jax.tree.leaves(_pure(hand)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-7, atol=0)
    np.testing.assert_allclose(
        np.asarray(merged(tokens)), np.asarray(hand(tokens)), rtol=0, atol=TOL
    )
    # The merged layer is one layer, not the pair run side by side or in sequence.
    assert np.abs(np.asarray(merged(tokens)) - np.asarray(model(tokens))).max() > 1e-2


def test_shuffled_order_is_a_derangement_of_the_run():
    orders = set()
    for seed in range(20):
        order = shuffled_order(8, 2, 7, seed)
        assert order[:2] == [0, 1] and order[7:] == [7]
        assert sorted(order[2:7]) == [2, 3, 4, 5, 6]
        assert all(order[i] != i for i in range(2, 7))
        assert shuffled_order(8, 2, 7, seed) == order  # a seed fixes it
        orders.add(tuple(order))
    assert len(orders) > 5  # seeds give different derangements
    assert shuffled_order(5, 1, 3, 4) == [0, 2, 1, 3, 4]  # a run of two can only swap
    assert shuffled_order(5, 2, 3) == list(range(5))  # one layer has nowhere to go
    assert shuffled_order(5, 2, 2) == list(range(5))


def test_shuffle_layers_runs_the_layers_in_the_drawn_order(model):
    tokens = _tokens(seed=9)
    order = shuffled_order(6, 1, 5, seed=3)
    shuffled = shuffle_layers(model, 1, 5, seed=3)
    assert shuffled.config.num_layers == 6
    layers = _pure(model)["layers"]
    _assert_same_params(_pure(shuffled), _pure(_hand_built(model, [layers[i] for i in order])))
    expected = _reference_logits(model, tokens, [(i,) for i in order])
    np.testing.assert_allclose(np.asarray(shuffled(tokens)), expected, rtol=0, atol=TOL)


def test_angular_distances_match_numpy_on_the_residual_stream(model):
    tokens = _tokens(seed=10)
    lengths = np.array([10, 4])
    _, hidden = model(tokens, return_hidden=True)
    assert len(hidden.residuals) == 7  # the embedding and each block's output
    last = np.stack(
        [np.asarray(r, np.float64)[np.arange(2), lengths - 1] for r in hidden.residuals]
    )
    for n in (1, 2, 6):
        expected = []
        for first in range(6 - n + 1):
            angles = []
            for row in range(2):
                u, v = last[first, row], last[first + n, row]
                cosine = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
                angles.append(np.arccos(min(cosine, 1.0)) / np.pi)
            expected.append(np.mean(angles))
        got = angular_distances(model, tokens, n, lengths=lengths)
        assert got.shape == (6 - n + 1,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    # Without lengths every row's last token counts.
    full = angular_distances(model, tokens, 2)
    np.testing.assert_allclose(
        full, angular_distances(model, tokens, 2, lengths=[10, 10]), rtol=0, atol=0
    )


def test_prune_by_angular_distance_drops_the_closest_run(model):
    tokens = _tokens(seed=11)
    # Layers 3 and 4 made identities (zero output projections and biases): the run that
    # changes its input least, and dropping it leaves the logits as they were.
    pure = _pure(model)
    for i in (3, 4):
        for sub, names in (("attn", ("o_proj", "o_bias")), ("mlp", ("down_proj", "down_bias"))):
            for name in names:
                pure["layers"][i][sub][name] = jnp.zeros_like(pure["layers"][i][sub][name])
    lazy = _with_params(model.config, pure)
    distances = angular_distances(lazy, tokens, 2)
    assert np.argmin(distances) == 3 and distances[3] < 1e-6
    pruned, start = prune_by_angular_distance(lazy, tokens, 2)
    assert start == 3 and pruned.config.num_layers == 4
    np.testing.assert_allclose(
        np.asarray(pruned(tokens)), np.asarray(lazy(tokens)), rtol=0, atol=TOL
    )
    # On the random model it drops the argmin run, whichever that is.
    pruned, start = prune_by_angular_distance(model, tokens, 3)
    assert start == int(np.argmin(angular_distances(model, tokens, 3)))
    _assert_same_params(_pure(pruned), _pure(prune_layers(model, start, start + 3)))


# --- 8. A registered family member: config, build, checkpoint, training, HF export ----------------


def _batch(tokens):
    tokens = np.asarray(tokens)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return {
        "inputs": jnp.asarray(inputs),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.ones(inputs.shape, jnp.int32),
        "segment_ids": jnp.ones(inputs.shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape),
    }


@pytest.mark.parametrize("fold", [True, False])
def test_layer_parallel_model_round_trips_trains_and_refuses_hf_export(model, fold, tmp_path):
    lp = layer_parallel(model, 2, 6, fold=fold)
    tokens = _tokens(seed=12)
    logits = np.asarray(lp(tokens))
    c = lp.config
    field = "layer_widths" if fold else "parallel_groups"
    assert models.make_config(c.to_dict()) == c
    as_json = json.loads(json.dumps(c.to_dict()))
    assert isinstance(as_json[field], list)  # JSON has no tuples
    assert models.make_config(as_json) == c

    rebuilt = nnx.eval_shape(lambda: models.build(as_json, nnx.Rngs(3)))
    assert jax.tree.map(jnp.shape, _pure(rebuilt)) == jax.tree.map(jnp.shape, _pure(lp))
    graphdef, state = nnx.split(rebuilt)
    nnx.replace_by_pure_dict(state, _pure(lp))
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(tokens)), logits)

    # A jaxlab checkpoint round trip, the config stored beside the parameters.
    params = _pure(lp)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.save(1, params, {}, c.to_dict())
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params
    )
    restored, _, stored_config = checkpointer.restore(1, abstract)
    checkpointer.close()
    again = _with_params(models.make_config(stored_config), restored)
    assert again.config == c
    np.testing.assert_array_equal(np.asarray(again(tokens)), logits)

    # One step of the standard train step (jaxlab.objectives) trains it: the reported loss is
    # the next-token cross-entropy of its logits, every paired parameter moves, the loss drops.
    graphdef, state = nnx.split(lp, nnx.Param)
    params = nnx.to_pure_dict(state)
    batch = _batch(_tokens(seed=13, seq=11))

    def loss(p):
        out = nnx.merge(graphdef, p)(batch["inputs"])
        return float(optax.softmax_cross_entropy_with_integer_labels(out, batch["targets"]).mean())

    step = jax.jit(make_train_step(graphdef, optax.sgd(0.1)))
    new_state, metrics = step(init_train_state(params, optax.sgd(0.1)), batch)
    np.testing.assert_allclose(float(metrics["loss"]), loss(params), rtol=1e-6)
    for name, group in (("attn", "q_proj"), ("attn", "o_bias"), ("mlp", "down_proj")):
        for i in (2, 3) if not fold else (2,):
            moved = new_state.params["layers"][i][name][group] - params["layers"][i][name][group]
            assert np.abs(np.asarray(moved)).max() > 0, (i, name, group)
    assert loss(new_state.params) < loss(params)

    with pytest.raises(CheckpointError, match=f"side by side \\({field}="):
        save_hf_llama(lp, str(tmp_path / "hf"))


# --- 9. Errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        ((1, 4), {}, ValueError, r"end - start must be even .*start=1, end=4"),
        ((-1, 1), {}, ValueError, r"0 <= start <= end <= num_layers=6, got start=-1, end=1"),
        ((4, 8), {}, ValueError, r"num_layers=6, got start=4, end=8"),
        ((4, 2), {}, ValueError, r"got start=4, end=2"),
        ((1.0, 3), {}, TypeError, r"start must be an int, got 1.0"),
        ((True, 3), {}, TypeError, r"start must be an int, got True"),
        ((0, 2), dict(norm="shared", fold=False), ValueError, r"norm='shared'.*fold=False"),
        ((0, 2), dict(norm="approx"), ValueError, r"norm must be one of .*'approx'"),
    ],
)
def test_layer_parallel_bad_arguments_are_named(model, args, kwargs, error, message):
    with pytest.raises(error, match=message):
        layer_parallel(model, *args, **kwargs)


def test_depth_functions_need_a_plain_sequential_llama(model):
    # Abstract models suffice: the checks come before any parameter is read.
    mamba_config = models.MambaConfig(vocab_size=61, hidden_size=32, num_layers=2)
    mamba = nnx.eval_shape(lambda: models.build(mamba_config, nnx.Rngs(0)))
    for fn, args in (
        (layer_parallel, (0, 2)),
        (prune_layers, (0, 1)),
        (merge_layers, (0, 2)),
        (shuffle_layers, (0, 2)),
        (angular_distances, (_tokens(), 1)),
    ):
        with pytest.raises(TypeError, match=r"model must be a jaxlab Transformer .*got MambaLM"):
            fn(mamba, *args)
    for already in (layer_parallel(model, 0, 2), layer_parallel(model, 0, 2, fold=False)):
        field = "layer_widths" if already.config.layer_widths else "parallel_groups"
        for fn, args in ((layer_parallel, (2, 4)), (prune_layers, (0, 1)), (merge_layers, (2, 4))):
            with pytest.raises(
                ValueError, match=f"plain sequential Llama; its config has {field}="
            ):
                fn(already, *args)
    scanned_config = TransformerConfig(**TINY, scan_layers=True)
    scanned = nnx.eval_shape(lambda: models.build(scanned_config, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="scan_layers=True"):
        layer_parallel(scanned, 0, 2)
    with pytest.raises(ValueError, match="cannot remove all 6 layers"):
        prune_layers(model, 0, 6)
    with pytest.raises(ValueError, match="merge_layers: end - start must be even"):
        merge_layers(model, 0, 3)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, num_layers=6\], got 7"):
        angular_distances(model, _tokens(), 7)
    with pytest.raises(ValueError, match=r"lengths must be \[batch=2\] ints in \[1, seq=10\]"):
        angular_distances(model, _tokens(), 1, lengths=[0, 3])


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(layer_widths=(1, 2, 1)),
            r"layer_widths must have num_layers=6 entries, got \(1, 2, 1\)",
        ),
        (
            dict(parallel_groups=(2, 2, 1)),
            r"parallel_groups must sum to num_layers=6, got \(2, 2, 1\)",
        ),
        (dict(layer_widths=(1, 1, 0, 1, 1, 1)), r"layer_widths must be a tuple of positive ints"),
        (dict(parallel_groups=(2, -1, 5)), r"parallel_groups must be a tuple of positive ints"),
        (dict(layer_widths=(1, 1, True, 1, 1, 1)), r"layer_widths must be a tuple of positive"),
        (dict(parallel_groups=(2.0, 4)), r"parallel_groups must be a tuple of positive ints"),
        (
            dict(layer_widths=(2,) * 6, scan_layers=True),
            r"layer_widths cannot be combined with scan_layers",
        ),
        (
            dict(parallel_groups=(2, 2, 2), dwa={"dilation": 1, "period": 1}),
            r"parallel_groups cannot be combined with dwa",
        ),
        (
            dict(layer_widths=(1,) * 6, sparse_attention={"kind": "hash"}),
            r"layer_widths cannot be combined with sparse_attention",
        ),
        (dict(layer_widths=(1,) * 6, parallel_groups=(6,)), r"set one, got layer_widths="),
    ],
)
def test_bad_parallel_layer_configs_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**{**TINY, **changes})
