"""The train step's loss and gradients against transformers + PyTorch autograd."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from flax import nnx

from jaxlab import optim
from jaxlab.interop.hf import load_hf_llama
from jaxlab.objectives import loss_sums
from jaxlab.train.step import init_train_state, make_train_step
from tests.hf_utils import make_hf_model


def _batch(tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    return {
        "inputs": jnp.asarray(inputs),
        "targets": jnp.asarray(targets),
        "loss_mask": jnp.ones(inputs.shape, jnp.int32),
        "segment_ids": jnp.ones(inputs.shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape),
    }


def test_loss_and_gradients_match_pytorch(tmp_path):
    hf_model = make_hf_model("gqa_untied", seed=21)
    hf_model.save_pretrained(str(tmp_path))
    model = load_hf_llama(str(tmp_path))
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tokens = np.random.default_rng(0).integers(0, 97, (3, 17))

    def mean_loss(p):
        total, count = loss_sums(graphdef, p, _batch(tokens))
        return total / count

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    out = hf_model(torch.tensor(tokens), labels=torch.tensor(tokens))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5
    named = dict(hf_model.named_parameters())
    embed_grad = named["model.embed_tokens.weight"].grad.numpy()
    np.testing.assert_allclose(np.asarray(grads["embed"]), embed_grad, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(grads["layers"][1]["mlp"]["down_proj"]),
        named["model.layers.1.mlp.down_proj.weight"].grad.numpy().T,
        atol=1e-5,
    )
    q_grad = named["model.layers.0.self_attn.q_proj.weight"].grad.numpy().T.reshape(64, 4, 16)
    np.testing.assert_allclose(np.asarray(grads["layers"][0]["attn"]["q_proj"]), q_grad, atol=1e-5)


def test_masked_tokens_do_not_contribute(tmp_path):
    hf = make_hf_model("gqa_untied", seed=22)
    path = str(tmp_path)
    hf.save_pretrained(path)
    graphdef, state = nnx.split(load_hf_llama(path), nnx.Param)
    params = nnx.to_pure_dict(state)
    tokens = np.random.default_rng(1).integers(0, 97, (2, 12))
    batch = _batch(tokens)
    mask = np.ones((2, 11), np.int32)
    mask[0, 5:] = 0
    batch["loss_mask"] = jnp.asarray(mask)
    sums = jax.jit(lambda p, b: loss_sums(graphdef, p, b))
    total, count = sums(params, batch)
    changed = dict(batch, targets=batch["targets"].at[0, 5:].set(0))
    total2, _ = sums(params, changed)
    assert float(count) == mask.sum()
    assert float(total) == float(total2)


def test_one_adamw_step_matches_torch_adamw(tmp_path):
    hf_model = make_hf_model("llama3_rope_tied", seed=23)
    hf_model.save_pretrained(str(tmp_path))
    graphdef, state = nnx.split(load_hf_llama(str(tmp_path)), nnx.Param)
    cfg = ml_collections.ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-2,
            warmup_steps=0,
            schedule="constant",
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=0.0,
        )
    )
    tx = optim.build_optimizer(cfg, 10)
    train_step = jax.jit(make_train_step(graphdef, tx))
    train_state = init_train_state(nnx.to_pure_dict(state), tx)
    torch_opt = torch.optim.AdamW(
        hf_model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0
    )
    rng = np.random.default_rng(2)
    for _ in range(2):
        tokens = rng.integers(0, 97, (2, 9))
        train_state, metrics = train_step(train_state, _batch(tokens))
        torch_opt.zero_grad()
        loss = hf_model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss
        loss.backward()
        torch_opt.step()
        assert abs(float(metrics["loss"]) - loss.item()) < 1e-4
    embed = hf_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(train_state.params["embed"]), embed, atol=1e-4)
