"""Hugging Face checkpoint import/export against transformers (PyTorch, CPU)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from jaxlab.interop.hf import CheckpointError, load_hf_llama, save_hf_llama
from tests.hf_utils import HF_CONFIGS, hf_logits, make_hf_model

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return request.param, model, path


def _tokens(seed=0, batch=2, seq=24, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def test_load_matches_transformers_logits(hf_checkpoint):
    name, hf_model, path = hf_checkpoint
    model = load_hf_llama(path)
    tokens = _tokens()
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(hf_model, tokens)
    assert np.abs(ours - ref).max() <= ATOL, name
    if name == "mistral_sliding_window":
        assert model.config.sliding_window == 5


def test_loss_gradients_match_transformers(hf_checkpoint, tmp_path):
    """The backward pass (projections, attention, SwiGLU, tied or untied head) against PyTorch
    autograd on the same weights: next-token cross-entropy, gradients compared per Hugging Face
    tensor (ours written through save_hf_llama's name and layout mapping)."""
    name, hf_model, path = hf_checkpoint
    model = load_hf_llama(path)
    tokens = _tokens(seed=3, batch=3, seq=20)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(jnp.asarray(tokens[:, :-1]))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), -1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    save_hf_llama(nnx.merge(graphdef, grads), str(tmp_path))
    ours = load_file(str(tmp_path / "model.safetensors"))
    hf_model.zero_grad()
    logits = hf_model(torch.tensor(tokens[:, :-1], dtype=torch.long)).logits
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(tokens[:, 1:]).reshape(-1)
    )
    ref.backward()
    assert abs(float(value) - ref.item()) <= 1e-5, name
    ref_grads = {k: p.grad for k, p in hf_model.named_parameters()}
    assert set(ours) == set(ref_grads), name
    for key, grad in ref_grads.items():
        scale = grad.abs().max().item()
        np.testing.assert_allclose(
            ours[key].numpy(), grad.numpy(), atol=1e-5 * scale, rtol=0, err_msg=f"{name}: {key}"
        )


def test_export_reloads_in_transformers(hf_checkpoint, tmp_path):
    name, hf_model, path = hf_checkpoint
    model = load_hf_llama(path)
    save_hf_llama(model, str(tmp_path))
    cls = type(hf_model)
    reloaded = cls.from_pretrained(str(tmp_path)).eval()
    tokens = _tokens(seed=1)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=1e-6)
    # The exported config describes the same architecture.
    ours_back = load_hf_llama(str(tmp_path))
    assert ours_back.config == model.config


def test_sharded_export_round_trip(tmp_path):
    hf_model = make_hf_model("gqa_untied", seed=3)
    src = tmp_path / "src"
    hf_model.save_pretrained(str(src))
    model = load_hf_llama(str(src))
    out = tmp_path / "sharded"
    save_hf_llama(model, str(out), max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    tokens = _tokens(seed=2)
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens), atol=1e-6)
    again = load_hf_llama(str(out))
    np.testing.assert_allclose(
        np.asarray(again(jnp.asarray(tokens))), hf_logits(hf_model, tokens), atol=ATOL
    )


def test_bfloat16_load(tmp_path):
    hf_model = make_hf_model("gqa_untied", seed=4)
    hf_model.save_pretrained(str(tmp_path))
    model = load_hf_llama(str(tmp_path), dtype="bfloat16")
    assert model.embed[...].dtype == jnp.bfloat16
    tokens = _tokens(seed=5)
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = hf_logits(hf_model, tokens)
    # bf16 has 8 mantissa bits: agree to a few percent of the logit scale.
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_a_bfloat16_checkpoint_round_trips(tmp_path):
    # Stored in bfloat16 (as most published checkpoints are), read as bfloat16 and as float32.
    model = load_hf_llama(str(_checkpoint(tmp_path / "src")), dtype="bfloat16")
    save_hf_llama(model, str(tmp_path / "bf16"), dtype="bfloat16")
    with open(tmp_path / "bf16" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    saved = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for dtype in ("bfloat16", "float32"):
        again = nnx.to_pure_dict(nnx.state(load_hf_llama(str(tmp_path / "bf16"), dtype), nnx.Param))
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(saved), strict=True):
            assert a.dtype == jnp.dtype(dtype)
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _checkpoint(tmp_path, name="gqa_untied"):
    make_hf_model(name).save_pretrained(str(tmp_path))
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(tmp_path):
    path = _checkpoint(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj"):
        load_hf_llama(str(path))


def test_unexpected_tensor_is_named(tmp_path):
    path = _checkpoint(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.extra.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="self_attn.extra.weight"):
        load_hf_llama(str(path))


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    path = _checkpoint(tmp_path)
    _edit_config(path, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"gate_proj.weight.*\(96, 64\).*\(128, 64\)"):
        load_hf_llama(str(path))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "'yarn'"),
        (dict(some_new_feature=True), r"unsupported fields \['some_new_feature'\]"),
    ],
)
def test_unsupported_config_fields_are_named(tmp_path, changes, message):
    path = _checkpoint(tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_hf_llama(str(path))


def test_missing_weights_file(tmp_path):
    path = _checkpoint(tmp_path)
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_llama(str(path))


def test_legacy_rope_scaling_config(tmp_path):
    """Checkpoints written by transformers < 5 carry rope_theta + rope_scaling{type: ...}."""
    hf_model = make_hf_model("linear_rope_biases", seed=6)
    hf_model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_hf_llama(str(tmp_path))
    assert model.config.rope_scaling.type == "linear"
    tokens = _tokens(seed=7)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))), hf_logits(hf_model, tokens), atol=ATOL
    )
