"""save_model_source: a model built outside training (a Layer Parallel one) written as a
``run:WORKDIR`` source that init_from and frozen models read back exactly."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import lm_smoke
from jaxlab import models
from jaxlab.models import depth
from jaxlab.train import loop, pretrained, sharding


def tiny_llama(num_layers=4, seed=0):
    config = models.make_config(
        dict(
            name="llama",
            vocab_size=259,
            hidden_size=32,
            intermediate_size=64,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=64,
        )
    )
    return models.build(config, nnx.Rngs(seed))


def params_by_name(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def test_a_layer_parallel_model_reads_back_as_a_frozen_model_with_the_same_logits(tmp_path):
    model = depth.layer_parallel(tiny_llama(), 1, 3)
    spec = pretrained.save_model_source(str(tmp_path / "lp"), model, step=7)
    assert spec == f"run:{tmp_path / 'lp'}@7"
    stored = json.loads((tmp_path / "lp" / pretrained.MODEL_CONFIG_FILE).read_text())
    assert stored["layer_widths"] == [1, 2, 1]

    mesh = sharding.make_mesh(data=1, num_devices=1)
    frozen = pretrained.frozen_model(
        spec,
        "lp",
        shardings_of=lambda state: sharding.state_shardings(state, mesh),
        dtypes={},
    )
    assert frozen.model_config == model.config
    params = pretrained.load_frozen(frozen, "lp")
    want = params_by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    got = params_by_name(params)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    tokens = np.random.default_rng(0).integers(0, 259, (2, 12))
    np.testing.assert_array_equal(
        np.asarray(nnx.merge(frozen.graphdef, params)(tokens)), np.asarray(model(tokens))
    )


def test_init_from_the_source_starts_a_run_from_the_models_parameters(tmp_path):
    model = depth.layer_parallel(tiny_llama(), 0, 2)
    spec = pretrained.save_model_source(str(tmp_path / "src"), model)
    config = lm_smoke.get_config()
    config.model = ml_collections.ConfigDict(model.config.to_dict())
    config.init_from = spec
    config.mesh.update(data=1, num_devices=1)
    exp = loop.build_experiment(config)
    params, report = loop.initial_params(exp)
    assert report["kept"] == [] and report["unused"] == []
    want = params_by_name(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    got = params_by_name(params)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # Another model of a different depth is refused by the exact mode, naming the difference.
    config.model.update(num_layers=2, layer_widths=None)
    with pytest.raises(ValueError, match="num_layers"):
        loop.initial_params(loop.build_experiment(config))


def test_save_model_source_refuses_a_used_directory_and_non_models(tmp_path):
    model = tiny_llama(num_layers=2)
    workdir = str(tmp_path / "m")
    pretrained.save_model_source(workdir, model)
    with pytest.raises(ValueError, match=r"already holds checkpoints \[0\]"):
        pretrained.save_model_source(workdir, model, step=3)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
    with pytest.raises(TypeError, match="model must be a jaxlab model.*dict"):
        pretrained.save_model_source(str(tmp_path / "x"), {"embed": 1})
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        pretrained.save_model_source(str(tmp_path / "y"), model, step=-1)
