"""Mamba LMs: decoding from caches equals the full forward; configs; training on 8 devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lm_smoke, mamba_lm
from jaxlab import models
from jaxlab.models.mamba import MambaConfig, init_cache
from jaxlab.train import loop
from tests.models.finite_differences import check_gradients

BASE = MambaConfig(
    vocab_size=53,
    hidden_size=32,
    num_layers=3,
    state_size=8,
    head_dim=16,
    chunk_size=8,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
VARIANTS = {
    "mamba1": dict(mixer="mamba1"),
    "mamba2": dict(mixer="mamba2", num_groups=2),
    "mamba1_qkv": dict(mixer="mamba1_qkv", num_groups=2, intermediate_size=48),
    "discrete_mamba2": dict(mixer="discrete_mamba2", intermediate_size=48),
    "hybrid mamba1": dict(mixer="mamba1", intermediate_size=48, attention_layers=(1,)),
    "hybrid mamba2": dict(mixer="mamba2", intermediate_size=48, attention_layers=(0, 2)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_then_token_steps_equal_the_full_forward(variant):
    config = dataclasses.replace(BASE, **VARIANTS[variant])
    model = models.build(config, nnx.Rngs(3))
    # Random non-trivial conv weights and decays so that state carried wrongly would show.
    tokens = np.random.default_rng(0).integers(0, 53, (3, 25)).astype(np.int32)
    # Jitted as users call them (and one compile per shape instead of one per operation).
    forward = nnx.jit(lambda model, tokens: model(tokens))
    decode = nnx.jit(lambda model, tokens, cache, pos: model.decode(tokens, cache, positions=pos))
    full = forward(model, tokens)
    positions = np.broadcast_to(np.arange(25, dtype=np.int32), (3, 25))
    cache = init_cache(config, 3, 32)
    logits, cache = decode(model, tokens[:, :9], cache, positions[:, :9])
    steps = [logits]
    for t in range(9, 25):
        logits, cache = decode(model, tokens[:, t : t + 1], cache, positions[:, t : t + 1])
        steps.append(logits)
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(got, np.asarray(full), atol=1e-5)
    # And the model is causal: changing a late token leaves earlier logits alone.
    changed_tokens = tokens.copy()
    changed_tokens[:, 20] = (tokens[:, 20] + 1) % 53
    changed = forward(model, changed_tokens)
    np.testing.assert_allclose(np.asarray(changed[:, :20]), np.asarray(full[:, :20]), atol=1e-6)
    assert np.abs(np.asarray(changed[:, 20:] - full[:, 20:])).max() > 1e-4


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="mixer must be one of"):
        dataclasses.replace(BASE, mixer="s4")
    with pytest.raises(ValueError, match="head_dim=24 must divide inner_size=64"):
        dataclasses.replace(BASE, mixer="mamba2", head_dim=24)
    with pytest.raises(ValueError, match=r"attention_layers \[5\] are not layers of 0..2"):
        dataclasses.replace(BASE, intermediate_size=8, attention_layers=(5,))
    with pytest.raises(ValueError, match="num_groups=3 must divide the 4 heads"):
        dataclasses.replace(BASE, mixer="mamba2", num_groups=3)
    with pytest.raises(ValueError, match="num_groups=3 must divide the 4 heads"):
        dataclasses.replace(BASE, mixer="mamba1_qkv", num_groups=3)
    with pytest.raises(ValueError, match="state_size=6 must divide head_dim=16"):
        dataclasses.replace(BASE, mixer="mamba1_qkv", state_size=6)
    with pytest.raises(ValueError, match="unknown fields"):
        MambaConfig.from_dict(dict(vocab_size=5, hidden_size=8, num_layers=1, d_state=4))


@pytest.mark.parametrize("variant", ["mamba2", "hybrid"])
def test_tiny_mamba_lms_train_on_eight_devices(tmp_path, variant):
    config = lm_smoke.get_config()
    config.model = mamba_lm.get_config(variant).model
    config.model.update(
        hidden_size=32,
        intermediate_size=64 if variant == "hybrid" else 0,
        head_dim=16,
        state_size=8,
        chunk_size=16,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
    )
    config.num_steps = 24
    config.eval_every = config.checkpoint_every = 24
    config.mesh.update(data=4, fsdp=1, tensor=2)
    summary = loop.train_and_evaluate(config, str(tmp_path))
    assert summary.experiment.mesh.size == 8
    assert isinstance(summary.experiment.model_config, MambaConfig)
    losses = [r["loss"] for r in loop.read_metrics(str(tmp_path)) if "loss" in r]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    assert jax.tree.leaves(summary.state.params)


@pytest.mark.parametrize("variant", ["mamba1", "mamba1_qkv", "discrete_mamba2", "hybrid mamba2"])
def test_generate_with_right_padded_prompts_equals_greedy_on_the_full_forward(variant):
    """Batched, padded prompts: each row's tokens equal greedy argmax over the cacheless model."""
    from jaxlab.infer import generate

    config = dataclasses.replace(BASE, **VARIANTS[variant])
    model = models.build(config, nnx.Rngs(5))
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 53, n).tolist() for n in (5, 9, 2)]
    padded = np.zeros((3, 9), np.int32)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    out = generate(model, padded, [len(r) for r in rows], max_new_tokens=6, stop_tokens=())
    # The cacheless forward at one padded length (one compile): the model is causal, so the
    # logits at the last real token ignore the zeros after it.
    forward = nnx.jit(lambda m, x: m(x))
    for i, row in enumerate(rows):
        tokens = list(row)
        for _ in range(6):
            window = np.zeros((1, 9 + 6), np.int32)
            window[0, : len(tokens)] = tokens
            logits = forward(model, jnp.asarray(window))
            tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
        assert np.asarray(out.tokens[i]).tolist() == tokens[len(row) :], (variant, i)


def np_discrete_mamba2_mixer(p, hidden, config):
    """in_proj -> [x B C | z | a], identity-activation conv, h = exp(-softplus(a)) h + x B^T,
    y = h C + D x, out = W_o (y * silu(z + z_bias)); one B/C per head (float64 NumPy)."""
    d, n, heads, hd, k = (
        config.inner_size,
        config.state_size,
        config.heads,
        config.head_dim,
        config.conv_kernel,
    )
    batch, seq, _ = hidden.shape
    proj = hidden @ p["in_proj"]
    xbc, z, a = np.split(proj, [d + 2 * heads * n, 2 * d + 2 * heads * n], axis=-1)
    padded = np.concatenate([np.zeros((batch, k - 1, xbc.shape[-1])), xbc], axis=1)
    xbc = sum(padded[:, i : i + seq] * p["conv_weight"][i] for i in range(k)) + p["conv_bias"]
    x, B, C = np.split(xbc, [d, d + heads * n], axis=-1)
    x = x.reshape(batch, seq, heads, hd)
    B, C = B.reshape(batch, seq, heads, n), C.reshape(batch, seq, heads, n)
    h = np.zeros((batch, heads, hd, n))
    y = np.zeros_like(x)
    for t in range(seq):
        decay = np.exp(-np.log1p(np.exp(a[:, t])))  # exp(-softplus(a))
        h = decay[:, :, None, None] * h + x[:, t, :, :, None] * B[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, C[:, t]) + p["D"][:, None] * x[:, t]
    gate = z + p["z_bias"]
    return (y.reshape(batch, seq, d) * gate / (1 + np.exp(-gate))) @ p["out_proj"]


def np_mamba1_mixer(p, hidden, config):
    """in_proj -> (x, z); causal conv + SiLU on x; x_proj -> (dt_low, B, C);
    delta = softplus(dt_low W_dt + dt_bias); h = exp(delta A) h + delta x B, A = -exp(A_log);
    y = h C + D x; out = W_o (y * silu(z)) (float64 NumPy)."""
    d, n, k, r = config.inner_size, config.state_size, config.conv_kernel, config.dt_rank
    batch, seq, _ = hidden.shape
    x, z = np.split(hidden @ p["in_proj"], 2, axis=-1)
    padded = np.concatenate([np.zeros((batch, k - 1, d)), x], axis=1)
    x = sum(padded[:, i : i + seq] * p["conv_weight"][i] for i in range(k)) + p["conv_bias"]
    x = x / (1 + np.exp(-x))
    dt_low, B, C = np.split(x @ p["x_proj"], [r, r + n], axis=-1)
    delta = np.log1p(np.exp(dt_low @ p["dt_proj"] + p["dt_bias"]))
    A = -np.exp(p["A_log"])
    h = np.zeros((batch, d, n))
    y = np.zeros_like(x)
    for t in range(seq):
        inflow = (delta[:, t] * x[:, t])[..., None] * B[:, t, None]
        h = np.exp(delta[:, t, :, None] * A) * h + inflow
        y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t]) + p["D"] * x[:, t]
    return (y * z / (1 + np.exp(-z))) @ p["out_proj"]


def test_discrete_mamba2_mixer_is_the_llamba_recurrence_in_float64():
    config = dataclasses.replace(BASE, mixer="discrete_mamba2", intermediate_size=48)
    model = models.build(config, nnx.Rngs(7))
    mixer = model.layers[0].mixer
    for name in ("D", "z_bias", "conv_bias"):  # non-trivial values for the parameters at 1 or 0
        value = getattr(mixer, name)
        value[...] = jax.random.normal(jax.random.key(len(name)), value[...].shape)
    hidden = jax.random.normal(jax.random.key(1), (2, 11, config.hidden_size))
    got, _ = mixer(hidden, None)
    p = {k: np.asarray(v, np.float64) for k, v in nnx.to_pure_dict(nnx.state(mixer)).items()}
    want = np_discrete_mamba2_mixer(p, np.asarray(hidden, np.float64), config)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "mixer, reference",
    [("mamba1", np_mamba1_mixer), ("discrete_mamba2", np_discrete_mamba2_mixer)],
)
def test_mixer_gradients_match_float64_numpy_finite_differences(mixer, reference):
    """Every mixer parameter's gradient (the projections in_proj, x_proj, dt_proj, out_proj
    among them) against central differences of the float64 NumPy mixer."""
    config = dataclasses.replace(BASE, mixer=mixer)
    mixer = models.build(config, nnx.Rngs(2)).layers[0].mixer
    _randomize(mixer, 4)
    hidden = np.random.default_rng(5).normal(size=(2, 7, config.hidden_size))
    cotangent = np.random.default_rng(6).normal(size=(2, 7, config.hidden_size))

    def loss(m):
        return jnp.sum(m(jnp.asarray(hidden, jnp.float32), None)[0] * cotangent)

    check_gradients(mixer, loss, lambda p: np.sum(reference(p, hidden, config) * cotangent))


def _randomize(module, seed):
    """Random values for every parameter (the biases start at 0 and would hide a missing one)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype) for x in leaves]
    nnx.update(module, jax.tree.unflatten(treedef, leaves))


def test_hybrid_attention_layer_computes_the_llama3_teachers_layer_exactly():
    """A hybrid's attention layer with the parameters of a Transformer layer (llama3 rope
    scaling, attention and MLP biases, a sliding window, GQA) gives that layer's output."""
    from jaxlab.models import TransformerConfig
    from jaxlab.models.layers import RopeScaling

    scaling = RopeScaling(
        "llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    shared = dict(
        vocab_size=41,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        rope_theta=500.0,
        rope_scaling=scaling,
        attention_bias=True,
        mlp_bias=True,
        sliding_window=6,
        max_seq_len=128,
    )
    teacher = models.build(
        TransformerConfig(intermediate_size=48, num_layers=2, **shared), nnx.Rngs(0)
    )
    _randomize(teacher, 1)
    config = MambaConfig(
        num_layers=3,
        intermediate_size=48,
        mixer="mamba2",
        head_dim=16,
        state_size=8,
        chunk_size=8,
        attention_layers=(1,),
        **shared,
    )
    student = models.build(config, nnx.Rngs(2))
    _randomize(student, 3)
    assert student.layers[0].mlp.gate_bias[...].shape == (48,)  # mlp_bias reaches Mamba blocks
    nnx.update(student.layers[1], nnx.state(teacher.layers[0]))

    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 21, 32)), jnp.float32)
    positions = jnp.broadcast_to(40 + jnp.arange(21), (2, 21))  # far past the original length
    want, _ = teacher.layers[0](x, positions, None, None)
    got, _ = student.layers[1](x, positions, None, None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # In the full model: the student's residual after its attention layer is the teacher layer
    # applied to the residual before it.
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 41, (2, 21)), jnp.int32)
    _, hidden = student(tokens, return_hidden=True)
    want, _ = teacher.layers[0](
        hidden.residuals[1], jnp.broadcast_to(jnp.arange(21), (2, 21)), None, None
    )
    np.testing.assert_array_equal(np.asarray(hidden.residuals[2]), np.asarray(want))

    # Each of the passed-through settings matters: without it the layer computes something else.
    for change in (dict(rope_scaling=None), dict(sliding_window=None)):
        other = models.build(dataclasses.replace(config, **change), nnx.Rngs(2))
        nnx.update(other.layers[1], nnx.state(teacher.layers[0]))
        out, _ = other.layers[1](x, positions, None, None)
        reference, _ = teacher.layers[0](x, positions, None, None)
        assert float(jnp.abs(out - reference).max()) > 1e-3, change


def test_mamba_config_token_ids_and_attention_settings_round_trip():
    config = dataclasses.replace(
        BASE,
        intermediate_size=48,
        attention_layers=(1,),
        bos_token_id=1,
        eos_token_id=[2, 3],
        rope_scaling=dict(type="linear", factor=2.0),
        attention_bias=True,
        sliding_window=8,
    )
    assert config.eos_token_id == (2, 3)
    assert config.rope_scaling.factor == 2.0
    assert MambaConfig.from_dict(config.to_dict()) == config
    att = config.attention_config()
    assert (att.rope_scaling, att.attention_bias, att.sliding_window) == (
        config.rope_scaling,
        True,
        8,
    )
    with pytest.raises(ValueError, match="eos_token_id must be a non-negative int or a tuple"):
        dataclasses.replace(BASE, eos_token_id=-1)
    with pytest.raises(ValueError, match="sliding_window must be an int >= 1 or None, got 0"):
        dataclasses.replace(BASE, sliding_window=0)


@pytest.mark.parametrize("variant", ["mamba1", "hybrid mamba2"])
def test_generate_stops_a_mamba_model_at_its_eos_token(variant):
    """generate reads MambaConfig.eos_token_id: rows stop at the first eos (emitted, then pad)."""
    from jaxlab.infer import generate

    config = dataclasses.replace(BASE, **VARIANTS[variant])
    prompts = np.random.default_rng(6).integers(1, 53, (3, 5)).astype(np.int32)
    free = generate(models.build(config, nnx.Rngs(8)), prompts, max_new_tokens=8)
    free_tokens = np.asarray(free.tokens)
    assert (np.asarray(free.lengths) == 8).all()  # no eos configured: nothing stops
    # Make the greedy token of row 0 at step 2 the eos: the same model, with that eos.
    eos = int(free_tokens[0, 2])
    model = models.build(dataclasses.replace(config, eos_token_id=eos), nnx.Rngs(8))
    out = generate(model, prompts, max_new_tokens=8)
    for row, tokens in enumerate(free_tokens):
        hits = np.flatnonzero(tokens == eos)
        stop = int(hits[0]) + 1 if hits.size else 8
        assert int(out.lengths[row]) == stop, row
        np.testing.assert_array_equal(np.asarray(out.tokens[row, :stop]), tokens[:stop])
        assert (np.asarray(out.tokens[row, stop:]) == 0).all()
    assert int(out.lengths[0]) <= 3


@pytest.mark.parametrize(
    "groups,tensor", [(2, 2), (1, 4), (2, 4)], ids=["groups-split", "one-group", "heads-whole"]
)
def test_the_ssd_runs_per_shard_in_a_sharded_model_and_computes_the_same(groups, tensor):
    # 4 heads over the tensor axis: 2 groups split with them; 1 group goes whole to every shard;
    # 2 groups over 4 shards cannot split, so the heads stay whole too.
    from jaxlab.models.partitioning import activation_sharding, mesh_parts
    from jaxlab.train.sharding import make_mesh

    config = dataclasses.replace(BASE, mixer="mamba2", num_groups=groups)
    mixer = models.build(config, nnx.Rngs(3)).layers[0].mixer
    _randomize(mixer, 4)
    hidden = jax.random.normal(jax.random.key(2), (4, 19, config.hidden_size))
    want, _ = mixer(hidden, None)
    mesh = make_mesh(data=8 // tensor, tensor=tensor)
    with activation_sharding(mesh):
        assert mesh_parts("heads") == tensor and mesh_parts("batch") == 8 // tensor
        jaxpr = str(jax.make_jaxpr(lambda h: mixer(h, None)[0])(hidden))
        got = jax.jit(lambda h: mixer(h, None)[0])(hidden)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mixer,state,tensor",
    [("mamba1", 8, 2), ("mamba1_qkv", 8, 4), ("mamba1_qkv", 16, 8)],
    ids=["one-group", "groups-split", "channels-whole"],
)
def test_the_selective_scan_runs_per_shard_in_a_sharded_model_and_computes_the_same(
    mixer, state, tensor
):
    # 64 channels over the tensor axis: mamba1's one group goes whole to every shard; mamba1_qkv
    # has a group per state_size channels: 8 groups split over 4 shards, 4 over 8 cannot, so the
    # channels stay whole too. A cache gives the scan an initial state.
    from jaxlab.models.interface import MixerCache
    from jaxlab.models.partitioning import activation_sharding, mesh_parts
    from jaxlab.train.sharding import make_mesh

    config = dataclasses.replace(BASE, mixer=mixer, state_size=state)
    mixer = models.build(config, nnx.Rngs(3)).layers[0].mixer
    _randomize(mixer, 4)
    keys = jax.random.split(jax.random.key(2), 3)
    hidden = jax.random.normal(keys[0], (4, 19, config.hidden_size))
    cache = MixerCache(
        jax.random.normal(keys[1], (4, config.conv_kernel - 1, config.inner_size)),
        jax.random.normal(keys[2], (4, config.inner_size, state)),
    )
    want = mixer(hidden, cache)
    mesh = make_mesh(data=8 // tensor, tensor=tensor)
    with activation_sharding(mesh):
        assert mesh_parts("mlp") == tensor
        jaxpr = str(jax.make_jaxpr(lambda h, c: mixer(h, c))(hidden, cache))
        got = jax.jit(lambda h, c: mixer(h, c))(hidden, cache)
    assert "shard_map" in jaxpr
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, rtol=1e-5)
