"""Smoke tests of the distillation experiment (issue 20 item 3) and its bench at a tiny size: the
outputs, the students' starting weights (the transfer, written as a run source), their stages
(MOHAWK for the pure student, MambaInLlama's for the hybrids) and the step budget split over
them, and verdicts that follow from the numbers by the stated rules."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import distill as distill_config
from experiments import distill, distill_stages
from jaxlab import models, optim
from jaxlab.distill import hybrid_layers, student_config, transfer
from jaxlab.train import pretrained, sharding
from tests.entrypoints import run_module

TASK = "reasoning:train=1-3&test=3&num_train=50&num_test=6&modulus=10&ops=add,sub&seed=0"
EXTRA = "reasoning:train=1-3&test=1-2&num_train=1&num_test=4&modulus=10&ops=add,sub&seed=1"
STUDENTS = ("pure", "hybrid50", "hybrid25", "hybrid50_mamba1", "hybrid50_random", "scratch")
# The smoke's students: each code path once (MOHAWK stages, MambaInLlama stages from the transfer
# and from the random-init transfer, one next-token run from scratch).
SMOKE = ("pure", "hybrid50", "hybrid50_random", "scratch")


def stored_model(workdir):
    """The model a ``run:`` source holds (its config and its latest checkpoint's parameters)."""
    mesh = sharding.make_mesh(data=1, num_devices=1)
    frozen = pretrained.frozen_model(
        f"run:{workdir}",
        "m",
        shardings_of=lambda state: sharding.state_shardings(state, mesh),
        dtypes={},
    )
    model = models.build(frozen.model_config, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, pretrained.load_frozen(frozen, "m"))
    nnx.update(model, params)
    return model


def by_name(model):
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree.leaves_with_path(state)}


def em(row, steps):
    return 100.0 * row["exact_match"][steps]["correct"] / row["exact_match"][steps]["total"]


def test_experiment_smoke_starts_from_the_transfer_and_reports_claims(tmp_path):
    result = run_module(
        "experiments.distill",
        f"--workdir={tmp_path}",
        "--config.num_steps=2",
        "--config.eval_every=2",
        "--config.checkpoint_every=2",
        "--config.log_every=2",
        "--config.seq_len=80",
        "--config.batch_size=2",
        "--config.eval_batches=1",
        "--config.eval_per_source=False",
        "--config.model.hidden_size=16",
        "--config.model.intermediate_size=32",
        "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1",
        "--config.model.num_layers=4",
        "--config.model.max_seq_len=80",
        f"--config.data.sources=('{TASK}',)",
        f"--config.experiment.extra_task={EXTRA}",
        f"--config.experiment.students={SMOKE!r}",
        "--config.experiment.student_steps=3",  # MOHAWK 1 + 1 + 1, MambaInLlama 1 + 2
        "--config.experiment.test_problems=6",
        "--config.experiment.eval_batch=8",
        "--config.experiment.decode_batches=2",
        "--config.experiment.decode_lengths=4",
        "--config.experiment.prompt_len=4",
        "--config.experiment.decode_repeats=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("REPORT.md", "quality.png", "decode_speed.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["models"]) == ["teacher", *SMOKE]

    # Every distilled student (its first stage) started from the model written with
    # save_model_source.
    first = {"pure": "0_matrix", "hybrid50": "0_step0", "hybrid50_random": "0_step0"}
    for name in SMOKE[:-1]:
        run = tmp_path / f"student_{name}" / first[name]
        init = json.loads((run / "init_from.json").read_text())
        assert init["source"] == f"run:{tmp_path / f'init_{name}'}@0", name
        assert init["kept"] == [] and init["unused"] == [], name
        assert results["students"][name]["objective"] == "distill_kl"
        assert results["students"][name]["steps"] == 3, name
    assert not (tmp_path / "student_scratch" / "init_from.json").exists()
    # The pure student ran the three MOHAWK stages in order, the hybrid MambaInLlama's two; each
    # stage started from the previous one's last checkpoint, the first from the transfer.
    # The random-init ablation runs the hybrid's recipe from its own start.
    stages = {"pure": ["matrix", "hidden", "kl"], "hybrid50": ["step0", "e2e"]}
    stages["hybrid50_random"] = stages["hybrid50"]
    objectives = {
        "pure": ["mohawk_matrix", "mohawk_hidden", "distill_kl"],
        "hybrid50": ["distill_pseudo_labels", "distill_kl"],
    }
    objectives["hybrid50_random"] = objectives["hybrid50"]
    steps = {"pure": [1, 1, 1], "hybrid50": [1, 2], "hybrid50_random": [1, 2]}
    for name, names in stages.items():
        run = tmp_path / f"student_{name}"
        summary = json.loads((run / "stages.json").read_text())
        assert [s["stage"] for s in summary] == names
        assert [s["objective"] for s in summary] == objectives[name]
        assert [s["num_steps"] for s in summary] == steps[name]
        dirs = [str(run / f"{k}_{stage}") for k, stage in enumerate(names)]
        assert [s["init_from"] for s in summary] == [
            f"run:{tmp_path / f'init_{name}'}",
            *(f"run:{d}" for d in dirs[:-1]),
        ]
        assert [s["init_from_mode"] for s in summary] == ["exact"] * len(names)
        for k in range(1, len(names)):
            init = json.loads((run / f"{k}_{names[k]}" / "init_from.json").read_text())
            assert init["source"] == f"run:{dirs[k - 1]}@{steps[name][k - 1]}", (name, k)
        recorded = results["students"][name]["stages"]
        assert [(s["stage"], s["objective"], s["steps"]) for s in recorded] == list(
            zip(names, objectives[name], steps[name], strict=True)
        )
    assert results["students"]["scratch"]["objective"] == "next_token"
    for name, s in results["students"].items():  # fresh runs: both ends of training measured
        assert math.isfinite(s["eval_loss_start"]) and math.isfinite(s["eval_loss_end"]), name

    # The first student's initial parameters are the transfer of the trained teacher.
    teacher = stored_model(tmp_path / "teacher")
    seed = distill_config.get_config().seed
    config = student_config(teacher.config, "discrete_mamba2")
    expected = by_name(transfer(teacher, config, rngs=nnx.Rngs(seed)))
    stored = by_name(stored_model(tmp_path / "init_pure"))
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(stored[key], value, err_msg=key)
    # The random-init ablation differs from the transfer only in the Mamba mixers.
    config = student_config(teacher.config, "mamba2", hybrid_layers(4, 0.5))
    transferred = by_name(transfer(teacher, config, rngs=nnx.Rngs(seed)))
    random_init = by_name(stored_model(tmp_path / "init_hybrid50_random"))
    differ = {k for k in transferred if not np.array_equal(transferred[k], random_init[k])}
    assert differ and all(
        k.startswith(("['layers'][0]['mixer']", "['layers'][2]['mixer']")) for k in differ
    ), differ
    assert results["students"]["hybrid50"]["attention_layers"] == [1, 3]

    # Scores for every model; the teacher's KL to itself is 0.
    for name, row in results["models"].items():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1, name
        assert set(row["exact_match"]) == {"1", "2", "3"}, name
        assert row["exact_match"]["3"]["total"] == 6, name
    assert abs(results["models"]["teacher"]["kl"]) < 1e-6
    speeds = results["decode"]["tokens_per_s"]
    assert set(speeds) == {"teacher", "hybrid50", "pure"}
    assert all(set(s) == {"b=2,T=4"} for s in speeds.values())

    # The verdicts follow from the numbers by the stated rules.
    m = results["models"]
    t, h, p = em(m["teacher"], "3"), em(m["hybrid50"], "3"), em(m["pure"], "3")
    expected_verdicts = [
        t - h <= 10.0,
        0 < t - p <= 20.0,
        m["hybrid50"]["kl"] < m["hybrid50_random"]["kl"] and h >= em(m["hybrid50_random"], "3"),
        None,  # hybrid25 is not in the smoke: not measured
        m["pure"]["perplexity"] < m["scratch"]["perplexity"],
        speeds["pure"]["b=2,T=4"] > speeds["teacher"]["b=2,T=4"],
        speeds["hybrid50"]["b=2,T=4"] > speeds["teacher"]["b=2,T=4"],
    ]
    verdicts = {True: "holds", False: "does not hold", None: "not measured"}
    assert [c["verdict"] for c in results["claims"]] == [verdicts[v] for v in expected_verdicts]
    report = (tmp_path / "REPORT.md").read_text()
    assert "Verdict rule: decided before the run" in report
    assert "not used yet" not in report
    assert (
        "- pure: mohawk_matrix 1 -> mohawk_hidden 1 -> distill_kl 1 (from the transfer)" in report
    )
    assert "- hybrid50: distill_pseudo_labels 1 -> distill_kl 2 (from the transfer)" in report
    assert (
        "- hybrid50_random: distill_pseudo_labels 1 -> distill_kl 2 (from the transfer, Mamba "
        "mixers random)" in report
    )
    assert "- scratch: next_token 3 (random init)" in report
    for c in results["claims"]:
        assert f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} |" in report
        if c["verdict"] == "does not hold":  # each differing direction is explained
            assert f"- {c['claim']}: " in report


def test_every_student_runs_its_recipe_from_the_transfer_within_the_step_budget():
    """The full config's students, without training: the stages each runs (the first from the
    transfer), their step split summing to student_steps, and what the stages freeze."""
    base = distill_config.get_config()
    model = distill.teacher_config(base).model.to_dict()
    model["vocab_size"] = 24
    teacher = models.build(model, nnx.Rngs(0))
    mohawk = [("matrix", "mohawk_matrix", 200), ("hidden", "mohawk_hidden", 200)]
    mambainllama = [("step0", "distill_pseudo_labels", 200), ("e2e", "distill_kl", 800)]
    expected = {
        "pure": ((), [*mohawk, ("kl", "distill_kl", 600)]),
        "hybrid50": ((1, 3), mambainllama),
        "hybrid25": ((3,), mambainllama),
        "hybrid50_mamba1": ((1, 3), mambainllama),
        "hybrid50_random": ((1, 3), mambainllama),
    }
    assert distill.selected_students(base) == STUDENTS
    for name, (attention, stages) in expected.items():
        student = distill.initial_student(teacher, name, base.seed)
        assert student.config.attention_layers == attention, name
        staged = distill_stages.stage_configs(distill.staged_config(base, student, name, "t"))
        assert [(n, c.objective.name, c.num_steps) for n, c in staged] == stages, name
        assert [c.init_from for _, c in staged] == ["source"] + ["previous"] * (len(stages) - 1)
        assert all(tuple(c.model.attention_layers) == attention for _, c in staged), name
        assert all(c.objective.teacher == "run:t" for _, c in staged), name
        # The first stage trains only the Mamba mixers; the last trains everything.
        params = nnx.to_pure_dict(nnx.state(student, nnx.Param))
        frozen = optim.params_matching(params, staged[0][1].optim.frozen, "frozen")
        for path, is_frozen in jax.tree.leaves_with_path(frozen):
            layer = int(path[1].key) if path[0].key == "layers" else None
            mixer = layer is not None and layer not in attention and path[2].key == "mixer"
            assert is_frozen != mixer, (name, jax.tree_util.keystr(path))
        assert tuple(staged[-1][1].optim.frozen) == (), name
    scratch = distill.initial_student(teacher, "scratch", base.seed)
    config = distill.scratch_run_config(base, scratch)
    assert (config.objective.name, config.num_steps, config.init_from) == ("next_token", 1000, "")


def test_the_step_budget_splits_by_fractions_with_a_step_per_stage():
    assert distill.split_steps(1000, (0.2, 0.2, 0.6), "f") == [200, 200, 600]
    assert distill.split_steps(3, (0.2, 0.2, 0.6), "f") == [1, 1, 1]
    assert distill.split_steps(3, (0.2, 0.8), "f") == [1, 2]
    assert distill.split_steps(7, (0.5, 0.5), "f") == [4, 3]
    with pytest.raises(ValueError, match=r"student_steps=2 is too few for the 3 stages of f"):
        distill.split_steps(2, (0.2, 0.2, 0.6), "f")
    with pytest.raises(ValueError, match=r"f must be positive fractions summing to 1"):
        distill.split_steps(10, (0.5, 0.6), "f")
    base = distill_config.get_config()
    base.experiment.students = ("pure", "hybrid75")
    with pytest.raises(ValueError, match=r"config.experiment.students must name distinct"):
        distill.selected_students(base)


def test_bench_quick_reports_step_and_decode_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("experiments.bench.distill", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    ms = data["step_ms"]
    for name in ("pure", "hybrid50"):
        ratio = ms[f"{name} distill_kl"] / ms[f"{name} next_token"]
        assert abs(data["step_ratio"][name] - ratio) < 1e-9 * ratio
        for c, speed in data["decode_tokens_per_s"][name].items():
            teacher = data["decode_tokens_per_s"]["teacher"][c]
            assert abs(data["decode_ratio"][name][c] - speed / teacher) < 1e-9 * speed / teacher
    assert set(data["decode_tokens_per_s"]["teacher"]) == {"b=1,T=16", "b=4,T=16"}
    assert data["attention_layers"] == {"pure": [], "hybrid50": [1]}
    assert all(math.isfinite(v) and v > 0 for v in ms.values())
    assert "| pure / teacher |" in result.stdout


def test_the_scratch_student_never_starts_from_the_teachers_init_from():
    base = distill_config.get_config()
    base.init_from = "run:/somewhere/pretrained"  # the teacher continues a pretrained run
    model = dict(distill.teacher_config(base).model.to_dict(), vocab_size=46)
    teacher = models.build(model, nnx.Rngs(0))
    student = distill.initial_student(teacher, "scratch", 0)
    config = distill.scratch_run_config(base, student)
    assert (config.init_from, config.init_from_mode, tuple(config.init_from_map)) == (
        "",
        "exact",
        (),
    )
