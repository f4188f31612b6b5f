"""MEDITRON end to end at toy scale, offline (issue 22 item 6; configs/meditron.py says what and
why): pretraining on general text -> GAP-Replay-style continued pretraining on a seeded synthetic
medical corpus -> answer-only finetuning per benchmark -> evaluation in every mode, against the
same pipeline without continued pretraining and against chance.

  python -m experiments.meditron --workdir=runs/meditron

Stages run through the training engine, each in its own workdir (a rerun resumes or reloads):
``WORKDIR/0_pretrain``, ``1_cpt``, ``2_ft_<model>_<benchmark>``; the synthetic corpus and the
question bank (in the benchmarks' released formats) in ``WORKDIR/data``. Writes ``REPORT.md``
(claims with their verdict rules, the paper's Table 4/5 numbers beside ours) and
``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from configs import meditron_finetune
from experiments import run_config
from jaxlab.data import sources
from jaxlab.data.guidelines import SPECIAL_TOKENS
from jaxlab.eval import medical, report
from jaxlab.train import loop

FLAGS = flags.FLAGS
MEDICAL_SOURCES = ("guidelines", "abstracts", "papers")
CPT_VALIDATION_FRACTION = 0.1  # of each source's documents, held out for its perplexity
MODELS = ("meditron", "baseline")  # finetuned from the continued-pretrained / pretrained model
# MEDITRON's 7B numbers (brief section 1.6): Table 4, 3-shot on the raw models (mean over seeds),
# and Table 5, top-token after finetuning; columns PubMedQA, MedMCQA, MedQA.
PAPER_TABLE_4 = {
    "Llama-2-7B": {"pubmedqa": 49.1, "medmcqa": 37.9, "medqa": 29.1},
    "MEDITRON-7B": {"pubmedqa": 69.3, "medmcqa": 36.3, "medqa": 28.7},
}
PAPER_TABLE_5 = {
    "Llama-2-7B": {"pubmedqa": 61.8, "medmcqa": 54.4, "medqa": 44.0},
    "MEDITRON-7B": {"pubmedqa": 74.4, "medmcqa": 59.2, "medqa": 47.9},
}
CLAIMS = {
    "domain": "continued pretraining lowers held-out perplexity on every medical source",
    "general": "replay keeps general text: its perplexity rises at most 10%",
    "chance": "finetuned MEDITRON beats chance on {benchmark} (top-token, clean parser)",
    "cpt": "continued pretraining helps after finetuning (top-token, mean over benchmarks)",
}
RULES = (
    "domain: holds if after < before for each of guidelines, abstracts, papers, else does not "
    "hold. general: holds if after <= 1.10 x before, else does not hold. chance: holds if "
    "accuracy > chance + 2 sqrt(chance (1 - chance) / n), does not hold if below chance minus "
    "that margin, else inconclusive (chance: the most frequent test label's share). cpt: the "
    "mean over benchmarks of MEDITRON minus baseline accuracy holds if > 2 standard errors (the "
    "mean over benchmarks of sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n)), does not hold if < -2, "
    "else inconclusive."
)


def define_flags() -> None:
    """This experiment's flags (:func:`experiments.run_config.define_flags`)."""
    run_config.define_flags(
        "meditron",
        "The pretraining run's configuration and the experiment block.",
    )


# --------------------------------------------------------------------------------------------
# The synthetic medical world: facts, documents, questions.

_SYLLABLES = ("ka", "lo", "mi", "ru", "ve", "zo", "ta", "ni", "po", "se", "du", "fa", "gi", "be")
_DISEASE_ENDINGS = ("osis", "itis", "emia", "algia")
_DRUG_ENDINGS = ("mab", "pril", "cillin", "statin", "zole")
_SYMPTOMS = ("fever", "rash", "cough", "headache", "fatigue", "nausea", "chest pain", "dizziness")
_ORGANS = ("liver", "kidney", "lung", "heart", "skin", "brain", "bone", "eye")


def _names(rng: np.random.Generator, endings, count: int, taken: set) -> list[str]:
    names = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES, size=3)) + str(rng.choice(endings))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def medical_facts(num_diseases: int, seed: int) -> list[dict[str, str]]:
    """``num_diseases`` invented diseases: ``{disease, drug, symptom, organ}`` each, one drug
    per disease (distinct names throughout)."""
    rng = np.random.default_rng([seed, 0])
    taken: set = set()
    diseases = _names(rng, _DISEASE_ENDINGS, num_diseases, taken)
    drugs = _names(rng, _DRUG_ENDINGS, num_diseases, taken)
    return [
        dict(
            disease=d,
            drug=drugs[i],
            symptom=str(rng.choice(_SYMPTOMS)),
            organ=str(rng.choice(_ORGANS)),
        )
        for i, d in enumerate(diseases)
    ]


def _document(source: str, f: dict[str, str], k: int, rng: np.random.Generator) -> str:
    d, drug, symptom, organ = f["disease"], f["drug"], f["symptom"], f["organ"]
    treat = (
        f"The first-line treatment of {d} is {drug}.",
        f"{drug.capitalize()} is the drug of choice for {d}.",
        f"Patients with {d} should receive {drug} first.",
    )[k % 3]
    if source == "guidelines":
        return (
            f"# {d.capitalize()}: clinical guideline\n{d.capitalize()} is a disease of the "
            f"{organ}. Patients with {d} present with {symptom}.\n- {treat}\n- Review the "
            f"patient after two weeks of {drug}."
        )
    if source == "abstracts":
        n = int(rng.integers(40, 900))
        return (
            f"{drug.capitalize()} in {d}: a randomised trial\nIn {n} patients with {d}, a disease "
            f"of the {organ}, {drug} reduced {symptom} compared with placebo. {treat}"
        )
    ref = "".join(rng.choice(_SYLLABLES, size=2)).capitalize()
    return (
        f"# Treatment of {d}\n## Background\n{d.capitalize()} affects the {organ} and presents "
        f"with {symptom} [bib_ref]{ref} et al.[/bib_ref].\n## Results\n{treat} Outcomes with "
        f"{drug} were better than with other drugs.\n## Conclusion\n{treat}"
    )


def write_corpus(facts, docs_per_disease: int, root: str, seed: int) -> str:
    """``root/<source>/part-0.jsonl`` for the three medical sources (``text`` field), every
    disease ``docs_per_disease`` times in each; returns ``root``."""
    rng = np.random.default_rng([seed, 1])
    for source in MEDICAL_SOURCES:
        os.makedirs(os.path.join(root, source), exist_ok=True)
        docs = [_document(source, f, k, rng) for f in facts for k in range(docs_per_disease)]
        order = rng.permutation(len(docs))
        with open(os.path.join(root, source, "part-0.jsonl"), "w") as out:
            for i in order:
                out.write(json.dumps({"text": docs[int(i)]}) + "\n")
    return root


def check_held_out(corpus: str, documents: int) -> None:
    """Every medical source needs held-out documents: the domain claim compares its perplexity
    before and after continued pretraining."""
    for source in MEDICAL_SOURCES:
        held_out = sources.jsonl_documents(
            f"{corpus}/{source}/*.jsonl", "validation", validation_fraction=CPT_VALIDATION_FRACTION
        )
        if not len(held_out):
            raise ValueError(
                f"config.experiment.num_diseases * docs_per_disease = {documents} documents per "
                f"source hold out none of {source!r} (validation fraction "
                f"{CPT_VALIDATION_FRACTION}); raise them"
            )


def _jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _options(rng, facts, f, count: int) -> tuple[list[str], int]:
    others = [g["drug"] for g in facts if g["drug"] != f["drug"]]
    options = [f["drug"], *rng.choice(others, size=count - 1, replace=False).tolist()]
    order = rng.permutation(count)
    options = [options[int(i)] for i in order]
    return options, options.index(f["drug"])


def write_question_bank(facts, e, root: str) -> dict[str, str]:
    """MedQA, MedMCQA and PubMedQA questions about the facts, in their released layouts under
    ``root/<benchmark>`` (train: the first ``train_fraction`` of the diseases in a seeded order,
    test: the rest). Returns ``{benchmark: data_dir}``."""
    rng = np.random.default_rng([e.seed, 2])
    order = rng.permutation(len(facts))
    cut = int(round(e.train_fraction * len(facts)))
    splits = {
        "train": [facts[int(i)] for i in order[:cut]],
        "test": [facts[int(i)] for i in order[cut:]],
    }
    dirs = {b: os.path.join(root, b) for b in ("medqa", "medmcqa", "pubmedqa")}
    for split, chosen in splits.items():
        medqa, medmcqa, pubmedqa = [], [], {}
        for f in chosen:
            for k in range(e.questions_per_disease):
                options, gold = _options(rng, facts, f, 5)
                letters = "ABCDE"
                medqa.append(
                    dict(
                        question=f"A {int(rng.integers(20, 80))}-year-old patient presents with "
                        f"{f['symptom']} and is diagnosed with {f['disease']}. Which drug is the "
                        "first-line treatment",
                        answer=f["drug"],
                        options=dict(zip(letters, options, strict=True)),
                        meta_info="synthetic",
                        answer_idx=letters[gold],
                    )
                )
                options, gold = _options(rng, facts, f, 4)
                medmcqa.append(
                    dict(
                        id=f"{f['disease']}-{k}",
                        question=f"Drug of choice for {f['disease']} is",
                        opa=options[0],
                        opb=options[1],
                        opc=options[2],
                        opd=options[3],
                        cop=gold + 1,
                        exp=f"{f['drug']} is the first-line treatment of {f['disease']}",
                        subject_name="Pharmacology",
                    )
                )
                yes = bool(rng.integers(0, 2))
                drug = (
                    f["drug"] if yes else str(rng.choice([g["drug"] for g in facts if g is not f]))
                )
                pubmedqa[f"{len(pubmedqa) + 1000 * (split == 'test')}"] = dict(
                    QUESTION=f"Is {drug} the first-line treatment of {f['disease']}?",
                    CONTEXTS=[
                        f"{f['disease'].capitalize()} is a disease of the {f['organ']}.",
                        f"Patients with {f['disease']} present with {f['symptom']}.",
                    ],
                    final_decision="yes" if yes else "no",
                    LONG_ANSWER=f"The first-line treatment of {f['disease']} is {f['drug']}.",
                )
        medqa_name = "train.jsonl" if split == "train" else "test.jsonl"
        _jsonl(os.path.join(dirs["medqa"], medqa_name), medqa)
        _jsonl(
            os.path.join(dirs["medmcqa"], "train.json" if split == "train" else "dev.json"), medmcqa
        )
        pubmed_name = (
            os.path.join("pqal_fold0", "train_set.json") if split == "train" else "test_set.json"
        )
        path = os.path.join(dirs["pubmedqa"], pubmed_name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as out:
            json.dump(pubmedqa, out)
    return dirs


def train_file(benchmark: str, data_dir: str) -> str:
    names = {"medqa": "train.jsonl", "medmcqa": "train.json"}
    return os.path.join(
        data_dir, names.get(benchmark, os.path.join("pqal_fold0", "train_set.json"))
    )


# --------------------------------------------------------------------------------------------
# Stages.


def engine_config(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``base`` without its ``experiment`` block: the pretraining run's config."""
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["experiment"]
    return config


def cpt_config(base, corpus: str, pretrain_dir: str) -> ml_collections.ConfigDict:
    """Continued pretraining from the pretrained run on the GAP-Replay-style mixture."""
    e = base.experiment
    config = engine_config(base)
    medical = tuple(f"{s}=jsonl:{corpus}/{s}/*.jsonl" for s in MEDICAL_SOURCES)
    config.data.update(
        sources=(*medical, "replay=embedded"),
        weights=tuple(float(w) for w in e.cpt_weights),
        special_tokens=SPECIAL_TOKENS,
        validation_fraction=CPT_VALIDATION_FRACTION,
    )
    config.eval_per_source = True
    config.init_from = f"run:{pretrain_dir}"
    config.num_steps = e.cpt_steps
    config.eval_every = e.cpt_steps
    config.checkpoint_every = e.cpt_steps
    config.optim.update(
        learning_rate=e.cpt_learning_rate,
        warmup_steps=min(config.optim.warmup_steps, e.cpt_steps),
        decay_steps=2 * e.cpt_steps,  # MEDITRON: a two-epoch cosine stopped after one
    )
    return config


def finetune_config(base, benchmark: str, source_dir: str, data_dir: str):
    """Answer-only finetuning of the run in ``source_dir`` on ``benchmark``'s train file."""
    e = base.experiment
    config = engine_config(base)
    config = meditron_finetune.finetuning(
        config,
        benchmark,
        f"run:{source_dir}",
        train_file(benchmark, data_dir),
        num_steps=e.finetune_steps,
    )
    config.data.validation_fraction = e.finetune_validation_fraction
    config.eval_per_source = False
    config.batch_size = e.finetune_batch_size
    config.seq_len = e.finetune_seq_len
    config.eval_every = e.finetune_steps
    config.checkpoint_every = e.finetune_steps
    config.optim.learning_rate = e.finetune_learning_rate
    return config


def trained_model(result: loop.TrainResult):
    return nnx.merge(result.experiment.graphdef, result.state.params), result.experiment.tokenizer


def chance(questions) -> float:
    """The share of the most frequent gold label: the best constant guess."""
    golds = [q.answer for q in questions]
    return max(golds.count(g) for g in set(golds)) / len(golds)


# Bump when prompts, parsing or scoring change, so that cached evaluations are not read back.
EVAL_CACHE_VERSION = 1


def _read_cache(path: str):
    """The saved ``{settings, results}`` at ``path``, or None when absent or unreadable (a run
    killed while writing it)."""
    try:
        with open(path) as f:
            saved = json.load(f)
        return saved if {"settings", "results"} <= set(saved) else None
    except (OSError, ValueError):
        return None


def evaluate_model(
    model, tokenizer, e, benchmark: str, test, *, chat: bool, runs, cache: str, step: int
) -> dict:
    """``{mode/parser: accuracy summary}`` of ``model`` (trained ``step`` steps) on ``test`` for
    ``runs`` ((mode, parser) pairs), generating once per mode where the parser does not change
    the outputs. Every result, predictions included, goes to the JSON file ``cache`` (kept in
    the model's stage folder, so retraining a deleted stage evaluates again); a rerun with the
    same settings, step and questions reads it back instead of evaluating again."""
    configs = [
        medical.EvalConfig(
            benchmark=benchmark,
            mode=mode,
            parser=parser,
            chat=chat,
            seeds=tuple(int(s) for s in e.seeds),
            sc_samples=e.sc_samples,
            temperature=e.temperature,
            cot_max_new_tokens=e.cot_max_new_tokens,
            batch_size=e.eval_batch_size,
        )
        for mode, parser in runs
    ]
    questions = json.dumps([dataclasses.asdict(q) for q in test], sort_keys=True)
    settings = dict(
        version=EVAL_CACHE_VERSION,
        configs=[dataclasses.asdict(c) for c in configs],
        step=int(step),
        questions=hashlib.sha256(questions.encode()).hexdigest(),
    )
    settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
    saved = _read_cache(cache)
    results = saved["results"] if saved and saved["settings"] == settings else None
    if saved and results is None:
        print(f"--- {cache} holds other settings: evaluating again")
    if results is None:
        results = medical.evaluate_many(model, tokenizer, configs, test)
        medical.write_json(cache + ".tmp", dict(settings=settings, results=results))
        os.replace(cache + ".tmp", cache)  # never a half-written cache
    return {
        f"{c.mode}/{c.parser}": dict(
            accuracy=r["accuracy"],
            parse_failures=r["parse_failures"],
            questions_per_second=r["questions_per_second"],
        )
        for c, r in zip(configs, results, strict=True)
    }


def eval_runs(e) -> list[tuple[str, str]]:
    """(mode, parser) pairs: every mode with every parser; likelihood parses nothing (once)."""
    runs = []
    for mode in e.modes:
        for parser in ("clean",) if mode == "likelihood" else e.parsers:
            runs.append((mode, parser))
    return runs


def run(base: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every stage; returns the results (also what the report is written from)."""
    e = base.experiment
    unknown = [b for b in e.benchmarks if b not in meditron_finetune.N_DOCS]
    if unknown or not e.benchmarks:
        raise ValueError(
            f"config.experiment.benchmarks must name some of {tuple(meditron_finetune.N_DOCS)}, "
            f"got {tuple(e.benchmarks)}"
        )
    if len(e.cpt_weights) != 4:
        raise ValueError(f"config.experiment.cpt_weights needs 4 weights, got {e.cpt_weights}")
    # Claims 3 and 4 read top-token accuracy with the clean parser: refuse a run without it
    # before hours of training, not at the end.
    if "top_token" not in e.modes or set(e.modes) - set(medical.MODES):
        raise ValueError(
            f"config.experiment.modes must be some of {medical.MODES} including 'top_token' "
            f"(the claims read it), got {tuple(e.modes)}"
        )
    if "clean" not in e.parsers or set(e.parsers) - set(medical.PARSERS):
        raise ValueError(
            f"config.experiment.parsers must be some of {medical.PARSERS} including 'clean' "
            f"(the claims read it), got {tuple(e.parsers)}"
        )
    timings = {}
    begin = time.perf_counter()
    facts = medical_facts(e.num_diseases, e.seed)
    data = os.path.join(workdir, "data")
    corpus = write_corpus(facts, e.docs_per_disease, os.path.join(data, "corpus"), e.seed)
    check_held_out(corpus, len(facts) * e.docs_per_disease)
    dirs = write_question_bank(facts, e, os.path.join(data, "benchmarks"))
    tests = {b: medical.load(b, dirs[b], "test")[: e.max_test_questions] for b in e.benchmarks}

    print("--- pretraining on general text")
    start = time.perf_counter()
    pretrain_dir = os.path.join(workdir, "0_pretrain")
    pretrain = loop.train_and_evaluate(engine_config(base), pretrain_dir)
    timings["pretrain"] = time.perf_counter() - start

    print("--- continued pretraining (GAP-Replay style)")
    start = time.perf_counter()
    cpt_dir = os.path.join(workdir, "1_cpt")
    cpt = loop.train_and_evaluate(cpt_config(base, corpus, pretrain_dir), cpt_dir)
    timings["cpt"] = time.perf_counter() - start
    names = (*MEDICAL_SOURCES, "replay")
    # Before: the step-0 evaluation (from the metrics file when a finished run was reloaded).
    before = cpt.initial_eval or next(
        r for r in loop.read_metrics(cpt_dir) if r["step"] == 0 and "eval_loss" in r
    )
    perplexity = {
        when: {n: float(metrics[f"eval_perplexity/{n}"]) for n in names}
        for when, metrics in (("before", before), ("after", cpt.eval))
    }

    results = dict(
        facts=len(facts),
        test_questions={b: len(t) for b, t in tests.items()},
        chance={b: chance(t) for b, t in tests.items()},
        perplexity=perplexity,
        raw={},
        finetuned={m: {} for m in MODELS},
    )
    start = time.perf_counter()
    for name, result in (("baseline", pretrain), ("meditron", cpt)):
        model, tokenizer = trained_model(result)
        results["raw"][name] = {
            b: evaluate_model(
                model,
                tokenizer,
                e,
                b,
                tests[b],
                chat=False,
                runs=[("likelihood", "clean")],
                cache=os.path.join(result.workdir, f"medical_eval_raw_{b}.json"),
                step=result.step,
            )
            for b in e.benchmarks
        }
    timings["raw_eval"] = time.perf_counter() - start
    timings["finetune"] = timings["finetuned_eval"] = 0.0
    for name, source in (("meditron", cpt_dir), ("baseline", pretrain_dir)):
        for b in e.benchmarks:
            print(f"--- finetuning {name} on {b}")
            start = time.perf_counter()
            ft = loop.train_and_evaluate(
                finetune_config(base, b, source, dirs[b]), os.path.join(workdir, f"2_ft_{name}_{b}")
            )
            timings["finetune"] += time.perf_counter() - start
            start = time.perf_counter()
            model, tokenizer = trained_model(ft)
            results["finetuned"][name][b] = evaluate_model(
                model,
                tokenizer,
                e,
                b,
                tests[b],
                chat=True,
                runs=eval_runs(e),
                cache=os.path.join(ft.workdir, f"medical_eval_{b}.json"),
                step=ft.step,
            )
            timings["finetuned_eval"] += time.perf_counter() - start
    timings["total"] = time.perf_counter() - begin
    results["seconds"] = timings
    results["claims"] = [dataclass_dict(c) for c in claims(results, e)]
    return results


def dataclass_dict(claim: report.Claim) -> dict:
    return dict(claim=claim.claim, paper=claim.paper, ours=claim.ours, verdict=claim.verdict)


def _top_token(results, model: str, benchmark: str) -> float:
    return results["finetuned"][model][benchmark]["top_token/clean"]["accuracy"]["mean"]


def claims(results: dict, e) -> list[report.Claim]:
    """The claims of CLAIMS, decided by RULES from the numbers."""
    out = []
    before, after = results["perplexity"]["before"], results["perplexity"]["after"]
    lower = all(after[n] < before[n] for n in MEDICAL_SOURCES)
    out.append(
        report.Claim(
            CLAIMS["domain"],
            "GAP-Replay training lowers the medical validation loss (paper Fig. 5)",
            ", ".join(f"{n} {before[n]:.2f} -> {after[n]:.2f}" for n in MEDICAL_SOURCES),
            report.verdict(lower),
        )
    )
    ratio = after["replay"] / before["replay"]
    out.append(
        report.Claim(
            CLAIMS["general"],
            "replay added to limit forgetting (Table 8: PMC + replay 56.2 vs PMC 54.6 average)",
            f"general {before['replay']:.2f} -> {after['replay']:.2f} ({ratio:.3f}x)",
            report.verdict(ratio <= 1.10),
        )
    )
    diffs, errors = [], []
    for b in e.benchmarks:
        n = results["test_questions"][b]
        p0 = results["chance"][b]
        acc = _top_token(results, "meditron", b)
        margin = 2 * math.sqrt(p0 * (1 - p0) / n)
        verdict = (
            "holds"
            if acc > p0 + margin
            else "does not hold"
            if acc < p0 - margin
            else "inconclusive"
        )
        out.append(
            report.Claim(
                CLAIMS["chance"].format(benchmark=b),
                f"Table 5: MEDITRON-7B {PAPER_TABLE_5['MEDITRON-7B'][b]:.1f}",
                f"{100 * acc:.1f} vs chance {100 * p0:.1f} (n={n}, margin {100 * margin:.1f})",
                verdict,
            )
        )
        base = _top_token(results, "baseline", b)
        diffs.append(acc - base)
        errors.append(math.sqrt(acc * (1 - acc) / n + base * (1 - base) / n))
    diff, error = float(np.mean(diffs)), float(np.mean(errors))
    verdict = (
        "holds" if diff > 2 * error else "does not hold" if diff < -2 * error else "inconclusive"
    )
    paper = {m: np.mean([PAPER_TABLE_5[m][b] for b in e.benchmarks]) for m in PAPER_TABLE_5}
    out.append(
        report.Claim(
            CLAIMS["cpt"],
            f"Table 5: MEDITRON-7B {paper['MEDITRON-7B']:.1f} vs Llama-2-7B "
            f"{paper['Llama-2-7B']:.1f}",
            f"{100 * diff:+.1f} points (standard error {100 * error:.1f})",
            verdict,
        )
    )
    return out


def write_report(workdir: str, results: dict, e) -> str:
    doc = report.Report("MEDITRON end to end at toy scale")
    doc.add(
        "Pretraining on the embedded standard-library corpus (general text), continued "
        "pretraining on a seeded synthetic medical corpus (guidelines, abstracts, papers) with "
        "10% replay of the general text, answer-only finetuning per benchmark in MEDITRON's "
        "ChatML, and evaluation on questions about diseases the finetuning never asked about: "
        "only facts learnt from the corpus answer them. The baseline is the same pipeline "
        f"without continued pretraining. {results['facts']} invented diseases; stage workdirs "
        "and the data are beside this report."
    )
    doc.section("Claims")
    doc.claims([report.Claim(**c) for c in results["claims"]], RULES)
    doc.section("Perplexity before and after continued pretraining")
    before, after = results["perplexity"]["before"], results["perplexity"]["after"]
    doc.table(
        ("source", "before", "after"),
        [(n, f"{before[n]:.3f}", f"{after[n]:.3f}") for n in after],
        align="lrr",
    )
    doc.section("Accuracy after finetuning (%), with the paper's Table 5 (7B top-token)")
    rows = []
    for b in e.benchmarks:
        for key in results["finetuned"]["meditron"][b]:
            m = results["finetuned"]["meditron"][b][key]
            base = results["finetuned"]["baseline"][b][key]
            rows.append(
                (
                    b,
                    key,
                    f"{100 * m['accuracy']['mean']:.1f}",
                    f"{100 * base['accuracy']['mean']:.1f}",
                    f"{100 * results['chance'][b]:.1f}",
                    f"{m['parse_failures']['total']} / {base['parse_failures']['total']}",
                    f"{PAPER_TABLE_5['MEDITRON-7B'][b]:.1f} / {PAPER_TABLE_5['Llama-2-7B'][b]:.1f}",
                )
            )
    doc.table(
        (
            "benchmark",
            "mode/parser",
            "MEDITRON",
            "baseline",
            "chance",
            "parse failures",
            "paper MEDITRON-7B / Llama-2-7B",
        ),
        rows,
        align="llrrrrr",
    )
    doc.section("Raw models, zero-shot likelihood (%), with the paper's Table 4 (7B, 3-shot)")
    doc.table(
        (
            "benchmark",
            "continued-pretrained",
            "pretrained only",
            "chance",
            "paper MEDITRON-7B / Llama-2-7B",
        ),
        [
            (
                b,
                *(
                    f"{100 * results['raw'][m][b]['likelihood/clean']['accuracy']['mean']:.1f}"
                    for m in ("meditron", "baseline")
                ),
                f"{100 * results['chance'][b]:.1f}",
                f"{PAPER_TABLE_4['MEDITRON-7B'][b]:.1f} / {PAPER_TABLE_4['Llama-2-7B'][b]:.1f}",
            )
            for b in e.benchmarks
        ],
        align="lrrrr",
    )
    doc.section("What this run does and does not show")
    doc.add(
        "It shows the pipeline's parts working together on a task where continued pretraining "
        "is the only way to the answers: perplexity moves as continued pretraining should, and "
        "the finetuned models are compared with chance and with the same pipeline without "
        "continued pretraining. It does not reproduce the paper's numbers: those are 7B/70B "
        "Llama-2 models on real benchmarks (46.7B tokens of continued pretraining); a byte-level "
        "model of about 3 million parameters on invented facts says nothing about their "
        "size. The raw-model comparison is zero-shot (Table 4 is 3-shot), CoT outputs of a tiny "
        "model are not reasoning, and the synthetic PubMedQA has no 'maybe' answers."
    )
    seconds = results["seconds"]
    doc.add(
        "Wall-clock of the invocation that wrote this report (s; a resumed finished stage or an "
        "evaluation read back from its stage folder counts about 0): "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        + "."
    )
    return report.write(workdir, doc, results)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    base = run_config.from_flag(FLAGS["config"])
    os.makedirs(FLAGS.workdir, exist_ok=True)
    results = run(base, FLAGS.workdir)
    write_report(FLAGS.workdir, results, base.experiment)
    for c in results["claims"]:
        print(f"{c['verdict']:>12}: {c['claim']}: {c['ours']}")
    print(f"wrote {os.path.join(FLAGS.workdir, report.REPORT_FILE)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
