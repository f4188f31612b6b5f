"""CoTFormer: cross-repeat attention against a float64 NumPy model, its reductions to the
Transformer, cached decoding, adaptive depth and sharded training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import cotformer_lm, lm_smoke
from jaxlab import models
from jaxlab.infer import generate
from jaxlab.models import CoTFormer, CoTFormerConfig, Transformer, TransformerConfig
from jaxlab.models.cotformer import budget_counts, draw_capacities
from jaxlab.train import loop
from tests.models.finite_differences import check_gradients
from tests.train.overrides import configure

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2)
ADAPTIVE = dict(adaptive=True, ln_mid=True, depth_embedding="linear", n_layer_begin=1)


def build(**fields) -> CoTFormer:
    config = CoTFormerConfig(**{**TINY, "n_layer_mid": 2, "n_repeat": 3, **fields})
    return models.build(config, nnx.Rngs(0))


# The model's forward and decoding, jitted (one compile per shape instead of one per operation).
forward = nnx.jit(lambda model, tokens: model(tokens))
packed_forward = nnx.jit(
    lambda model, tokens, positions, segment_ids: model(
        tokens, positions=positions, segment_ids=segment_ids
    )
)
decode = nnx.jit(lambda model, tokens, cache, pos: model.decode(tokens, cache, positions=pos))


def random_tokens(seed, batch=2, seq=9):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, seq)))


def numpy_params(module):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module)))


# --- a float64 NumPy CoTFormer, written from the paper's rule -----------------------------------


def np_rms(x, scale, eps=1e-5):
    return scale * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def np_rope(x, positions, head_dim):
    inv = 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    ang = positions[:, :, None, None] * inv
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return np.concatenate(
        [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1
    )


def np_block(p, x, positions, kv_cache, mask):
    """Pre-norm block; ``kv_cache`` (list) collects this call's (k, v); queries attend to the
    concatenation of everything in it under ``mask`` [q_len, kv_len]."""
    a, heads, head_dim = p["attn"], TINY["num_heads"], TINY["hidden_size"] // TINY["num_heads"]
    group = heads // TINY["num_kv_heads"]
    h = np_rms(x, p["input_norm"]["scale"])
    q = np_rope(np.einsum("bse,ehd->bshd", h, a["q_proj"]), positions, head_dim)
    k = np_rope(np.einsum("bse,ehd->bshd", h, a["k_proj"]), positions, head_dim)
    v = np.einsum("bse,ehd->bshd", h, a["v_proj"])
    kv_cache.append((k, v))
    k_all = np.repeat(np.concatenate([kv[0] for kv in kv_cache], 1), group, axis=2)
    v_all = np.repeat(np.concatenate([kv[1] for kv in kv_cache], 1), group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k_all) / np.sqrt(head_dim)
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("bhqk,bkhd,hde->bqe", probs, v_all, a["o_proj"])
    m = p["mlp"]
    h = np_rms(x, p["post_attention_norm"]["scale"])
    gate = h @ m["gate_proj"]
    return x + ((gate / (1 + np.exp(-gate))) * (h @ m["up_proj"])) @ m["down_proj"]


def rule_mask(seq, n_repeat, repeat, cross_repeat):
    """(rho, s) visible to (repeat, t) iff rho <= repeat (rho == repeat for BUT) and s <= t, over
    the repeat-major keys of repeats 0..repeat."""
    mask = np.zeros((seq, (repeat + 1) * seq), bool)
    for rho in range(repeat + 1):
        for t in range(seq):
            for s in range(seq):
                seen = rho <= repeat if cross_repeat else rho == repeat
                mask[t, rho * seq + s] = seen and s <= t
    return mask


def np_cotformer(model, tokens, p=None):
    """Logits of ``model`` on ``tokens``, with parameters ``p`` (default: the model's)."""
    c, p = model.config, numpy_params(model) if p is None else p
    seq = tokens.shape[1]
    positions = np.broadcast_to(np.arange(seq), tokens.shape).astype(np.float64)
    causal = np.tril(np.ones((seq, seq), bool))
    x = p["embed"][np.asarray(tokens)]
    for i in range(c.n_layer_begin):
        x = np_block(p["begin"][i], x, positions, [], causal)
    caches = [[] for _ in range(c.n_layer_mid)]
    # Adaptive: which tokens ran each repeat; a key of a repeat its token did not run is hidden.
    active, reached, gate = np.ones(tokens.shape, bool), [], None
    for repeat in range(c.n_repeat):
        reached.append(active)
        keys_reached = np.concatenate(reached, axis=1)[:, None, None, :]
        mask = rule_mask(seq, c.n_repeat, repeat, c.cross_repeat)[None, None] & keys_reached
        x_in, y = x, x
        if c.depth_embedding == "linear":
            y = y + (c.n_repeat - 1 - repeat) * p["depth_embed"]
        for i in range(c.n_layer_mid):
            y = np_block(p["mid"][i], y, positions, caches[i], mask)
        if c.ln_mid:
            y = np_rms(y, p["ln_mid"]["scale"])
        if c.adaptive and repeat > 0:
            y = np.where(
                reached[-1][..., None], (1 - gate[..., None]) * x_in + gate[..., None] * y, x_in
            )
        x = y
        if c.adaptive and repeat < c.n_repeat - 1:
            gate = 1 / (1 + np.exp(-(x @ p["router"][repeat])))
            active = active & (gate >= c.threshold)
    for i in range(c.n_layer_end):
        x = np_block(p["end"][i], x, positions, [], causal)
    return np_rms(x, p["final_norm"]["scale"]) @ p["lm_head"]


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_repeat=0), "CoTFormerConfig.n_repeat must be a positive int, got 0"),
        (dict(n_layer_begin=-1), "CoTFormerConfig.n_layer_begin must be a non-negative int"),
        (dict(depth_embedding="sine"), "CoTFormerConfig.depth_embedding must be one of"),
        (dict(threshold=1.5), r"CoTFormerConfig.threshold must be in \[0, 1\], got 1.5"),
        (dict(adaptive=True, n_repeat=1), "CoTFormerConfig.adaptive needs n_repeat >= 2"),
        (dict(num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
        (dict(dtype="float8"), "CoTFormerConfig.dtype must be one of"),
        (dict(routing="topk"), "CoTFormerConfig.routing must be 'threshold' or 'sample'"),
    ],
)
def test_bad_config_fields_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        CoTFormerConfig(**{**TINY, "n_layer_mid": 1, "n_repeat": 2, **changes})


def test_build_from_mapping_and_parameters_carry_logical_axes():
    model = models.build(
        dict(name="cotformer", n_layer_mid=1, n_repeat=2, adaptive=True, ln_mid=True, **TINY),
        nnx.Rngs(0),
    )
    assert isinstance(model, CoTFormer)
    axes = models.layers.logical_axes(nnx.state(model, nnx.Param))
    assert axes["mid"][0]["attn"]["k_proj"] == ("embed", "kv_heads", "head_dim")
    assert axes["router"] == (None, "embed")
    with pytest.raises(ValueError, match=r"unknown fields \['n_layers'\]"):
        models.build(dict(name="cotformer", n_layers=2, **TINY), nnx.Rngs(0))


# --- the forward pass ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        dict(cross_repeat=True),
        dict(cross_repeat=False),
        dict(n_layer_begin=1, n_layer_end=1, ln_mid=True, depth_embedding="linear"),
    ],
)
def test_forward_equals_float64_numpy_rule(fields):
    model = build(**fields)
    # Random nonzero embeddings of depth and norms, so that they matter.
    tokens = random_tokens(1)
    np.testing.assert_allclose(
        np.asarray(forward(model, tokens)), np_cotformer(model, tokens), atol=2e-5, rtol=1e-4
    )


def test_adaptive_threshold_forward_equals_float64_numpy():
    model = build(**ADAPTIVE, n_layer_end=1)
    model.router[...] = 3.0 * jax.random.normal(jax.random.key(5), model.router.shape)
    tokens = random_tokens(5, seq=10)
    expected = np_cotformer(model, tokens)
    np.testing.assert_allclose(np.asarray(forward(model, tokens)), expected, atol=2e-5, rtol=1e-4)
    # At each extra repeat some tokens ran and some had stopped (so the hidden keys and the
    # gating were exercised).
    ran = ran_repeat(model, tokens)
    assert all(0 < ran[r].sum() < ran[r].size for r in (1, 2))


@pytest.mark.parametrize("fields", [dict(), dict(ADAPTIVE, n_layer_end=1)])
def test_loss_gradients_match_float64_numpy_finite_differences(fields):
    """Every parameter's gradient (projections, router and head among them) against central
    differences of the float64 NumPy model."""
    model = build(**fields)
    if model.config.adaptive:
        model.router[...] = 3.0 * jax.random.normal(jax.random.key(5), model.router.shape)
    tokens = random_tokens(7, seq=6)
    cotangent = np.random.default_rng(8).normal(size=(*tokens.shape, TINY["vocab_size"]))

    def loss(m):
        return jnp.sum(m(tokens) * cotangent)

    check_gradients(model, loss, lambda p: np.sum(np_cotformer(model, tokens, p) * cotangent))


@pytest.mark.parametrize("fields", [dict(), dict(ADAPTIVE, n_layer_end=1)])
def test_packed_rows_equal_separate_rows(fields):
    model = build(**fields)
    if model.config.adaptive:
        model.router[...] = 3.0 * jax.random.normal(jax.random.key(5), model.router.shape)
    first, second = random_tokens(12, batch=1, seq=6), random_tokens(13, batch=1, seq=5)
    packed = jnp.concatenate([first, second], axis=1)
    positions = jnp.concatenate([jnp.arange(6), jnp.arange(5)])[None]
    segment_ids = jnp.asarray([[0] * 6 + [1] * 5])
    logits = np.asarray(packed_forward(model, packed, positions, segment_ids))
    np.testing.assert_allclose(logits[:, :6], np.asarray(forward(model, first)), atol=1e-5)
    np.testing.assert_allclose(logits[:, 6:], np.asarray(forward(model, second)), atol=1e-5)


def test_remat_gives_the_same_gradients_and_recomputes():
    tokens = random_tokens(14)

    def grads_and_jaxpr(remat):
        model = build(**ADAPTIVE, remat=remat)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return nnx.merge(graphdef, p)(tokens).mean()

        return jax.jit(jax.grad(loss))(params), str(jax.make_jaxpr(jax.grad(loss))(params))

    plain, plain_jaxpr = grads_and_jaxpr(False)
    remat, remat_jaxpr = grads_and_jaxpr(True)
    assert "remat" in remat_jaxpr and "remat" not in plain_jaxpr
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_cross_repeat_attention_changes_the_output():
    # The two rules differ for real (so the NumPy test above can tell them apart).
    cross, block_ut = build(cross_repeat=True), build(cross_repeat=False)
    tokens = random_tokens(2)
    assert np.abs(np.asarray(cross(tokens)) - np.asarray(block_ut(tokens))).max() > 1e-4


def transformer_with(model: CoTFormer, n_repeat_copies: int) -> Transformer:
    """A Transformer whose blocks are the CoTFormer's begin, mid x n_repeat_copies and end."""
    c = model.config
    layers = c.n_layer_begin + c.n_layer_mid * n_repeat_copies + c.n_layer_end
    fields = dict(TINY, num_layers=layers)
    transformer = models.build(TransformerConfig(**fields), nnx.Rngs(5))
    params = nnx.to_pure_dict(nnx.state(model))
    stack = (
        [params["begin"][i] for i in range(c.n_layer_begin)]
        + [params["mid"][i] for _ in range(n_repeat_copies) for i in range(c.n_layer_mid)]
        + [params["end"][i] for i in range(c.n_layer_end)]
    )
    target = nnx.to_pure_dict(nnx.state(transformer))
    target.update(embed=params["embed"], final_norm=params["final_norm"], lm_head=params["lm_head"])
    target["layers"] = dict(enumerate(stack))
    state = nnx.state(transformer)
    nnx.replace_by_pure_dict(state, target)
    nnx.update(transformer, state)
    return transformer


def test_one_repeat_equals_the_transformer():
    model = build(n_repeat=1, n_layer_begin=1, n_layer_end=1)
    tokens = random_tokens(3)
    expected = transformer_with(model, 1)(tokens)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(expected), atol=1e-6)


def test_block_universal_transformer_equals_the_stack_applied_r_times():
    model = build(cross_repeat=False, n_layer_begin=1, n_layer_end=1)
    tokens = random_tokens(4)
    expected = transformer_with(model, 3)(tokens)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(expected), atol=1e-5)


# --- cached decoding -----------------------------------------------------------------------------


def decode_all(model, tokens, prompt_len):
    """Logits of a prefill of ``prompt_len`` tokens then one decode step per token."""
    batch, seq = tokens.shape
    cache = models.make_cache(model.config, batch, seq + 2)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    logits, cache = decode(model, tokens[:, :prompt_len], cache, positions[:, :prompt_len])
    steps = [logits]
    for t in range(prompt_len, seq):
        logits, cache = decode(model, tokens[:, t : t + 1], cache, positions[:, t : t + 1])
        steps.append(logits)
    return np.concatenate([np.asarray(s) for s in steps], axis=1)


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(cross_repeat=False),
        dict(n_layer_begin=1, n_layer_end=1, ln_mid=True, depth_embedding="per_repeat"),
        dict(ADAPTIVE, n_layer_end=1),
    ],
)
def test_cached_decoding_equals_the_full_forward(fields):
    model = build(**fields)
    if model.config.adaptive:
        # Routers that send some tokens deeper and stop others (weights around 0.5).
        model.router[...] = 3.0 * jax.random.normal(jax.random.key(5), model.router.shape)
    tokens = random_tokens(5, seq=10)
    full = np.asarray(forward(model, tokens))
    np.testing.assert_allclose(decode_all(model, tokens, 4), full, atol=1e-5)
    if model.config.adaptive:  # the threshold really split the tokens at some repeat
        hidden = model(tokens, return_hidden=True)[1].residuals
        first = model.config.n_layer_begin + 1
        stayed = [np.all(hidden[first + r] == hidden[first + r + 1], axis=-1) for r in (1, 2)]
        assert 0 < np.sum(stayed) < 2 * stayed[0].size


def test_generate_greedy_equals_argmax_of_full_forwards():
    model = build(**ADAPTIVE)
    model.router[...] = 3.0 * jax.random.normal(jax.random.key(5), model.router.shape)
    prompts = random_tokens(6, seq=5)
    out = generate(model, prompts, max_new_tokens=6, stop_tokens=())
    sequence = prompts
    for _ in range(6):
        following = jnp.argmax(forward(model, sequence)[:, -1], axis=-1)
        sequence = jnp.concatenate([sequence, following[:, None].astype(sequence.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(sequence[:, 5:]))


def test_generate_right_padded_prompts_equals_each_prompt_alone():
    model = build(**ADAPTIVE)
    model.router[...] = 3.0 * jax.random.normal(jax.random.key(5), model.router.shape)
    prompts = random_tokens(15, seq=6)
    out = generate(model, prompts, [6, 3], max_new_tokens=4, stop_tokens=())
    alone = generate(model, prompts[1:, :3], max_new_tokens=4, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.tokens[1]), np.asarray(alone.tokens[0]))


def test_decoding_with_a_budget_is_an_error():
    model = build(adaptive=True)
    model.routing = (0.5, 0.25)
    with pytest.raises(ValueError, match="routing must be 'threshold' to decode"):
        model.decode(random_tokens(0, seq=3), models.make_cache(model.config, 2, 4))


# --- adaptive depth ------------------------------------------------------------------------------


def ran_repeat(model, tokens):
    """[n_repeat, batch, seq] bool: which tokens the mid stack updated at each repeat (an
    exited token's representation is carried over unchanged)."""
    hidden = model(tokens, return_hidden=True)[1].residuals
    first, n_repeat = model.config.n_layer_begin, model.config.n_repeat
    changed = [np.any(hidden[first + r] != hidden[first + r + 1], axis=-1) for r in range(n_repeat)]
    return np.stack(changed)


def test_budget_of_all_ones_equals_full_depth():
    model = build(adaptive=True)
    full_depth = build(adaptive=True, threshold=0.0)  # same parameters, every token continues
    model.routing = (1.0, 1.0)
    tokens = random_tokens(9)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(full_depth(tokens)))
    assert ran_repeat(model, tokens).all()


@pytest.mark.parametrize("budget", [(0.5, 0.25), (0.75, 0.7), (0.3, 0.0)])
def test_tokens_per_repeat_equal_the_budget(budget):
    model = build(adaptive=True, n_repeat=3)
    model.router[...] = jax.random.normal(jax.random.key(1), model.router.shape)
    model.routing = budget
    seq = 16
    ran = ran_repeat(model, random_tokens(10, seq=seq))
    # The authors' chain: n_{r+1} = int(f_r / f_{r-1} * n_r), f_0 = 1, n_1 = seq.
    expected, previous, count = [seq], 1.0, seq
    for fraction in budget:
        count = int(fraction / previous * count) if previous > 0 else 0
        expected.append(count)
        previous = fraction
    np.testing.assert_array_equal(np.asarray(budget_counts(budget, seq)), expected)
    np.testing.assert_array_equal(
        ran.sum(axis=-1), np.broadcast_to(np.array(expected)[:, None], (3, 2))
    )
    # Deeper repeats run a subset of the tokens of the shallower ones.
    assert np.all(ran[1:] <= ran[:-1])


def test_capacity_draws_are_sorted_and_clamped():
    draws = np.stack([np.asarray(draw_capacities(jax.random.key(i), 5)) for i in range(300)])
    assert draws.shape == (300, 4)
    assert np.all(np.diff(draws, axis=1) <= 0) and np.all((draws > 0) & (draws <= 1))
    # min(1.05 U, 1) is exactly 1 with probability 0.05/1.05 per value.
    ones = np.mean(draws == 1.0)
    assert 0.02 < ones < 0.08
    uniforms = np.asarray(jax.random.uniform(jax.random.key(3), (4,)))
    expected = np.sort(np.minimum(uniforms * 1.05, 1.0))[::-1]
    np.testing.assert_allclose(
        np.asarray(draw_capacities(jax.random.key(3), 5)), expected, rtol=1e-6
    )


def test_sampled_budget_changes_with_the_batch_and_trains():
    model = build(adaptive=True)
    model.routing = "sample"
    model.router[...] = jax.random.normal(jax.random.key(2), model.router.shape)
    tokens = random_tokens(11, seq=16)
    ran = ran_repeat(model, tokens)
    # Each row of a batch runs the same budget, the same batch draws it again, another batch
    # draws another one.
    np.testing.assert_array_equal(ran.sum(axis=-1)[:, 0], ran.sum(axis=-1)[:, 1])
    np.testing.assert_array_equal(ran_repeat(model, tokens), ran)
    counts = {
        tuple(ran_repeat(model, random_tokens(s, seq=16)).sum(axis=-1)[:, 0]) for s in range(6)
    }
    assert len(counts) > 1
    assert all(np.all(np.diff(c) <= 0) for c in counts)

    def loss(m):
        return m(tokens).mean()

    grads = nnx.grad(loss)(model)
    assert np.abs(np.asarray(grads["router"])).max() > 0


# --- training ------------------------------------------------------------------------------------


def losses(workdir):
    return {r["step"]: r["loss"] for r in loop.read_metrics(str(workdir)) if "loss" in r}


def smoke_config(**overrides):
    config = lm_smoke.get_config()
    config.model = cotformer_lm.get_config().model
    config.model.update(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2)
    config.model.update(max_seq_len=64, n_layer_begin=1, ln_mid=True, depth_embedding="linear")
    config.update(num_steps=4)
    config.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    return configure(config, **overrides)


def test_adaptive_model_trains_with_sampled_budgets(tmp_path):
    adaptive = {"model.adaptive": True, "model.routing": "sample"}
    config = smoke_config(**adaptive, num_steps=2, eval_every=2)
    result = loop.train_and_evaluate(config, str(tmp_path))
    assert result.step == 2 and np.isfinite(result.eval["eval_loss"])


def test_sharded_training_follows_one_device(tmp_path):
    assert jax.device_count() == 8
    loop.train_and_evaluate(smoke_config(), str(tmp_path / "one"))
    mesh = {"mesh.data": 4, "mesh.tensor": 2, "mesh.num_devices": 0}
    sharded = loop.train_and_evaluate(smoke_config(**mesh), str(tmp_path / "eight"))
    up_proj = sharded.state.params["mid"][0]["mlp"]["up_proj"]
    assert len(up_proj.sharding.device_set) == 8
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert len(a) == 4
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)


# --- MACs ----------------------------------------------------------------------------------------


def test_macs_equal_a_hand_count():
    small = dict(vocab_size=5, hidden_size=4, intermediate_size=6, num_heads=2, num_kv_heads=1)
    shape = dict(small, n_layer_begin=1, n_layer_mid=1, n_repeat=2)
    config = CoTFormerConfig(**shape)
    # Per token and block: q 4*2*2 + k 4*1*2 + v 8 + o 2*2*4 = 48, MLP 3*4*6 = 72: 120.
    # Per (query, key) pair: 2 heads * head_dim 2 * (scores + values) = 8. Head: 3*4*5 = 60.
    # Begin: 3*120 + 3*3*8 = 432; repeat 1: 432; repeat 2 sees 6 keys: 360 + 3*6*8 = 504.
    assert models.cotformer.macs(config, 3) == 432 + 432 + 504 + 60
    block_ut = CoTFormerConfig(**shape, cross_repeat=False)
    assert models.cotformer.macs(block_ut, 3) == 432 + 432 + 432 + 60
    adaptive = CoTFormerConfig(**shape, adaptive=True)
    # Budget 2/3: 2 of 3 tokens run repeat 2 against 3 + 2 keys; the router scores 3 tokens.
    assert models.cotformer.macs(adaptive, 3, budget=(2 / 3,)) == 432 + 432 + 12 + 240 + 80 + 60
    assert models.cotformer.macs(adaptive, 3, budget=(1.0,)) == 432 + 432 + 12 + 504 + 60
    with pytest.raises(ValueError, match=r"macs: budget needs an adaptive config and 1 fractions"):
        models.cotformer.macs(config, 3, budget=(0.5,))
