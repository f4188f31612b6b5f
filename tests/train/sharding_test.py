"""Parameter placement from flax's own sharding metadata, on the 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlab import models
from jaxlab.models.partitioning import (
    DEFAULT_RULES,
    activation_sharding,
    logical_to_spec,
    per_shard,
)
from jaxlab.train.sharding import make_mesh, state_shardings

TINY = dict(
    name="llama",
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
)


def with_user_layers(model):
    """``model`` with flax layers a user adds: one annotated with logical axes, one with mesh
    axes, one not annotated. Built as flax documents for placement after creation."""
    init = nnx.initializers.lecun_normal()
    with nnx.use_eager_sharding(False):
        model.adapter = nnx.Linear(
            64,
            128,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)),
            rngs=nnx.Rngs(1),
        )
        model.gate = nnx.Param(jnp.ones((8, 64)), out_sharding=(None, "tensor"))
        model.plain = nnx.Linear(64, 8, rngs=nnx.Rngs(2))
    return model


def place(model, mesh, rules=DEFAULT_RULES):
    state = nnx.state(model, nnx.Param)
    return jax.device_put(nnx.to_pure_dict(state), state_shardings(state, mesh, rules))


def test_user_flax_layer_is_sharded_by_its_annotation():
    model = with_user_layers(models.build(TINY, nnx.Rngs(0)))
    placed = place(model, make_mesh(data=2, fsdp=2, tensor=2))
    # embed -> fsdp and mlp -> tensor by the rules; a mesh axis name is used as it is.
    assert placed["adapter"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert placed["adapter"]["bias"].sharding.spec == P("tensor")
    assert placed["gate"].sharding.spec == P(None, "tensor")
    assert placed["plain"]["kernel"].sharding.spec == P()
    # Each device really holds a quarter of the adapter's kernel, and the values are the model's.
    assert {s.data.shape for s in placed["adapter"]["kernel"].addressable_shards} == {(32, 64)}
    np.testing.assert_array_equal(placed["adapter"]["kernel"], model.adapter.kernel[...])
    # jaxlab's own parameters, placed by the same step.
    assert placed["layers"][0]["attn"]["q_proj"].sharding.spec == P("fsdp", "tensor", None)
    assert placed["embed"].sharding.spec == P("tensor", "fsdp")


def test_flax_partition_spec_sees_jaxlab_annotations():
    state = nnx.state(models.build(TINY, nnx.Rngs(0)), nnx.Param)
    with nnx.logical_axis_rules(DEFAULT_RULES):
        specs = nnx.get_partition_spec(state)
    assert specs["layers"][0]["attn"]["k_proj"].get_value() == P("fsdp", "tensor", None)
    assert specs["layers"][1]["mlp"]["down_proj"].get_value() == P("tensor", "fsdp")
    assert specs["final_norm"]["scale"].get_value() == P("fsdp")


def test_non_dividing_user_dimension_raises_naming_it():
    model = models.build(TINY, nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model.adapter = nnx.Linear(
            64,
            6,
            use_bias=False,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
            rngs=nnx.Rngs(1),
        )
    message = (
        r"adapter/kernel: dimension 1 \('mlp'\) of size 6 is not divisible by its mesh axes "
        r"\('tensor',\) of size 4"
    )
    with pytest.raises(ValueError, match=message):
        place(model, make_mesh(data=2, tensor=4))


def test_non_dividing_model_dimension_raises_unless_its_rule_replicates():
    model = models.build(dict(TINY, vocab_size=97), nnx.Rngs(0))
    mesh = make_mesh(data=4, tensor=2)
    with pytest.raises(ValueError, match=r"embed: dimension 0 \('vocab'\) of size 97 .* size 2"):
        place(model, mesh)
    rules = tuple((axis, None if axis == "vocab" else t) for axis, t in DEFAULT_RULES)
    assert place(model, mesh, rules)["embed"].sharding.spec == P(None, None)
    assert place(model, mesh, rules)["lm_head"].sharding.spec == P(None, None)


def test_logical_to_spec_rules():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # A mesh axis serves one dimension (the first); size-1 mesh axes are left out.
    assert logical_to_spec(("batch", "seq", "embed"), (8, 4, 6), mesh) == P(
        ("data", "fsdp"), None, None
    )
    assert logical_to_spec((("embed", "tensor"), None), (8, 3), mesh) == P(("fsdp", "tensor"), None)
    assert logical_to_spec(("embed",), (6,), make_mesh(data=8)) == P(None)
    with pytest.raises(ValueError, match=r"w: logical axis 'depth' of dimension 1 has no rule"):
        logical_to_spec(("embed", "depth"), (4, 4), mesh, name="w")
    with pytest.raises(ValueError, match=r"w: logical axes \('embed',\) must name each of its 2"):
        logical_to_spec(("embed",), (4, 4), mesh, name="w")


def test_per_shard_runs_the_function_on_each_shard_inside_a_sharding_context():
    """What a sharded model does with kernels XLA cannot partition (the TPU sparse attention)."""

    def per_batch_and_head(x, y):
        return jax.nn.softmax(x, axis=1) * jnp.sum(y, axis=1, keepdims=True)

    axes = ("batch", "seq", "heads", "head_dim")
    rows = ("batch", "seq", "heads")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 6, 2, 3)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((4, 6, 2)), jnp.float32)[..., None]
    want = per_batch_and_head(x, y)
    assert per_shard(per_batch_and_head, (axes, axes), axes) is per_batch_and_head  # no mesh
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with activation_sharding(mesh):
        fn = jax.jit(per_shard(per_batch_and_head, (axes, rows + (None,)), axes))
        text = str(jax.make_jaxpr(fn)(x, y))
        got = fn(x, y)
    assert "shard_map" in text
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert tuple(got.sharding.spec)[:3] == (("data", "fsdp"), None, "tensor")


def test_per_shard_keeps_whole_the_axes_a_function_runs_along():
    """A rule that splits the sequence must not cut a scan into independent pieces."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rules = (("batch", ("data", "fsdp")), ("seq", "tensor"))
    x = jnp.arange(1.0, 9.0).reshape(4, 2)  # [batch, seq]
    want = jnp.cumsum(x, axis=1)
    axes = ("batch", "seq")

    def scan(v):
        return jnp.cumsum(v, axis=1)

    with activation_sharding(mesh, rules):
        cut = jax.jit(per_shard(scan, (axes,), axes))(x)
        whole = jax.jit(per_shard(scan, (axes,), axes, whole=("seq",)))(x)
    assert not np.allclose(np.asarray(cut), np.asarray(want))  # each shard restarts the sum
    np.testing.assert_allclose(np.asarray(whole), np.asarray(want))
    assert tuple(whole.sharding.spec)[:1] == (("data", "fsdp"),)
