"""One calling convention and one cache type for every model family.

``model(tokens)`` returns logits, ``model.decode(tokens, cache)`` returns ``(logits, cache)``, the
inspection flags append one HiddenStates to either, and the cache of every family is a
``jaxlab.models.interface.Cache`` that round-trips through ``jax.tree_util`` and ``jit``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.models.interface import Cache, LayerCache, MixerCache
from jaxlab.models.layers import HiddenStates

BATCH, SEQ, MAX_LEN, VOCAB = 2, 7, 12, 41
LLAMA = dict(
    name="llama",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
MAMBA = dict(
    name="mamba",
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=3,
    state_size=8,
    head_dim=16,
    chunk_size=4,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
FAMILIES = {
    "transformer": LLAMA,
    "denseformer": dict(LLAMA, dwa=dict(dilation=1, period=1)),
    "sparse hash": dict(LLAMA, sparse_attention=dict(kind="hash", num_buckets=4)),
    "sparse qk": dict(LLAMA, sparse_attention=dict(kind="qk", keep_rate=0.6)),
    "mamba1": dict(MAMBA, mixer="mamba1"),
    "mamba2": dict(MAMBA, mixer="mamba2"),
    "discrete_mamba2": dict(MAMBA, mixer="discrete_mamba2", intermediate_size=48),
    "hybrid mamba2": dict(MAMBA, mixer="mamba2", intermediate_size=48, attention_layers=(1,)),
}


def kinds(name: str) -> list[type]:
    """The per-layer cache entry each family should hold, written out independently."""
    fields = FAMILIES[name]
    attention = fields.get("attention_layers", range(3) if fields["name"] == "llama" else ())
    return [LayerCache if i in attention else MixerCache for i in range(3)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    config = models.make_config(FAMILIES[request.param])
    model = models.build(config, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    return request.param, config, model, tokens


def test_forward_returns_logits_and_decode_returns_logits_and_cache(family):
    name, config, model, tokens = family
    logits = model(tokens)
    assert isinstance(logits, jax.Array) and logits.shape == (BATCH, SEQ, VOCAB)
    out = model.decode(tokens, models.make_cache(config, BATCH, MAX_LEN))
    assert type(out) is tuple and len(out) == 2
    decoded, cache = out
    assert isinstance(decoded, jax.Array) and type(cache) is Cache
    assert [type(entry) for entry in cache.layers] == kinds(name)
    # Prefilling the whole sequence computes the forward's logits.
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(logits), atol=1e-4)
    # The forward call no longer takes a cache: it has one return type.
    with pytest.raises(TypeError, match="cache"):
        model(tokens, cache=cache)


def test_inspection_flags_append_one_hidden_states(family):
    _, config, model, tokens = family
    for flags in (dict(return_hidden=True), dict(return_attention=True)):
        out = model(tokens, **flags)
        assert type(out) is tuple and len(out) == 2
        assert isinstance(out[0], jax.Array) and isinstance(out[1], HiddenStates)
        np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(model(tokens)))
        out = model.decode(tokens, models.make_cache(config, BATCH, MAX_LEN), **flags)
        assert type(out) is tuple and len(out) == 3
        assert type(out[1]) is Cache and isinstance(out[2], HiddenStates)
        assert len(out[2].residuals) == config.num_layers + 1


def test_every_family_has_the_same_cache_container():
    types = set()
    for name, fields in FAMILIES.items():
        cache = models.make_cache(models.make_config(fields), BATCH, MAX_LEN)
        types.add(type(cache))
        assert [type(entry) for entry in cache.layers] == kinds(name), name
        assert len(cache) == 3 and cache[0] is cache.layers[0]
    assert types == {Cache}


def test_cache_round_trips_through_tree_util_and_jit(family):
    _, config, model, tokens = family
    cache = models.make_cache(config, BATCH, MAX_LEN)
    _, cache = model.decode(tokens, cache)  # non-zero entries, so a mix-up would show
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert len(leaves) == 2 * config.num_layers  # (k, v) or (conv, ssm) per layer
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(rebuilt) is Cache and jax.tree.structure(rebuilt) == treedef
    for got, want in zip(jax.tree.leaves(rebuilt), leaves, strict=True):
        assert got is want

    doubled = jax.jit(lambda c: jax.tree.map(lambda x: 2 * x, c))(cache)
    assert type(doubled) is Cache and jax.tree.structure(doubled) == treedef
    for got, want in zip(jax.tree.leaves(doubled), leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(got), 2 * np.asarray(want))

    # A jitted decode step takes and returns the cache with an unchanged structure (what a
    # lax.while_loop carry needs), and equals the eager step.
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token, position, cache):
        m = nnx.merge(graphdef, state)
        return m.decode(token[:, None], cache, positions=position[:, None])

    token, position = tokens[:, 0], jnp.full((BATCH,), SEQ, jnp.int32)
    jitted_logits, jitted_cache = step(state, token, position, cache)
    eager_logits, eager_cache = model.decode(token[:, None], cache, positions=position[:, None])
    assert jax.tree.structure(jitted_cache) == treedef
    np.testing.assert_allclose(np.asarray(jitted_logits), np.asarray(eager_logits), atol=1e-5)
    for got, want in zip(jax.tree.leaves(jitted_cache), jax.tree.leaves(eager_cache), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_a_wrong_cache_is_an_error_naming_it():
    llama = models.make_config(FAMILIES["transformer"])
    hybrid = models.make_config(FAMILIES["hybrid mamba2"])
    model = models.build(hybrid, nnx.Rngs(0))
    tokens = jnp.zeros((BATCH, 3), jnp.int32)
    cache = models.make_cache(hybrid, BATCH, MAX_LEN)
    with pytest.raises(TypeError, match=r"MambaLM.decode: cache must be .*Cache.*got tuple"):
        model.decode(tokens, cache.layers)
    with pytest.raises(ValueError, match="MambaLM.decode: cache has 2 layers, the model has 3"):
        model.decode(tokens, Cache(cache.layers[:2]))
    with pytest.raises(TypeError, match=r"cache.layers\[0\] must be a MixerCache.*got LayerCache"):
        model.decode(tokens, models.make_cache(llama, BATCH, MAX_LEN))
