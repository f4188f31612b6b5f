"""Quick mode of the medical evaluation throughput bench (top-token vs likelihood vs SC-CoT)."""

import json

from tests.entrypoints import run_module


def test_bench_medical_eval_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_module("experiments.bench.medical_eval", "--quick", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"top_token", "likelihood", "sc_cot"}
    assert result["ratios"]["top_token_vs_top_token"] == 1.0
    for name, mode in result["modes"].items():
        assert mode["questions_per_second"] > 0
        assert result["ratios"][f"{name}_vs_top_token"] > 0
