"""Smoke tests of the test-time scaling experiment (issue 21) and its bench at a tiny size, and
the pieces the experiment decides with: the model list, the k grid, chance levels and the
student's lead over the teacher on the seconds axis."""

import json
import os

import numpy as np
import pytest

from experiments import test_time_scaling as tts
from jaxlab.data import reasoning
from tests.entrypoints import run_module

TINY = (
    "--config.num_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.log_every=2",
    "--config.seq_len=64",
    # A small task whose 2-step examples (under 64 tokens) fit the tiny sequence length.
    "--config.data.sources=('reasoning:train=1-2&test=2&num_train=64&num_test=8',)",
    "--config.batch_size=2",
    "--config.eval_batches=1",
    "--config.model.hidden_size=16",
    "--config.model.intermediate_size=32",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=2",
    "--config.model.num_layers=1",
    "--config.student_model.hidden_size=16",
    "--config.student_model.intermediate_size=32",
    "--config.student_model.num_layers=1",
    "--config.experiment.num_problems=6",
    "--config.experiment.num_samples=4",
    "--config.experiment.problems_per_call=2",
    "--config.experiment.max_new_tokens=24",
    "--config.experiment.bootstrap_resamples=50",
)


def test_parse_models_keeps_order_and_rejects_malformed_entries(tmp_path):
    d = str(tmp_path)  # sources must name existing directories
    got = tts.parse_models(f" teacher=run:{d} , hybrid=run:{d}@5,pure=hf:{d}")
    assert list(got.items()) == [
        ("teacher", f"run:{d}"),
        ("hybrid", f"run:{d}@5"),
        ("pure", f"hf:{d}"),
    ]
    assert tts.parse_models("") == {}
    with pytest.raises(ValueError, match="name=SOURCE"):
        tts.parse_models("teacher")
    with pytest.raises(ValueError, match="twice"):
        tts.parse_models(f"a=run:{d},a=run:{d}")
    with pytest.raises(ValueError, match="run:WORKDIR"):
        tts.parse_models(f"a={d}")
    with pytest.raises(ValueError, match="not a directory"):
        tts.parse_models(f"a=run:{d}/missing")


def test_distilled_models_reads_a_distill_run_record_even_when_moved(tmp_path):
    # The record as experiments/distill writes it when run as --workdir=runs/distill: paths
    # relative to where it ran, the teacher in its default place inside the workdir. The
    # folder was since moved to tmp_path/moved.
    moved = tmp_path / "moved"
    (moved / "teacher").mkdir(parents=True)
    stage = lambda *p: dict(workdir=os.path.join("runs", "distill", *p))  # noqa: E731
    record = dict(
        teacher=dict(workdir=os.path.join("runs", "distill", "teacher")),
        students=dict(
            pure=dict(stages=[stage("student_pure", "0_matrix"), stage("student_pure", "2_kl")]),
            hybrid50=dict(stages=[stage("student_hybrid50", "1_e2e")]),
            scratch=dict(stages=[stage("student_scratch")]),
        ),
    )
    (moved / "results.json").write_text(json.dumps(record))
    got = tts.distilled_models(str(moved), ("hybrid50", "pure", "scratch"))
    assert list(got.items()) == [
        ("teacher", f"run:{moved / 'teacher'}"),
        ("hybrid50", f"run:{moved / 'student_hybrid50' / '1_e2e'}"),
        ("pure", f"run:{moved / 'student_pure' / '2_kl'}"),
        ("scratch", f"run:{moved / 'student_scratch'}"),
    ]
    with pytest.raises(ValueError, match="did not train"):
        tts.distilled_models(str(moved), ("hybrid25",))
    with pytest.raises(ValueError, match="no results.json"):
        tts.distilled_models(str(tmp_path), ("pure",))
    # A teacher given with --teacher_workdir elsewhere is taken as recorded.
    elsewhere = tmp_path / "teacher_run"
    elsewhere.mkdir()
    record["teacher"]["workdir"] = str(elsewhere)
    (moved / "results.json").write_text(json.dumps(record))
    assert tts.distilled_models(str(moved), ("pure",))["teacher"] == f"run:{elsewhere}"
    record["teacher"]["workdir"] = str(tmp_path / "gone")
    (moved / "results.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="teacher run"):
        tts.distilled_models(str(moved), ("pure",))


def test_a_run_trained_with_another_tokenizer_is_refused(tmp_path):
    for name, tokenizer in (("chars", "reasoning"), ("bytes", "byte")):
        (tmp_path / name).mkdir()
        config = dict(data=dict(tokenizer=tokenizer))
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    tts.check_tokenizer("student", f"run:{tmp_path / 'chars'}", "reasoning")
    tts.check_tokenizer("student", f"run:{tmp_path / 'bytes'}", "byte")
    with pytest.raises(ValueError, match="trained with tokenizer 'byte', but config.data"):
        tts.check_tokenizer("student", f"run:{tmp_path / 'bytes'}", "reasoning")
    tts.check_tokenizer("hf_model", "hf:/some/llama", "reasoning")  # no run config to read


def test_k_grid_and_chance_levels():
    assert tts.k_grid(32) == [1, 2, 4, 8, 16, 32]
    assert tts.k_grid(6) == [1, 2, 4, 6]
    assert tts.k_grid(1) == [1]
    c = tts.chance(10, [1, 2, 32])
    # Independent uniform guesses: P(at least one right in k) by complement, written out.
    assert c["coverage"] == pytest.approx([0.1, 1 - 0.81, 1 - 0.9**32])
    assert c["majority"] == [0.1, 0.1, 0.1]


def test_lead_is_positive_only_when_the_student_is_strictly_ahead_somewhere():
    teacher_s = np.array([1.0, 2.0, 4.0])
    student_s = np.array([0.5, 1.0, 2.0])  # twice as fast
    # Equal curves on k: the student reaches the teacher's k=2 value (0.3) at 1 s, where the
    # teacher is at 0.2, so it leads by 0.1 at 1 s and by 0.1 at 2 s (0.4 vs 0.3).
    values = np.array([0.2, 0.3, 0.4])
    assert tts.lead(teacher_s, values, student_s, values) == pytest.approx(0.1)
    # A tie everywhere (both at 0) is no lead.
    zeros = np.zeros(3)
    assert tts.lead(teacher_s, zeros, student_s, zeros) == 0.0
    # A student that is always below.
    assert tts.lead(teacher_s, values, student_s, values - 0.5) < 0
    # No common seconds.
    assert tts.lead(teacher_s, values, student_s / 100, values) == -np.inf


def check_claims(results):
    """Every verdict re-derived from the numbers in results.json by the stated rule."""
    teacher = next(iter(results["models"]))
    claims = {c["claim"]: c["verdict"] for c in results["claims"]}
    assert len(claims) == 3 * (len(results["models"]) - 1)
    for student, cross in results["crossovers"].items():
        t, s = results["models"][teacher], results["models"][student]
        faster = s["samples_per_s"] > t["samples_per_s"]
        assert claims[f"{student} generates samples faster than {teacher}"] == (
            "holds" if faster else "does not hold"
        )
        for metric in ("majority", "coverage"):
            ahead = tts.lead(
                np.array(t["seconds_per_problem"]),
                np.array(t[metric]["mean"]),
                np.array(s["seconds_per_problem"]),
                np.array(s[metric]["mean"]),
            )
            assert cross[metric]["lead"] == pytest.approx(ahead)
            key = f"{student}'s {metric}@k overtakes {teacher}'s at a fixed time budget"
            share = cross[metric]["bootstrap_fraction"]
            if ahead > 0 and share >= 0.95:
                expected = "holds"
            elif ahead <= 0 and share <= 0.05:
                expected = "does not hold"
            else:
                expected = "inconclusive"
            assert claims[key] == expected


def test_experiment_trains_its_own_models_and_writes_the_report(tmp_path):
    result = run_module("experiments.test_time_scaling", f"--workdir={tmp_path}", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (
        "REPORT.md",
        "coverage_vs_seconds.png",
        "majority_vs_seconds.png",
        "accuracy_vs_k.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["trained_here"] is True
    assert list(results["models"]) == ["teacher", tts.STUDENT]
    assert results["models"]["teacher"]["family"] == "TransformerConfig"
    assert results["models"][tts.STUDENT]["family"] == "MambaConfig"
    assert results["ks"] == [1, 2, 4]
    assert results["rows_per_call"] == 8
    references = None
    for r in results["models"].values():
        assert r["samples"] == 6 * 4
        assert len(r["answers"]) == 6 and all(len(row) == 4 for row in r["answers"])
        assert r["failures"] == sum(a is None for row in r["answers"] for a in row)
        assert r["seconds_per_problem"] == pytest.approx(
            [k * r["seconds_per_sample"] for k in results["ks"]]
        )
        for metric in ("coverage", "majority"):
            c = r[metric]
            bounds = zip(c["low"], c["mean"], c["high"], strict=True)
            assert all(lo <= m <= hi for lo, m, hi in bounds)
        # The stored curves follow from the stored answers.
        if references is None:
            problems = reasoning.parse_spec(results["task"]).split("test")[:6]
            references = [p.value for p in problems]
        cov, maj = tts.per_problem_curves(r["answers"], references, results["ks"])
        assert r["coverage"]["mean"] == pytest.approx(cov.mean(0).tolist())
        assert r["majority"]["mean"] == pytest.approx(maj.mean(0).tolist())
    check_claims(results)
    report = (tmp_path / "REPORT.md").read_text()
    assert "stand-in student" in report and "unverified" in report and "Chance" in report


def test_bench_quick_writes_ratios_per_batch(tmp_path):
    out = tmp_path / "bench.json"
    result = run_module("experiments.bench.test_time", "--quick", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads(out.read_text())
    assert [row["batch"] for row in bench["rows"]] == [1, 4]
    for row in bench["rows"]:
        assert row["problems_per_call"] * row["samples_per_problem"] == row["batch"]
        teacher, student = row["teacher (llama)"], row["student (mamba)"]
        assert student["samples_per_s"] > 0 and teacher["samples_per_s"] > 0
        assert row["student_over_teacher"] == pytest.approx(
            student["samples_per_s"] / teacher["samples_per_s"]
        )
        assert row["over_teacher"] == {"student (mamba)": row["student_over_teacher"]}
        assert teacher["samples_per_s"] == pytest.approx(1 / teacher["median_seconds_per_sample"])


def synthetic_results(teacher_sps: float, student_sps: float, student_shift: float) -> dict:
    """Two models on 40 problems with k = 1, 2, 4: the same per-problem curves, the student's
    shifted by ``student_shift``, each at its own speed."""
    ks = [1, 2, 4]
    rng = np.random.default_rng(0)
    base = np.sort(rng.random((40, 3)), axis=1)
    curves = {"teacher": base, "student": np.clip(base + student_shift, 0, 1)}
    results = dict(ks=ks, rows_per_call=128, models={}, crossovers={})
    for name, sps in (("teacher", teacher_sps), ("student", student_sps)):
        stats = tts.curve_stats(curves[name], resamples=20, seed=0)
        results["models"][name] = dict(
            samples_per_s=sps,
            seconds_per_problem=[k / sps for k in ks],
            coverage=stats,
            majority=stats,
        )
    results["crossovers"]["student"] = {
        metric: tts.crossover_stats(
            np.array(results["models"]["teacher"]["seconds_per_problem"]),
            curves["teacher"],
            np.array(results["models"]["student"]["seconds_per_problem"]),
            curves["student"],
            resamples=20,
            seed=0,
        )
        for metric in ("majority", "coverage")
    }
    return results


@pytest.mark.parametrize(
    "student_sps, shift, faster, overtakes",
    [
        (2.0, 0.0, True, True),  # same accuracy per k, twice the samples per second
        (1.0, -0.05, False, False),  # same speed, worse at every k
        (2.0, -1.0, True, False),  # faster but never right
    ],
)
def test_claims_follow_the_verdict_rule(student_sps, shift, faster, overtakes):
    results = synthetic_results(1.0, student_sps, shift)
    claims = {c.claim: c.verdict for c in tts.claims_of(results, "teacher")}
    assert claims["student generates samples faster than teacher"] == (
        "holds" if faster else "does not hold"
    )
    for metric in ("majority", "coverage"):
        key = f"student's {metric}@k overtakes teacher's at a fixed time budget"
        assert claims[key] == ("holds" if overtakes else "does not hold")
        cross = results["crossovers"]["student"][metric]
        assert (cross["lead"] > 0) == overtakes
        assert (cross["seconds"] is not None) == overtakes
    results_json = {**results, "claims": [{"claim": k, "verdict": v} for k, v in claims.items()]}
    check_claims(results_json)


def test_experiment_takes_given_models_of_any_family(tmp_path):
    from flax import nnx

    from jaxlab import models
    from jaxlab.train import pretrained

    shared = dict(vocab_size=46, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2)
    mamba = dict(shared, name="mamba", mixer="mamba1", expand=1, state_size=4, num_kv_heads=2)
    configs = {
        "teacher": dict(shared, name="llama", num_kv_heads=1),
        "hybrid": dict(mamba, attention_layers=(1,)),
        "pure": mamba,
    }
    sources = []
    for name, fields in configs.items():
        model = models.build(models.make_config(fields), nnx.Rngs(1))
        sources.append(f"{name}={pretrained.save_model_source(str(tmp_path / name), model)}")
    tiny = [a for a in TINY if not a.startswith(("--config.model", "--config.student_model"))]
    result = run_module(
        "experiments.test_time_scaling",
        f"--workdir={tmp_path / 'out'}",
        f"--config.experiment.models={','.join(sources)}",
        *tiny,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["trained_here"] is False
    assert list(results["models"]) == ["teacher", "hybrid", "pure"]
    assert list(results["crossovers"]) == ["hybrid", "pure"]
    assert not (tmp_path / "out" / "teacher").exists()  # nothing was trained
    assert [r["family"] for r in results["models"].values()] == [
        "TransformerConfig",
        "MambaConfig",
        "MambaConfig",
    ]
    check_claims(results)
    assert "stand-in" not in (tmp_path / "out" / "REPORT.md").read_text()


def test_experiment_takes_a_distill_runs_teacher_and_students(tmp_path):
    from flax import nnx

    from jaxlab import models
    from jaxlab.train import pretrained

    # A distill workdir's layout and record (experiments/distill), with tiny untrained models.
    shared = dict(vocab_size=46, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2)
    mamba = dict(shared, name="mamba", mixer="mamba1", expand=1, state_size=4, num_kv_heads=2)
    runs = {
        "teacher": ("teacher", dict(shared, name="llama", num_kv_heads=1)),
        "hybrid50": ("student_hybrid50/1_e2e", dict(mamba, attention_layers=(1,))),
        "pure": ("student_pure/2_kl", mamba),
    }
    distill = tmp_path / "distill"
    for where, fields in runs.values():
        model = models.build(models.make_config(fields), nnx.Rngs(1))
        pretrained.save_model_source(str(distill / where), model)
    record = dict(
        teacher=dict(workdir="runs/distill/teacher"),
        students={
            name: dict(stages=[dict(workdir=f"runs/distill/{where}")])
            for name, (where, _) in runs.items()
            if name != "teacher"
        },
    )
    (distill / "results.json").write_text(json.dumps(record))
    tiny = [a for a in TINY if not a.startswith(("--config.model", "--config.student_model"))]
    args = (
        f"--config.experiment.distill_workdir={distill}",
        "--config.experiment.distill_students=('pure',)",
        *tiny,
    )
    result = run_module("experiments.test_time_scaling", f"--workdir={tmp_path / 'out'}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == ["teacher", "pure"]
    assert results["models"]["pure"]["source"] == f"run:{distill / 'student_pure' / '2_kl'}"
    assert results["models"]["teacher"]["family"] == "TransformerConfig"
    # Both ways of naming the models at once is an error naming both fields.
    both = run_module(
        "experiments.test_time_scaling",
        f"--workdir={tmp_path / 'both'}",
        f"--config.experiment.models=teacher=run:{distill / 'teacher'}",
        *args,
    )
    assert both.returncode != 0
    assert "config.experiment.models and config.experiment.distill_workdir" in both.stderr
