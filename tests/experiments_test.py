"""End-to-end smoke runs of the experiment entrypoints in a temporary workdir."""

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_demo_interop_runs_and_writes_report(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.demo_interop", f"--workdir={tmp_path}",
         "--config.max_new_tokens=8", "--config.num_samples=2"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    assert "jaxlab vs transformers" in report
    assert (tmp_path / "logits_agreement.png").stat().st_size > 1000
    assert (tmp_path / "hf_checkpoint" / "config.json").exists()


def test_bench_model_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench_model", "--quick", f"--out={out}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| decode b=1 |" in result.stdout

    data = json.loads(out.read_text())
    assert data["greedy_tokens"]["b=1"]["identical"] is True
    assert {row["name"] for row in data["rows"]} >= {"decode b=1", "prefill b=1"}


def test_bench_train_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench_train", "--quick", f"--out={out}"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| train step" in result.stdout
    assert json.loads(out.read_text())["quick"] is True


def test_demo_lm_smoke_reports_perplexities(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.demo_lm", f"--workdir={tmp_path}",
         "--config=configs/lm_smoke.py"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "REPORT.md").read_text()
    assert "unigram baseline" in report and "after training (step 8)" in report
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_train_lm_rejects_a_misspelled_override(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train_lm", "--config=configs/lm_smoke.py",
         f"--workdir={tmp_path}", "--config.num_stepz=3"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
