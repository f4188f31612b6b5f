"""Every experiment config builds; pod configs get their shardings on the 8 fake devices without
allocating a parameter (shapes via jax.eval_shape)."""

import importlib
import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxlab.train.loop import build_experiment

POD_CONFIGS = {
    # name: (billions of parameters, q_proj spec, embed spec)
    "llama2_7b": (6.74, P("fsdp", None, None), P(None, "fsdp")),
    "llama2_70b": (68.98, P(None, "tensor", None), P("tensor", None)),
    "llama3_8b": (8.03, P("fsdp", "tensor", None), P("tensor", "fsdp")),
}


@pytest.mark.parametrize("name", sorted(POD_CONFIGS))
def test_pod_config_shardings_build_abstractly(name):
    billions, q_spec, embed_spec = POD_CONFIGS[name]
    config = importlib.import_module(f"configs.{name}").get_config()
    config.data.tokenizer = "byte"  # the real tokenizer is the user's file
    exp = build_experiment(config)
    assert exp.mesh.size == jax.device_count() == 8
    params = exp.abstract_state.params
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count / 1e9 == pytest.approx(billions, abs=0.01)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    layer0 = exp.state_shardings.params["layers"][0]
    assert layer0["attn"]["q_proj"].spec == q_spec
    assert exp.state_shardings.params["embed"].spec == embed_spec
    # Adam's moments are sharded exactly like the parameters.
    adam = exp.state_shardings.opt_state[1][0]
    assert adam.mu["layers"][0]["attn"]["q_proj"].spec == q_spec
    assert adam.nu["embed"].spec == embed_spec
    # Parameters are split over the devices: each holds an eighth (norm scales aside).
    per_device = sum(
        math.prod(s.shard_shape(x.shape))
        for x, s in zip(
            jax.tree.leaves(params), jax.tree.leaves(exp.state_shardings.params), strict=True
        )
    )
    assert per_device < 1.01 * count / 8


@pytest.mark.parametrize("name", ["lm_tiny", "lm_smoke", "demo_interop"])
def test_small_configs_load(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.name == "llama"


@pytest.mark.parametrize("variant", ["mamba1", "mamba2", "llamba", "hybrid"])
def test_mamba_configs_load(variant):
    from configs import mamba_lm
    from jaxlab import models

    config = mamba_lm.get_config(variant)
    model_config = models.make_config({**config.model.to_dict(), "vocab_size": 259})
    assert model_config.mixer == mamba_lm.VARIANTS[variant]["mixer"]
