"""The training loop: exact resume, sharded equivalence, non-finite losses, config errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_smoke
from jaxlab.train import build, loop
from jaxlab.train import step as step_lib
from tests.train.overrides import configure


def tiny_config(**overrides):
    config = lm_smoke.get_config()
    config.mesh.update(data=1, fsdp=1, tensor=1, num_devices=1)
    return configure(config, **overrides)


def losses(workdir):
    return {r["step"]: r["loss"] for r in loop.read_metrics(str(workdir)) if "loss" in r}


def test_resume_is_bitwise_identical(tmp_path):
    full = loop.train_and_evaluate(tiny_config(), str(tmp_path / "full"))
    first = loop.train_and_evaluate(tiny_config(), str(tmp_path / "split"), stop_at=4)
    assert first.step == 4
    resumed = loop.train_and_evaluate(tiny_config(), str(tmp_path / "split"))
    assert resumed.start_step == 4
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    assert len(losses(tmp_path / "full")) == 8
    for a, b in zip(
        jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "full" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "mesh", [dict(data=4, fsdp=1, tensor=2), dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)]
)
def test_sharded_training_follows_single_device(tmp_path, mesh):
    single = loop.train_and_evaluate(tiny_config(num_steps=6), str(tmp_path / "one"))
    mesh_overrides = {
        f"mesh.{k}": v for k, v in {"data": 1, "fsdp": 1, "tensor": 1, **mesh}.items()
    }
    sharded = loop.train_and_evaluate(
        tiny_config(num_steps=6, **{"mesh.num_devices": 0}, **mesh_overrides),
        str(tmp_path / "eight"),
    )
    assert sharded.experiment.mesh.size == 8
    params = sharded.state.params
    assert len(params["layers"][0]["mlp"]["up_proj"].sharding.device_set) == 8
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)
    np.testing.assert_allclose(sharded.eval["eval_loss"], single.eval["eval_loss"], rtol=2e-5)


@pytest.mark.parametrize("mesh", [{}, {"mesh.data": 2, "mesh.tensor": 2, "mesh.num_devices": 4}])
def test_gradient_accumulation_matches_full_batch(tmp_path, mesh):
    loop.train_and_evaluate(tiny_config(num_steps=4), str(tmp_path / "full"))
    loop.train_and_evaluate(
        tiny_config(num_steps=4, accum_steps=4, **mesh), str(tmp_path / "accum")
    )
    a, b = losses(tmp_path / "full"), losses(tmp_path / "accum")
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)


def test_non_finite_loss_stops_and_keeps_checkpoints(tmp_path, monkeypatch):
    make = step_lib.make_train_step

    def poisoned(*args, **kwargs):
        train_step = make(*args, **kwargs)

        def wrapped(state, batch, frozen):
            new_state, metrics = train_step(state, batch, frozen)
            metrics["loss"] = jnp.where(state.step >= 5, jnp.nan, metrics["loss"])
            return new_state, metrics

        return wrapped

    monkeypatch.setattr(build, "make_train_step", poisoned)
    with pytest.raises(
        loop.NonFiniteLossError,
        match=r"loss is nan at step 6; the last good "
        r"checkpoint is step 4 in .*checkpoints/4",
    ):
        loop.train_and_evaluate(tiny_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
    monkeypatch.undo()
    resumed = loop.train_and_evaluate(tiny_config(), str(tmp_path))
    assert resumed.start_step == 4 and resumed.step == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optim.learning_rate": -1e-3}, r"config.optim.learning_rate must be a finite positive"),
        ({"mesh.data": 3, "mesh.num_devices": 0}, r"config.mesh: make_mesh: mesh .* needs 3"),
        ({"mesh.data": 3, "mesh.tensor": -1, "mesh.num_devices": 0}, r"config.mesh: .*divisible"),
        ({"seq_len": 128}, r"config.seq_len=128 exceeds config.model.max_seq_len=64"),
        (
            {"batch_size": 6, "accum_steps": 4},
            r"config.batch_size=6 must be divisible by "
            r"config.accum_steps=4",
        ),
        ({"optim.name": "adamax"}, r"config.optim.name must be one of \(.*\), got 'adamax'"),
        ({"model.num_kv_heads": 3}, r"num_heads=4 must be a multiple of num_kv_heads=3"),
        ({"optim.warmup_steps": 100}, r"config.optim: schedule warmup_steps"),
        ({"num_steps": 0}, r"config.num_steps must be a positive int"),
    ],
)
def test_bad_config_values_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(tiny_config(**overrides), str(tmp_path))


def test_metrics_and_config_are_written(tmp_path):
    loop.train_and_evaluate(tiny_config(num_steps=4), str(tmp_path))
    records = loop.read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4]
    assert json.loads((tmp_path / "config.json").read_text())["seq_len"] == 32


def test_non_finite_parameters_are_never_saved(tmp_path):
    # A finite but absurd learning rate: the first update overflows the parameter norm.
    config = tiny_config(
        **{
            "optim.learning_rate": 1e38,
            "optim.warmup_steps": 0,
            "optim.clip_norm": 0.0,
            "checkpoint_every": 1,
        }
    )
    with pytest.raises(
        loop.NonFiniteLossError,
        match=r"param_norm is inf at step 1; no "
        r"checkpoint was saved yet",
    ):
        loop.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == []


def test_rerun_keeps_one_record_per_step_and_skips_a_torn_line(tmp_path):
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 9.0}\n{"step": 1, "lo')
    loop.train_and_evaluate(tiny_config(num_steps=2, eval_every=2), str(tmp_path))
    records = loop.read_metrics(str(tmp_path))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2]
    assert records[0]["eval_loss"] != 9.0
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_denseformer_trains_sharded_like_single_device(tmp_path):
    dwa = {"model.dwa": {"dilation": 1, "period": 1}}
    loop.train_and_evaluate(tiny_config(num_steps=4, **dwa), str(tmp_path / "one"))
    sharded = loop.train_and_evaluate(
        tiny_config(
            num_steps=4, **dwa, **{"mesh.data": 4, "mesh.tensor": 2, "mesh.num_devices": 0}
        ),
        str(tmp_path / "eight"),
    )
    weights = sharded.state.params["dwa"]["weights"]
    assert not np.allclose(np.asarray(weights[1]), [0, 0, 1])  # the DWA weights trained
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)


def test_train_result_is_typed_and_groups_eval_by_source(tmp_path):
    result = loop.train_and_evaluate(tiny_config(num_steps=2, eval_every=2), str(tmp_path))
    assert isinstance(result, loop.TrainResult)
    assert (result.step, result.start_step, result.workdir) == (2, 0, str(tmp_path))
    assert result.init_from is None and set(result.initial_eval) == {"eval_loss", "eval_perplexity"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.step = 3
    # The held-out metrics as eval.json stores them, and grouped by source.
    stored = json.loads((tmp_path / "eval.json").read_text())
    assert stored == {"step": 2, **result.eval}
    grouped = dataclasses.replace(
        result,
        eval={
            "eval_loss": 2.0,
            "eval_perplexity": 7.5,
            "eval_loss/a": 1.0,
            "eval_perplexity/a": 2.5,
        },
    ).eval_by_source
    assert grouped == {"": {"loss": 2.0, "perplexity": 7.5}, "a": {"loss": 1.0, "perplexity": 2.5}}
