"""Smoke tests of the Layer Parallelism experiment (issue 19) and its bench at a tiny size, and
the pieces they choose with: start positions, frozen patterns, and the recovery fine-tune that
trains only the paired layers."""

import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import layer_parallel as lp_config
from experiments import layer_parallel as lp_experiment
from jaxlab import models
from jaxlab.models import depth
from jaxlab.train import pretrained, sharding
from tests.entrypoints import run_module


def test_default_starts_keep_the_first_and_last_layer_sequential():
    assert lp_config.default_starts(12, 2) == (2, 4, 6, 8)
    assert lp_config.default_starts(12, 4) == (2, 4, 6)
    assert lp_config.default_starts(12, 6) == (2, 4)
    assert lp_config.default_starts(4, 2) == ()
    config = lp_config.get_config()
    config.experiment.starts = (1, 3, 9, 10)
    assert lp_config.sweep_starts(config, 2) == (1, 3, 9, 10)
    assert lp_config.sweep_starts(config, 4) == (1, 3)  # runs past layer 12 are dropped


def test_frozen_patterns_leave_exactly_the_named_blocks_trainable():
    config = models.make_config(
        dict(
            name="llama",
            vocab_size=259,
            hidden_size=16,
            intermediate_size=32,
            num_layers=6,
            num_heads=2,
            num_kv_heads=2,
            tie_embeddings=False,
        )
    )
    model = depth.layer_parallel(models.build(config, nnx.Rngs(0)), 2, 6)  # blocks 2, 3 paired
    patterns = lp_experiment.frozen_patterns(model, {2, 3})
    assert patterns == ("embed", "final_norm/", "layers/0/", "layers/1/", "lm_head")
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path, _ in jax.tree_util.tree_leaves_with_path(pure):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        frozen = any(p in name for p in patterns)
        assert frozen == (not name.startswith(("layers/2/", "layers/3/"))), name


# A 2-step run of a 16-wide Llama with two held-out batches (the experiment splits them in two).
TINY_RUN = (
    "--config.num_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.log_every=2",
    "--config.seq_len=16",
    "--config.batch_size=2",
    "--config.eval_batches=2",
    "--config.eval_per_source=False",
    "--config.model.hidden_size=16",
    "--config.model.intermediate_size=32",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=2",
)


def by_name(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def stored_params(workdir):
    mesh = sharding.make_mesh(data=1, num_devices=1)
    frozen = pretrained.frozen_model(
        f"run:{workdir}",
        "m",
        shardings_of=lambda state: sharding.state_shardings(state, mesh),
        dtypes={},
    )
    return by_name(pretrained.load_frozen(frozen, "m"))


def test_experiment_smoke_reports_methods_recovery_decoding_and_claims(tmp_path):
    result = run_module(
        "experiments.layer_parallel",
        f"--workdir={tmp_path}",
        f"--teacher_workdir={tmp_path / 'given_teacher'}",
        *TINY_RUN,
        "--config.model.num_layers=6",
        "--config.experiment.deltas=2",
        "--config.experiment.recovery_deltas=2",
        "--config.experiment.recovery_steps=1",
        "--config.experiment.decode_batches=1",
        "--config.experiment.decode_tokens=4",
        "--config.experiment.decode_repeats=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("REPORT.md", "retention_vs_delta.png", "perplexity_vs_decode_time.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    original = results["original"]
    assert results["teacher"]["workdir"] == str(tmp_path / "given_teacher")
    assert "2" in os.listdir(tmp_path / "given_teacher" / "checkpoints")
    # The experiment's own held-out scorer agrees with the engine's evaluation of the teacher.
    assert results["teacher"]["held_out_perplexity"] == pytest.approx(
        results["teacher"]["engine_eval_perplexity"], rel=1e-5
    )
    entry = results["deltas"]["2"]
    assert entry["starts"] == [2] and entry["ideal_speedup"] == pytest.approx(6 / 5)
    depths = {"LP": 5, "LP shared norm": 5, "prune": 5, "merge": 5, "shuffle": 6}
    depths.update({lp_experiment.ANGULAR: 5, lp_experiment.RECOVERED: 5})
    assert set(entry["best"]) == set(depths)
    for method, row in entry["best"].items():
        assert row["depth"] == depths[method], method
        assert row["retention"] == pytest.approx(original["perplexity"] / row["perplexity"])
    assert [r["method"] for r in entry["rows"]] == [*lp_experiment.RUN_METHODS, "prune (angular)"]
    # Each best start is picked on the selection half, not on the numbers it reports.
    for row in entry["rows"]:
        assert entry["best"][row["method"]]["selection_retention"] >= row["selection_retention"]

    # Recovery trained the paired block of the LP model and nothing else.
    recovered = entry["best"][lp_experiment.RECOVERED]
    assert "layers/2/" not in recovered["frozen"] and "layers/0/" in recovered["frozen"]
    source = stored_params(tmp_path / "lp_delta2_start2")
    tuned = stored_params(tmp_path / "recovery_delta2_start2")
    assert source.keys() == tuned.keys()
    changed = {n for n in source if not np.array_equal(source[n], tuned[n])}
    assert changed and all(n.startswith("['layers'][2]") for n in changed), changed
    sources = json.loads((tmp_path / "recovery_delta2_start2" / "frozen_sources.json").read_text())
    assert sources == {"teacher": f"run:{tmp_path / 'given_teacher'}@2"}
    init = json.loads((tmp_path / "recovery_delta2_start2" / "init_from.json").read_text())
    assert init["source"] == f"run:{tmp_path / 'lp_delta2_start2'}@0"

    # Decode speeds on one device and on the 2-device tensor mesh.
    decode = results["decode"]
    assert set(decode["one_device"]) == {"original", "LP delta=2", "prune delta=2"}
    assert set(decode["tensor_mesh"]) == {"original", "LP delta=2"}
    assert len(decode["tensor_devices"]) == 2
    speeds = [s["b=1"] for m in ("one_device", "tensor_mesh") for s in decode[m].values()]
    assert all(math.isfinite(s) and s > 0 for s in speeds)

    # The verdicts follow from the numbers by the stated rules.
    best, one, mesh = entry["best"], decode["one_device"], decode["tensor_mesh"]
    lp_speed = one["LP delta=2"]["b=1"] / one["original"]["b=1"]
    rivals = max(best[m]["retention"] for m in ("prune", "prune (angular)", "merge"))
    expected = [
        best["LP"]["retention"] > rivals,
        lp_speed - 1 >= 0.5 * (6 / 5 - 1),
        best["LP"]["accuracy_retention"] >= 0.95,  # nan (a 0 accuracy) does not hold
        best["LP + recovery"]["perplexity"] < best["LP"]["perplexity"],
        None,  # the mesh is of fake CPU devices: no verdict
    ]
    assert math.isfinite(mesh["LP delta=2"]["b=1"] / mesh["original"]["b=1"])
    verdicts = {True: "holds", False: "does not hold", None: "not measured"}
    assert [c["verdict"] for c in results["claims"]] == [verdicts[e] for e in expected]
    report = (tmp_path / "REPORT.md").read_text()
    assert "Verdict rule: decided before the run" in report
    for c in results["claims"]:
        assert f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |" in report
    assert "## Delta = 2 (depth 6 -> 5, ideal 1.200x)" in report


def test_bench_quick_reports_lp_over_original_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("experiments.bench.layer_parallel", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["rows_ms"]) == ["original", "LP delta=2"]
    assert data["num_layers"] == 6 and data["starts"] == {"LP delta=2": 2}
    assert data["ideal_speedup"]["LP delta=2"] == pytest.approx(6 / 5)
    ms, ratios = data["rows_ms"], data["ratios"]["LP delta=2"]
    for rows in (1, 16):
        task = f"decode b={rows}"
        for name in ms:
            speed = data["decode_tokens_per_s"][name][task]
            assert speed == pytest.approx(rows * 16e3 / ms[name][task])
        assert ratios[task] == pytest.approx(ms["original"][task] / ms["LP delta=2"][task])
    step = "train step, tensor=2"
    assert ratios[step] == pytest.approx(ms["LP delta=2"][step] / ms["original"][step])
    assert all(math.isfinite(r) and r > 0 for r in ratios.values())
    assert len(data["tensor_mesh"]["devices"]) == 2
    assert "| LP delta=2 / original (ideal 1.200x) |" in result.stdout


def test_teacher_from_run_takes_a_finished_run_of_another_config_as_it_is(tmp_path):
    # The run of another experiment: 4 layers on one package of the corpus (the LP config has 12
    # layers on the whole corpus); the experiment must score this model, not train its own.
    teacher = tmp_path / "other_run"
    trained = run_module(
        "experiments.train_lm",
        "--config=configs/lm_tiny.py",
        f"--workdir={teacher}",
        *TINY_RUN,
        "--config.model.num_layers=4",
        "--config.data.sources=('embedded:email',)",
        "--config.optim.warmup_steps=1",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoints = sorted(os.listdir(teacher / "checkpoints"))
    stored = (teacher / "config.json").read_text()
    lp_args = (
        "--config.experiment.teacher_from_run=True",
        "--config.experiment.deltas=2",
        "--config.experiment.starts=1",
        "--config.experiment.recovery_deltas=2",
        "--config.experiment.recovery_steps=1",
        "--config.experiment.decode_batches=1",
        "--config.experiment.decode_tokens=4",
        "--config.experiment.decode_repeats=1",
        "--config.experiment.tensor_devices=0",
    )
    refused = run_module("experiments.layer_parallel", f"--workdir={tmp_path / 'x'}", *lp_args)
    assert refused.returncode != 0 and "--teacher_workdir is not given" in refused.stderr
    unfinished = tmp_path / "unfinished"  # stopped before its last step: never trained in
    (unfinished / "checkpoints" / "2").mkdir(parents=True)
    (unfinished / "config.json").write_text(stored.replace('"num_steps": 2', '"num_steps": 4'))
    refused = run_module(
        "experiments.layer_parallel",
        f"--workdir={tmp_path / 'y'}",
        f"--teacher_workdir={unfinished}",
        *lp_args,
    )
    assert refused.returncode != 0 and "its last checkpoint is at step 2" in refused.stderr
    assert sorted(os.listdir(unfinished)) == ["checkpoints", "config.json"]
    ignored = run_module(
        "experiments.layer_parallel",
        f"--workdir={tmp_path / 'z'}",
        f"--teacher_workdir={teacher}",
        "--config.num_steps=7",
        *lp_args,
    )
    assert ignored.returncode != 0 and "would be ignored: ['num_steps']" in ignored.stderr
    result = run_module(
        "experiments.layer_parallel",
        f"--workdir={tmp_path / 'lp'}",
        f"--teacher_workdir={teacher}",
        *lp_args,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert results["teacher"]["workdir"] == str(teacher)
    assert results["teacher"]["num_layers"] == 4 and results["teacher"]["steps"] == 2
    assert results["eval_tokens"] == [1, 2, 16]  # half of the run's 2 held-out batches of 2 x 16
    assert results["teacher"]["held_out_perplexity"] == pytest.approx(
        results["teacher"]["engine_eval_perplexity"], rel=1e-5
    )
    # Taken as it is: not retrained, its config untouched.
    assert sorted(os.listdir(teacher / "checkpoints")) == checkpoints
    assert (teacher / "config.json").read_text() == stored
    assert results["deltas"]["2"]["starts"] == [1]
    assert (
        "`embedded:email` (the last stage of the run in"
        in (tmp_path / "lp" / "REPORT.md").read_text()
    )
