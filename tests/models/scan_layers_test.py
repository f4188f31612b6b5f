"""``scan_layers``: stacked block parameters run by ``jax.lax.scan`` compute what the unrolled
loop computes, are sharded with a replicated ``layers`` axis, and the 70B train step lowers."""

import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxlab import models, optim
from jaxlab.interop.hf import CheckpointError, save_hf_llama
from jaxlab.models import TransformerConfig
from jaxlab.models.denseformer import DWAConfig
from jaxlab.models.sparse_attention import SparseAttentionConfig
from jaxlab.train import loop
from jaxlab.train.sharding import batch_sharding, make_mesh, state_shardings

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    attention_bias=True,
)


def unrolled_and_scanned(**changes):
    """An unrolled model and a scanned one holding the same numbers (its layers stacked)."""
    unrolled = models.build(TransformerConfig(**TINY, **changes), nnx.Rngs(0))
    scanned = models.build(TransformerConfig(**TINY, **changes, scan_layers=True), nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    layers = [params["layers"][i] for i in range(TINY["num_layers"])]
    stacked = dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, stacked)
    nnx.update(scanned, state)
    return unrolled, scanned


def stack(per_layer):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)


@pytest.mark.parametrize("remat", [False, True])
def test_forward_and_gradients_equal_the_unrolled_loop(remat):
    unrolled, scanned = unrolled_and_scanned(remat=remat)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, (2, 8)))
    weights = jnp.asarray(rng.normal(size=(2, 8, 96)), jnp.float32)

    @jax.jit
    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return jnp.sum(nnx.merge(graphdef, p)(tokens) * weights)

        return jax.value_and_grad(loss)(nnx.to_pure_dict(params))

    (loss_u, grads_u), (loss_s, grads_s) = loss_and_grads(unrolled), loss_and_grads(scanned)
    assert loss_s == loss_u
    stacked_grads = dict(grads_u, layers=stack([grads_u["layers"][i] for i in range(3)]))
    for path, g_s in jax.tree_util.tree_leaves_with_path(grads_s):
        g_u = stacked_grads
        for key in path:
            g_u = g_u[key.key]
        # Only the order of float additions may differ (the scan accumulates per layer).
        np.testing.assert_allclose(g_s, g_u, rtol=1e-6, atol=1e-6 * np.abs(g_u).max(), err_msg=path)


def test_hidden_states_and_attention_equal_the_unrolled_loop():
    unrolled, scanned = unrolled_and_scanned()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 8)))

    def forward(model):
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, return_attention=True))(state)

    (logits_u, hidden_u), (logits_s, hidden_s) = forward(unrolled), forward(scanned)
    np.testing.assert_array_equal(logits_s, logits_u)
    assert len(hidden_s.residuals) == 4 and len(hidden_s.attention) == 3
    for a, b in zip(
        hidden_s.residuals + hidden_s.attention,
        hidden_u.residuals + hidden_u.attention,
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_stacked_parameters_have_a_replicated_layers_axis():
    model = models.build(TransformerConfig(**TINY, scan_layers=True), nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    q_proj = state["layers"]["attn"]["q_proj"]
    assert q_proj.shape == (3, 32, 4, 8)
    assert models.layers.logical_axes(state)["layers"]["attn"]["q_proj"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )
    shardings = state_shardings(state, make_mesh(data=2, fsdp=2, tensor=2))
    assert shardings["layers"]["attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
    assert shardings["layers"]["input_norm"]["scale"].spec == P(None, "fsdp")
    # Each layer draws its own initial values.
    assert not np.array_equal(q_proj[0], q_proj[1])


def test_weight_decay_mask_equals_the_unrolled_models():
    unrolled, scanned = unrolled_and_scanned()
    mask_u = optim.decay_mask(nnx.to_pure_dict(nnx.state(unrolled, nnx.Param)))
    mask_s = optim.decay_mask(nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
    for i in range(TINY["num_layers"]):
        assert mask_s["layers"] == mask_u["layers"][i]
    assert {k: v for k, v in mask_s.items() if k != "layers"} == {
        k: v for k, v in mask_u.items() if k != "layers"
    }
    assert not mask_s["layers"]["input_norm"]["scale"]  # [layers, embed], still a vector
    assert mask_s["layers"]["attn"]["q_proj"]


def test_what_scan_layers_cannot_do_is_an_error():
    with pytest.raises(ValueError, match="scan_layers cannot be combined with dwa"):
        TransformerConfig(**TINY, scan_layers=True, dwa=DWAConfig())
    sparse = SparseAttentionConfig(kind="hash", num_buckets=2)
    with pytest.raises(ValueError, match="scan_layers cannot be combined with sparse_attention"):
        TransformerConfig(**TINY, scan_layers=True, sparse_attention=sparse)
    config = TransformerConfig(**TINY, scan_layers=True)
    model = models.build(config, nnx.Rngs(0))
    cache = models.init_cache(config, 1, 8)
    tokens = jnp.zeros((1, 2), jnp.int32)
    positions = jnp.arange(2)[None]
    with pytest.raises(ValueError, match="decoding with a cache needs unrolled layers"):
        model.decode(tokens, cache, positions=positions)


def test_hugging_face_export_of_stacked_layers_is_an_error(tmp_path):
    model = models.build(TransformerConfig(**TINY, scan_layers=True), nnx.Rngs(0))
    with pytest.raises(CheckpointError, match="save_hf_llama: the model has scan_layers=True"):
        save_hf_llama(model, str(tmp_path))
    assert not list(tmp_path.iterdir())


def lower_train_step(config):
    """The experiment's jitted train step traced and lowered on ShapeDtypeStructs (the
    experiment is built from abstract shapes: no parameter is allocated). Returns the lowered
    step and the wall seconds of building the experiment and of tracing + lowering."""
    start = time.perf_counter()
    exp = loop.build_experiment(config)
    built = time.perf_counter()
    train_step, _ = loop.compile_steps(exp)
    shape = (config.batch_size, config.seq_len)  # the step splits it into accum_steps micro-batches
    batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(exp.mesh))
        for k in loop.MODEL_INPUTS
    }
    lowered = train_step.lower(exp.abstract_state, batch, {})
    return lowered, built - start, time.perf_counter() - built


def test_the_70b_train_step_lowers_with_scan_layers():
    config = importlib.import_module("configs.llama2_70b").get_config()
    config.data.tokenizer = "byte"  # the real tokenizer is the user's file
    config.model.scan_layers = True
    lowered, _, _ = lower_train_step(config)
    text = lowered.as_text()
    # One block is traced and looped over, forward and backward: the module is about 0.2 MB
    # (7.9 MB with the 80 blocks unrolled, which also take about 20x longer to trace and lower).
    assert len(text) < 1_000_000
    assert text.count("stablehlo.while") >= 2
    assert "tensor<80x8192x64x128xf32>" in text  # the stacked q_proj
