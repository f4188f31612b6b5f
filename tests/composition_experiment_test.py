"""Composition A at smoke size: configs/composition.py's four runs, as configs/reproduce.py
chains them (the same modules, configs and {root} links), each reading the one before."""

import json

import pytest

from configs import composition
from configs import reproduce as sets
from jaxlab.eval import claims
from tests.entrypoints import run_module

# One narrow model for the DoGE proxy, the pretraining and the teacher (init_from is exact).
MODEL = (
    "--config.model.num_layers=2",  # the 50% hybrid: Mamba at layer 0, attention at 1
    "--config.model.hidden_size=16",
    "--config.model.intermediate_size=32",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
)
STEPS = (
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.log_every=2",
    "--config.optim.warmup_steps=0",
)
SMOKE = sets.composition_runs(
    (0, 0, 0, 0),
    mixture=(*MODEL, *STEPS, "--config.num_steps=2", "--config.batch_size=4"),
    pretrain=(
        *MODEL,
        *STEPS,
        "--config.num_steps=2",
        "--config.batch_size=4",
        "--config.eval_batches=1",
    ),
    distill=(
        *MODEL,
        *STEPS,
        "--config.num_steps=2",
        "--config.batch_size=2",
        "--config.eval_batches=1",
        "--config.eval_per_source=False",
        "--config.experiment.students=('pure','hybrid50')",
        "--config.experiment.student_steps=3",
        "--config.experiment.test_problems=4",
        "--config.experiment.extra_task=",
        "--config.experiment.eval_batch=4",
        "--config.experiment.decode_batches=(2,)",
        "--config.experiment.decode_lengths=(4,)",
        "--config.experiment.prompt_len=4",
        "--config.experiment.decode_repeats=1",
    ),
    tts=(
        "--config.experiment.distill_students=('hybrid50',)",
        "--config.experiment.num_problems=2",
        "--config.experiment.num_samples=2",
        "--config.experiment.problems_per_call=2",
        "--config.experiment.bootstrap_resamples=20",
    ),
)


def test_composition_a_runs_its_four_stages_each_on_the_one_before(tmp_path):
    root = str(tmp_path)
    for spec in SMOKE:
        run = claims.Run(**spec.to_dict())
        argv = run.argv(root)
        assert argv[:2] == ["-m", run.module]
        result = run_module(run.module, *argv[2:])
        assert result.returncode == 0, (run.name, result.stderr[-3000:])

    # 1. DoGE's weights over the corpus domains, the target scored, not trained on.
    weights = json.loads((tmp_path / "compose_mixture" / "domain_weights.json").read_text())
    assert weights["domains"] == list(composition.DOMAINS)
    assert weights["targets"] == [composition.TARGET]
    assert len(weights["average"]) == len(composition.DOMAINS)
    assert sum(weights["average"]) == pytest.approx(1.0, abs=1e-5)
    # 2. The pretraining run sampled at those weights, with AdEMAMix, on the composed model.
    pretrain = json.loads((tmp_path / "compose_pretrain" / "config.json").read_text())
    assert pretrain["optim"]["name"] == "ademamix"
    assert pretrain["optim"]["warmup_alpha_b3"] == pretrain["num_steps"] == 2
    assert pretrain["model"]["dwa"] == {"dilation": 1, "period": 1}
    assert pretrain["model"]["sparse_attention"]["kind"] == "hash"
    # 3. The teacher continued from it on the task; the hybrid kept the averages and the sparse
    # attention in its attention layers.
    distill = json.loads((tmp_path / "compose_distill" / "results.json").read_text())
    assert list(distill["models"]) == ["teacher", "pure", "hybrid50"]
    # The pure student ran MOHAWK's stages on the teacher's averaged inputs.
    pure = distill["students"]["pure"]
    assert [s["stage"] for s in pure["stages"]] == ["matrix", "hidden", "kl"]
    pure_model = json.loads(
        (tmp_path / "compose_distill" / "student_pure" / "2_kl" / "config.json").read_text()
    )["model"]
    assert (
        pure_model["dwa"] == {"dilation": 1, "period": 1} and pure_model["attention_layers"] == []
    )
    init = json.loads((tmp_path / "compose_distill" / "teacher" / "init_from.json").read_text())
    assert init["source"].startswith(f"run:{tmp_path / 'compose_pretrain'}")
    student_dir = tmp_path / "compose_distill" / "student_hybrid50"
    (last,) = [d for d in student_dir.iterdir() if d.name.startswith("1_")]
    student = json.loads((last / "config.json").read_text())["model"]
    assert student["name"] == "mamba" and student["attention_layers"] == [1]
    assert student["dwa"] == {"dilation": 1, "period": 1}
    assert student["sparse_attention"]["kind"] == "hash"
    # 4. Test-time scaling sampled the teacher and the student with their byte tokenizer.
    tts = json.loads((tmp_path / "compose_tts" / "results.json").read_text())
    assert list(tts["models"]) == ["teacher", "hybrid50"]
    assert all(m["samples"] == 4 for m in tts["models"].values())
    assert tts["claims"]
