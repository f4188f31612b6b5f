"""The MEDITRON toy experiment (issue 22 item 6): the synthetic medical world it generates, and a
smoke run of every stage at a tiny size (2 steps per stage) whose report's verdicts follow from
its numbers by the stated rules."""

import json
import math
import os
import re
import time

import ml_collections
import pytest

from configs import meditron as meditron_config
from experiments import meditron
from jaxlab.eval import medical
from tests.entrypoints import run_module


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text))


def small_experiment(**overrides):
    e = meditron_config.get_config().experiment
    e.update(num_diseases=20, questions_per_disease=2, **overrides)
    return e


def test_question_bank_asks_about_facts_only_the_corpus_holds(tmp_path):
    e = small_experiment()
    facts = meditron.medical_facts(e.num_diseases, e.seed)
    assert facts == meditron.medical_facts(e.num_diseases, e.seed)  # seeded
    names = [f["disease"] for f in facts] + [f["drug"] for f in facts]
    assert len(set(names)) == len(names)
    corpus = meditron.write_corpus(facts, 2, str(tmp_path / "corpus"), e.seed)
    texts = {}
    for source in meditron.MEDICAL_SOURCES:
        with open(os.path.join(corpus, source, "part-0.jsonl")) as f:
            texts[source] = [json.loads(line)["text"] for line in f]
        assert len(texts[source]) == 2 * len(facts)
    dirs = meditron.write_question_bank(facts, e, str(tmp_path / "bank"))
    drug_of = {f["disease"]: f["drug"] for f in facts}
    for benchmark in ("medqa", "medmcqa", "pubmedqa"):
        # The released layouts: the harness's loaders read them.
        train = medical.load(benchmark, dirs[benchmark], "train")
        test = medical.load(benchmark, dirs[benchmark], "test")
        assert len(train) == len(test) == e.num_diseases * e.questions_per_disease // 2

        def diseases(questions):
            return {d for q in questions for d in words(q.question) if d in drug_of}

        assert not diseases(train) & diseases(test)  # finetuning never asks about test diseases
        for q in test:
            (disease,) = {d for d in words(q.question) if d in drug_of}
            drug = drug_of[disease]
            if benchmark == "pubmedqa":
                assert (q.answer == "yes") == (f"Is {drug} " in q.question)
                assert drug not in q.context  # the contexts do not give the answer away
            else:
                assert q.options[q.labels.index(q.answer)] == drug
            # Every source states the fact.
            for source in meditron.MEDICAL_SOURCES:
                assert any(disease in t and drug in t for t in texts[source]), source


def test_claims_follow_the_rules():
    e = ml_collections.ConfigDict(dict(benchmarks=("medqa", "pubmedqa")))
    acc = {
        "meditron": {"medqa": 0.9, "pubmedqa": 0.55},
        "baseline": {"medqa": 0.2, "pubmedqa": 0.5},
    }
    results = dict(
        perplexity=dict(
            before=dict(guidelines=9.0, abstracts=8.0, papers=7.0, replay=5.0),
            after=dict(guidelines=3.0, abstracts=3.0, papers=7.5, replay=5.4),
        ),
        test_questions=dict(medqa=100, pubmedqa=100),
        chance=dict(medqa=0.2, pubmedqa=0.5),
        finetuned={
            m: {b: {"top_token/clean": {"accuracy": {"mean": a}}} for b, a in by.items()}
            for m, by in acc.items()
        },
    )
    verdicts = [c.verdict for c in meditron.claims(results, e)]
    # papers rose; general rose 8%; medqa far above chance, pubmedqa within 2 sigma (0.1);
    # mean difference 0.375 against a mean standard error of about 0.065.
    assert verdicts == ["does not hold", "holds", "holds", "inconclusive", "holds"]


SMOKE = (
    "--config.num_steps=2",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.log_every=2",
    "--config.batch_size=2",
    "--config.seq_len=64",
    "--config.eval_batches=1",
    "--config.optim.warmup_steps=1",
    "--config.model.hidden_size=16",
    "--config.model.intermediate_size=32",
    "--config.model.num_layers=1",
    "--config.model.num_heads=2",
    "--config.model.num_kv_heads=1",
    "--config.experiment.num_diseases=20",
    "--config.experiment.docs_per_disease=1",
    "--config.experiment.questions_per_disease=1",
    "--config.experiment.cpt_steps=2",
    "--config.experiment.finetune_steps=2",
    "--config.experiment.finetune_batch_size=2",
    "--config.experiment.finetune_validation_fraction=0.3",
    "--config.experiment.benchmarks=medqa",
    "--config.experiment.parsers=clean",
    "--config.experiment.max_test_questions=2",
    "--config.experiment.sc_samples=2",
    "--config.experiment.cot_max_new_tokens=4",
    "--config.experiment.seeds=1234",
)


def test_experiment_smoke_runs_every_stage_and_reports_claims(tmp_path):
    begin = time.perf_counter()
    result = run_module("experiments.meditron", f"--workdir={tmp_path}", *SMOKE)
    seconds = time.perf_counter() - begin
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    report_text = (tmp_path / "REPORT.md").read_text()
    for stage in ("0_pretrain", "1_cpt", "2_ft_meditron_medqa", "2_ft_baseline_medqa"):
        assert (tmp_path / stage / "metrics.jsonl").exists(), stage
    # Perplexity of every source before and after continued pretraining.
    assert set(results["perplexity"]) == {"before", "after"}
    for when in ("before", "after"):
        assert set(results["perplexity"][when]) == {"guidelines", "abstracts", "papers", "replay"}
    # Every mode on both finetuned models, likelihood on both raw models.
    for model in meditron.MODELS:
        runs = results["finetuned"][model]["medqa"]
        assert set(runs) == {"top_token/clean", "likelihood/clean", "cot/clean", "sc_cot/clean"}
        assert "likelihood/clean" in results["raw"][model]["medqa"]
    # The verdicts are the rules applied to the reported numbers.
    e = ml_collections.ConfigDict(dict(benchmarks=("medqa",)))
    expected = [c.verdict for c in meditron.claims(results, e)]
    assert [c["verdict"] for c in results["claims"]] == expected
    assert "Verdict rule:" in report_text and "Table 5" in report_text
    assert math.isfinite(results["seconds"]["total"])
    print(f"smoke run: {seconds:.1f} s")
    # A rerun trains nothing and reads every evaluation back from its stage folder.
    evals = sorted(tmp_path.glob("*/medical_eval*.json"))
    assert [str(p.relative_to(tmp_path)) for p in evals] == [
        "0_pretrain/medical_eval_raw_medqa.json",
        "1_cpt/medical_eval_raw_medqa.json",
        "2_ft_baseline_medqa/medical_eval_medqa.json",
        "2_ft_meditron_medqa/medical_eval_medqa.json",
    ]
    written = {p: p.stat().st_mtime_ns for p in evals}
    again = run_module("experiments.meditron", f"--workdir={tmp_path}", *SMOKE)
    assert again.returncode == 0, again.stderr[-4000:]
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in evals} == written
    for key in ("perplexity", "raw", "finetuned", "claims"):
        assert rerun[key] == results[key], key


@pytest.mark.parametrize(
    "bad",
    [
        dict(benchmarks=("mmlu_medical",)),
        dict(cpt_weights=(1.0,)),
        dict(modes=("likelihood", "cot")),
        dict(modes=("top_token", "beam")),
        dict(parsers=("parity",)),
    ],
)
def test_bad_experiment_settings_are_named(bad, tmp_path):
    config = meditron_config.get_config()
    config.experiment.update(bad)
    with pytest.raises(ValueError, match=f"config.experiment.{next(iter(bad))}"):
        meditron.run(config, str(tmp_path))


def test_a_corpus_too_small_to_hold_out_every_source_is_named(tmp_path):
    # 3 documents per source: at a 10% validation fraction some source keeps none, and the
    # domain claim needs each source's held-out perplexity.
    facts = meditron.medical_facts(3, seed=0)
    corpus = meditron.write_corpus(facts, 1, str(tmp_path), seed=0)
    with pytest.raises(ValueError, match=r"num_diseases \* docs_per_disease = 3 documents"):
        meditron.check_held_out(corpus, 3)
    corpus = meditron.write_corpus(meditron.medical_facts(40, seed=0), 2, str(tmp_path), seed=0)
    meditron.check_held_out(corpus, 80)


def test_evaluation_cache_reads_back_only_the_same_model_step_and_questions(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate_many(model, tokenizer, configs, test):
        calls.append(test[0].question)
        summary = dict(accuracy={"mean": len(calls)}, parse_failures={"total": 0})
        return [dict(summary, questions_per_second=1.0) for _ in configs]

    monkeypatch.setattr(meditron.medical, "evaluate_many", fake_evaluate_many)
    e = meditron_config.get_config().experiment
    cache = tmp_path / "eval_medqa.json"

    def evaluate(text, step=100):
        question = meditron.medical.Question("bank.jsonl:1", text, ("a", "b"), "A")
        return meditron.evaluate_model(
            None,
            None,
            e,
            "medqa",
            [question],
            chat=True,
            runs=[("top_token", "clean")],
            cache=str(cache),
            step=step,
        )["top_token/clean"]["accuracy"]["mean"]

    assert evaluate("x") == 1
    assert evaluate("x") == 1 and calls == ["x"]  # read back
    assert evaluate("y") == 2  # same question id, other content
    assert evaluate("y", step=101) == 3  # another model
    cache.write_text('{"settings": {')  # a run killed while writing
    assert evaluate("y", step=101) == 4
    assert evaluate("y", step=101) == 4 and len(calls) == 4
