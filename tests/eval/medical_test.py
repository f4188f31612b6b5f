"""The medical evaluation harness: loaders on files in the published formats, golden prompts in
MEDITRON's and lm-eval's formats, the parity parser against a table of verdicts produced by
MEDITRON's own ``evaluate.eval``, the clean parser, likelihood scoring against the model's
logits, self-consistency votes on scripted samples, and a tiny model end to end in every mode."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.data.tokenizers import ByteTokenizer
from jaxlab.eval import medical
from jaxlab.eval.medical import parsing, runner
from jaxlab.infer.test_time import Samples
from tests.eval import medical_fixtures
from tests.infer import tiny_models

MEDQA_SYSTEM = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to "
    "demonstrate your understanding of basic and clinical science, medical knowledge, and "
    "mechanisms underlying health, disease, patient care, and modes of therapy. Show your "
    "ability to apply the knowledge essential for medical practice. For the following "
    "multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines."
)
MEDMCQA_SYSTEM = (
    "You are a medical doctor answering realworld medical entrance exam questions. Based on your "
    "understanding of basic and clinical science, medical knowledge, and mechanisms underlying "
    "health, disease, patient care, and modes of therapy, answer the following multiple-choice "
    "question. Select one correct answer from A to D. Base your answer on the current and "
    "standard practices referenced in medical guidelines."
)
PUBMEDQA_SYSTEM = (
    "As an expert doctor in clinical science and medical knowledge, can you tell me if the "
    "following statement is correct? Answer yes, no, or maybe."
)
MEDQA_BLOCK = (
    "Question: A 30-year-old man has a fever. Which drug is best?\n\nOptions:\n"
    "A. drug a0\nB. drug b0\nC. drug c0\nD. drug d0\nE. drug e0"
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return medical_fixtures.write_all(str(tmp_path_factory.mktemp("medical")))


@pytest.fixture(scope="module")
def data(dirs):
    return {b: (medical.load(b, d, "test"), medical.load(b, d, "train")) for b, d in dirs.items()}


# ------------------------------------------------------------------------------------------
# Loaders.


def test_loaders_read_each_published_format(dirs, data):
    medqa = data["medqa"][0]
    assert len(medqa) == 4 and [q.answer for q in medqa] == ["A", "B", "C", "D"]
    assert medqa[1].options == ("drug a1", "drug b1", "drug c1", "drug d1", "drug e1")
    assert [len(q.options) for q in data["medqa4"][0]] == [4] * 4
    assert data["medqa4"][0][3].answer == "D"
    mcqa = data["medmcqa"][0]  # dev.json; cop is 1-based in the release
    assert [q.answer for q in mcqa] == ["A", "B", "C", "D"]
    assert mcqa[2].explanation == "Because of anatomy 2"
    pub = data["pubmedqa"][0]
    assert [q.answer for q in pub] == ["yes", "no", "maybe", "yes"]
    assert pub[0].context == "Background 0.\nResults 0." and pub[0].labels == ("yes", "no", "maybe")
    mmlu_test, mmlu_train = data["mmlu_medical"]
    assert [q.subject for q in mmlu_test[::2]] == list(medical.MMLU_MEDICAL_SUBJECTS)
    assert mmlu_test[0].question == "anatomy question 0, with a comma"  # CSV quoting kept
    # MEDITRON's demonstration pool: the dev rows of 11 subjects, chemistry included, its order
    assert "/dev/" in mmlu_train[0].id and len(mmlu_train) == 22
    assert [q.subject for q in mmlu_train[::2]] == list(medical.MMLU_FEWSHOT_POOL)
    assert medical.MMLU_FEWSHOT_POOL[8::2] == ("high_school_chemistry", "college_chemistry")


def test_loaders_accept_the_bigbio_and_hf_variants(tmp_path):
    row = {
        "question": "q",
        "answer": "two",
        "options": [
            {"key": k, "value": v}
            for k, v in zip("ABCDE", ["one", "two", "3", "4", "5"], strict=True)
        ],
    }
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    assert medical.load("medqa", str(tmp_path))[0].answer == "B"
    (tmp_path / "dev.json").write_text(
        json.dumps({"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0})
    )
    assert medical.load("medmcqa", str(tmp_path), cop_base=0)[0].answer == "A"
    with pytest.raises(ValueError, match=r"cop=0 is not a labelled answer \(1..4"):
        medical.load("medmcqa", str(tmp_path))


@pytest.mark.parametrize(
    "benchmark, file, content, message",
    [
        (
            "medqa",
            "test.jsonl",
            {"question": "q", "answer": "x", "options": {"A": "y"}},
            "expected 5 options",
        ),
        (
            "medqa4",
            "phrases_no_exclude_test.jsonl",
            {"question": "q", "answer": "x", "options": dict(zip("ABCD", "pqrs", strict=True))},
            "no option's text equals answer='x'",
        ),
        ("medmcqa", "dev.json", {"question": "q", "opa": "a"}, "has no 'opb' field"),
    ],
)
def test_loaders_name_the_bad_record(tmp_path, benchmark, file, content, message):
    (tmp_path / file).write_text(json.dumps(content) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        medical.load(benchmark, str(tmp_path))
    assert f"{file}:1" in str(info.value)


def test_loader_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="benchmark must be one of"):
        medical.load("medqa5", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="must hold 'test_set.json'"):
        medical.load("pubmedqa", str(tmp_path))


# ------------------------------------------------------------------------------------------
# Prompts.


def test_meditron_golden_prompts(data):
    medqa_test, medqa_train = data["medqa"]
    assert medical.prompt("medqa", medqa_test[0]) == (
        f"{MEDQA_SYSTEM}\n{MEDQA_BLOCK}\nThe answer is:\n"
    )
    demo = medqa_train[1]
    demo_block = MEDQA_BLOCK.replace("30-year", "31-year").replace("0\n", "1\n").replace("e0", "e1")
    assert medical.prompt("medqa", medqa_test[0], [demo]) == (
        f"{MEDQA_SYSTEM}\n{demo_block}\nThe answer is: B\n\n{MEDQA_BLOCK}\nThe answer is:"
    )
    assert medical.prompt("medqa4", data["medqa4"][0][0], cot=True) == (
        f"{MEDQA_SYSTEM}\nQuestion: A 30-year-old man has a fever. Which drug is best?\n\n"
        "Options:\nA. drug a0\nB. drug b0\nC. drug c0\nD. drug d0\nLet's think step by step.\n"
    )
    assert medical.prompt("medmcqa", data["medmcqa"][0][1], chat=True) == (
        f"<|im_start|>question\n{MEDMCQA_SYSTEM}\nQuestion: Which nerve supplies muscle 1?\n\n"
        "Options:\nA. Radial\nB. Ulnar\nC. Median\nD. Axillary\nThe answer is:\n<|im_end|>\n"
        "<|im_start|>answer\n"
    )
    assert medical.prompt("pubmedqa", data["pubmedqa"][0][2], cot=True) == (
        f"{PUBMEDQA_SYSTEM}\nBackground 2.\nResults 2.\nDoes treatment 2 reduce mortality?\n"
        "Let\u2019s think step by step.\n"
    )
    assert medical.prompt("mmlu_medical", data["mmlu_medical"][0][3]) == (
        f"{MEDMCQA_SYSTEM}\nQuestion: college_biology question 1, with a comma?\n\nOptions:\n"
        "A. w\nB. x\nC. y\nD. z\nThe answer is:\n"
    )


def test_lm_eval_golden_prompts(data):
    assert medical.prompt("medqa4", data["medqa4"][0][0], fmt="lm_eval") == (
        "Question: A 30-year-old man has a fever. Which drug is best\n"
        "A. drug a0\nB. drug b0\nC. drug c0\nD. drug d0\nAnswer:"
    )
    assert medical.prompt("medqa", data["medqa"][0][0], fmt="lm_eval").endswith(
        "D. drug d0\nE. drug e0\nAnswer:"
    )
    assert medical.prompt("medmcqa", data["medmcqa"][0][0], fmt="lm_eval") == (
        "Question: Which nerve supplies muscle 0?\nChoices:\n"
        "A. Radial\nB. Ulnar\nC. Median\nD. Axillary\nAnswer:"
    )
    pub_test, pub_train = data["pubmedqa"]
    assert medical.prompt("pubmedqa", pub_test[0], [pub_train[2]], fmt="lm_eval") == (
        "Abstract: Background 2.\nResults 2.\nQuestion: Does treatment 2 reduce mortality?\n"
        "Answer: maybe\n\n"
        "Abstract: Background 0.\nResults 0.\nQuestion: Does treatment 0 reduce mortality?\n"
        "Answer:"
    )
    mmlu_test, mmlu_train = data["mmlu_medical"]
    demo = medical.few_shot(mmlu_train, 1, 1234, subject="virology")
    assert demo[0].subject == "virology"
    assert medical.prompt("mmlu_medical", mmlu_test[10], demo, fmt="lm_eval") == (
        "The following are multiple choice questions (with answers) about virology.\n\n"
        f"{demo[0].question}\nA. w\nB. x\nC. y\nD. z\nAnswer: {demo[0].answer}\n\n"
        "virology question 0, with a comma\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )
    with pytest.raises(ValueError, match="cot=True needs fmt='meditron'"):
        medical.prompt("medqa", mmlu_test[0], fmt="lm_eval", cot=True)


def test_few_shot_selection_is_datasets_shuffle_by_seed():
    pool = [medical.Question(str(i), f"q{i}", ("a", "b"), "A") for i in range(6)]
    # datasets.Dataset.shuffle(seed).select(range(3)) of 6 rows: default_rng(seed).permutation
    expected = {1234: [4, 5, 0], 432: [1, 4, 2], 32: [5, 2, 0]}
    for seed, rows in expected.items():
        assert [q.id for q in medical.few_shot(pool, 3, seed)] == [str(r) for r in rows]
    assert medical.SEEDS == (1234, 432, 32)
    assert medical.few_shot(pool, 0, 1) == []
    with pytest.raises(ValueError, match="shots=7 exceeds the 6 training questions"):
        medical.few_shot(pool, 7, 1)


# ------------------------------------------------------------------------------------------
# Parsing.

# (output, gold, shots, cot, yes/no, extracted answer, correct): the verdicts of MEDITRON's
# evaluation/evaluate.py ``eval`` on these inputs (run on the original code).
PARITY_TABLE = [
    ("A", "A", 0, False, False, "a", True),
    (" b", "A", 0, False, False, "b", False),
    (" B. Aspirin", "B", 0, False, False, "b", True),
    ("because it is", "B", 0, False, False, "b", True),  # the first character decides
    ("The answer is C", "C", 0, False, False, None, False),
    ("(c) heparin", "C", 0, False, False, "c", True),
    ("", "A", 0, False, False, None, False),
    ("!!!", "A", 0, False, False, None, False),
    ("e", "A", 0, False, False, "e", False),
    ("f", "A", 0, False, False, None, False),
    ("1", "A", 0, False, False, None, False),
    ("\u00e9a", "A", 0, False, False, "a", True),
    (" A\n\nQuestion: next", "A", 3, False, False, "a", True),
    ("\n\nA", "A", 3, False, False, None, False),
    ("x\n## D\nmore", "D", 0, False, False, "d", True),
    ("yes", "yes", 0, False, True, "yes", True),
    ("Yes.", "yes", 0, False, True, "yes", True),
    ("yes, because", "yes", 0, False, True, None, False),
    ("yesyes", "yes", 0, False, True, "yes", True),
    ("nono", "no", 0, False, True, "no", True),
    ("yesno", "no", 0, False, True, "yes", False),
    ("noyes", "no", 0, False, True, "no", True),
    ("maybe", "maybe", 0, False, True, None, False),  # "maybe" is never an answer
    ("no", "maybe", 0, False, True, "no", False),
    ("No\n\nnext", "no", 2, False, True, "no", True),
    ("nonono", "no", 0, False, True, None, False),
    ("yesnoyes", "yes", 0, False, True, None, False),
    ("Step 1... so the answer is: B.", "B", 0, True, False, "b", True),
    ("the answer is A but the answer is d", "D", 0, True, False, "d", True),
    ("thinking without a conclusion", "A", 0, True, False, None, False),
    ("the answer is", "A", 0, True, False, None, False),
    ("reasoning. The answer is: yes", "Exp.\nThe answer is: yes ###", 0, True, True, "yes", True),
    (
        "reasoning. The answer is: maybe",
        "Exp.\nThe answer is: maybe ###",
        0,
        True,
        True,
        None,
        False,
    ),
    ("The answer is: no", "no ###", 0, True, True, None, False),  # a ### gold without "answer is:"
    ("answer is: b", "Exp. The answer is: C ###", 0, True, False, "b", False),
    ("answer is: c", "The answer is: the answer is: C ###", 0, True, False, "c", False),
]


@pytest.mark.parametrize("output, gold, shots, cot, yes_no, answer, correct", PARITY_TABLE)
def test_parity_parser_matches_meditrons_verdicts(
    output, gold, shots, cot, yes_no, answer, correct
):
    assert parsing.judge_parity(output, gold, yes_no=yes_no, shots=shots, cot=cot) == (
        answer,
        correct,
    )


def test_parity_never_scores_maybe_and_the_clean_parser_does():
    for output in ("maybe", "Maybe.", " maybe\n"):
        assert parsing.judge_parity(output, "maybe", yes_no=True) == (None, False)
        assert parsing.parse_clean(output, labels=("yes", "no", "maybe")) == "maybe"


MCQ = ("A", "B", "C", "D")
OPTIONS = ("Aspirin", "Aspirin and heparin", "Warfarin", "Clopidogrel")
CLEAN_TABLE = [
    # (output, labels, shots, cot, answer)
    (" B", MCQ, 0, False, "B"),
    (" b. Aspirin", MCQ, 0, False, "B"),
    ("(c)", MCQ, 0, False, "C"),
    ("because it is", MCQ, 0, False, None),  # MEDITRON: b
    ("a patient with fever", MCQ, 0, False, None),  # MEDITRON: a
    ("E", MCQ, 0, False, None),  # not one of this question's options
    ("Aspirin and heparin, since", MCQ, 0, False, "B"),  # the longest option text
    ("warfarin", MCQ, 0, False, "C"),
    (" A\n\nQuestion: next", MCQ, 3, False, "A"),
    ("\n\nA", MCQ, 3, False, "A"),  # leading blank lines end no paragraph (MEDITRON: fails)
    ("D###junk", MCQ, 0, False, "D"),
    ("so the answer is (b). Then again the answer is: D.", MCQ, 0, True, "D"),
    ("Answer: c", MCQ, 0, True, "C"),
    ("no conclusion", MCQ, 0, True, None),
    ("maybe", ("yes", "no", "maybe"), 0, False, "maybe"),
    ("Yes.", ("yes", "no", "maybe"), 0, False, "yes"),
    ("yesyes", ("yes", "no", "maybe"), 0, False, "yes"),
    ("yesno", ("yes", "no", "maybe"), 0, False, None),
    ("yesterday", ("yes", "no", "maybe"), 0, False, None),
    ("The answer is: maybe", ("yes", "no", "maybe"), 0, True, "maybe"),
]


@pytest.mark.parametrize("output, labels, shots, cot, answer", CLEAN_TABLE)
def test_clean_parser_table(output, labels, shots, cot, answer):
    options = OPTIONS if labels == MCQ else ()
    got = parsing.parse_clean(output, labels=labels, options=options, shots=shots, cot=cot)
    assert got == answer


# ------------------------------------------------------------------------------------------
# Models.


@pytest.fixture(scope="module")
def tiny():
    tokenizer = ByteTokenizer()
    config = tiny_models.llama(tokenizer.vocab_size)
    config = dataclasses.replace(config, max_seq_len=1024)
    return models.build(config, nnx.Rngs(5)), tokenizer


def test_likelihood_scores_equal_summed_logprobs_of_the_logits(tiny, data):
    model, tokenizer = tiny
    questions = data["pubmedqa"][0][:2] + data["medmcqa"][0][:1]
    contexts = ["Q: yes or no?\nA:", "ctx", "Pick one:\n"]
    labels = [q.labels for q in questions]
    got = runner.label_logprobs(model, tokenizer, contexts, labels, batch_size=4, add_bos=True)
    # the reference: every (context, label) row through the model once, log-softmax by hand
    rows, spans = [], []
    for context, names in zip(contexts, labels, strict=True):
        for name in names:
            cont = (" " if not context.endswith("\n") else "") + name
            rows.append([tokenizer.bos_id, *context.encode(), *cont.encode()])
            spans.append((1 + len(context.encode()), len(rows[-1])))
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids), np.float64)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    expected = [
        sum(logp[r, t - 1, rows[r][t]] for t in range(start, end))
        for r, (start, end) in enumerate(spans)
    ]
    assert [s.shape for s in got] == [(3,), (3,), (4,)]
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-5, atol=1e-5)


def _scripted_samples(texts):
    n = len(texts[0])
    return Samples(
        tokens=np.zeros((len(texts), n, 1), np.int32),
        texts=texts,
        answers=texts,  # extract=strip_stop leaves scripted texts unchanged
        logprobs=np.zeros((len(texts), n)),
        lengths=np.ones((len(texts), n), int),
        seconds=1.0,
        rows_per_call=n,
        rows_generated=n * len(texts),
        failures=0,
    )


def test_self_consistency_votes_on_scripted_samples(monkeypatch):
    questions = [
        medical.Question(str(i), "q", ("w", "x", "y", "z"), g) for i, g in enumerate("BCAD")
    ]
    texts = [
        ["the answer is b", "the answer is c", "the answer is b"],  # b wins 2-1
        ["the answer is a", "the answer is c", "garbled"],  # tie a/c: a first
        ["garbled", "garbled", "the answer is a"],  # parity: the failure's text wins the vote
        ["the answer is e", "no idea", "the answer is d"],  # clean: e is not an option here
    ]
    seen = {}

    def fake_draw(model, tokenizer, prompts, **kwargs):
        seen.update(kwargs)
        return _scripted_samples(texts)

    monkeypatch.setattr(runner, "draw_samples", fake_draw)
    parity = runner.EvalConfig("medmcqa", mode="sc_cot", parser="parity", sc_samples=3, seeds=(7,))
    records = runner.evaluate_seed(None, ByteTokenizer(), parity, questions, [], 7)
    assert [r["pred"] for r in records] == ["b", "a", None, "e"]
    assert [r["correct"] for r in records] == [True, False, False, False]
    assert seen["num_samples"] == 3 and seen["temperature"] == 0.8 and seen["seed"] == 7
    clean = runner.EvalConfig("medmcqa", mode="sc_cot", parser="clean", sc_samples=3)
    records = runner.evaluate_seed(None, ByteTokenizer(), clean, questions, [], 1)
    assert [r["pred"] for r in records] == ["B", "A", "A", "D"]
    assert [r["correct"] for r in records] == [True, False, True, True]
    assert records[3]["branches"] == [None, None, "D"]


def test_parity_parses_mmlu_medical_as_cot_in_every_mode():
    q = medical.Question("q", "q", ("w", "x", "y", "z"), "C")
    text = "so the answer is c"
    for mode in ("top_token", "cot"):
        mmlu = runner.EvalConfig("mmlu_medical", mode=mode)
        assert runner._judge(mmlu, q, text) == ("c", True)
    medmcqa = runner.EvalConfig("medmcqa", mode="top_token")
    assert runner._judge(medmcqa, q, text) == (None, False)  # "s": the first character
    assert runner._judge(runner.EvalConfig("medmcqa", mode="cot"), q, text) == ("c", True)


def test_top_token_budget_peeks_at_the_gold_only_in_parity():
    tokenizer = ByteTokenizer()
    qs = [
        medical.Question(str(i), "q", medical.data.PUBMEDQA_OPTIONS, g)
        for i, g in enumerate(["maybe", "no", "yes", "no"])
    ]
    parity = runner.EvalConfig("pubmedqa", parser="parity", batch_size=2)
    assert runner._budgets(parity, tokenizer, qs) == [5, 3]  # "maybe", then "yes" lead batches
    few = runner.EvalConfig("pubmedqa", parser="parity", batch_size=2, shots=1)
    assert runner._budgets(few, tokenizer, qs) == [13, 11]
    clean = runner.EvalConfig("pubmedqa", parser="clean", batch_size=2)
    assert runner._budgets(clean, tokenizer, qs) == [6, 6]  # " maybe"


def test_eval_config_rejects_bad_combinations():
    with pytest.raises(ValueError, match="EvalConfig.mode must be one of"):
        runner.EvalConfig("medqa", mode="greedy")
    with pytest.raises(ValueError, match="mode='cot' needs fmt='meditron'"):
        runner.EvalConfig("medqa", mode="cot", fmt="lm_eval")
    with pytest.raises(ValueError, match="mode='sc_cot' is zero-shot"):
        runner.EvalConfig("medqa", mode="sc_cot", shots=3)


def test_tiny_model_end_to_end_in_every_mode(tiny, data, tmp_path):
    model, tokenizer = tiny
    test, train = data["medmcqa"]
    runs = [
        runner.EvalConfig(
            "medmcqa",
            mode="top_token",
            fmt="lm_eval",
            parser="parity",
            shots=1,
            seeds=(1234, 432),
            batch_size=4,
        ),
        runner.EvalConfig(
            "medmcqa", mode="likelihood", fmt="lm_eval", shots=1, seeds=(1234, 432), batch_size=8
        ),
        runner.EvalConfig(
            "medmcqa", mode="cot", parser="clean", cot_max_new_tokens=6, batch_size=4
        ),
        runner.EvalConfig(
            "medmcqa",
            mode="sc_cot",
            parser="parity",
            cot_max_new_tokens=6,
            sc_samples=2,
            seeds=(1, 2),
            batch_size=4,
        ),
    ]
    for config in runs:
        result = runner.evaluate(model, tokenizer, config, test, train)
        path = runner.write_json(str(tmp_path / f"{config.mode}.json"), result)
        loaded = json.loads(open(path).read())
        seeds = [str(s) for s in loaded["seeds"]]
        assert loaded["seeds"] == list(config.effective_seeds)
        per_seed = loaded["accuracy"]["per_seed"]
        failures = loaded["parse_failures"]["per_seed"]
        for seed, acc, failed in zip(seeds, per_seed, failures, strict=True):
            records = loaded["predictions"][seed]
            assert len(records) == len(test)
            assert acc == sum(r["correct"] for r in records) / len(test)
            assert failed == sum(r["failed"] for r in records)
            if config.mode == "likelihood":
                assert all(r["pred"] == "ABCD"[int(np.argmax(r["scores"]))] for r in records)
        expected_std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
        assert loaded["accuracy"]["std"] == pytest.approx(expected_std)
        assert loaded["accuracy"]["mean"] == pytest.approx(np.mean(per_seed))
        assert loaded["parse_failures"]["total"] == sum(failures)
        assert loaded["questions_per_second"] > 0
        assert os.path.getsize(path) > 0
    # MMLU: accuracy per subject, by seed
    mmlu_test, mmlu_train = data["mmlu_medical"]
    config = runner.EvalConfig(
        "mmlu_medical", mode="likelihood", fmt="lm_eval", shots=1, seeds=(1, 2), batch_size=16
    )
    result_mmlu = runner.evaluate(model, tokenizer, config, mmlu_test, mmlu_train)
    subjects = result_mmlu["per_subject"]
    assert list(subjects) == list(medical.MMLU_MEDICAL_SUBJECTS)
    for k, seed in enumerate(("1", "2")):
        records = result_mmlu["predictions"][seed]
        for s, subject in enumerate(subjects):
            expected = np.mean([r["correct"] for r in records[2 * s : 2 * s + 2]])
            assert subjects[subject]["per_seed"][k] == expected
    # the same seed gives the same result (greedy and seeded sampling are deterministic)
    again = runner.evaluate(model, tokenizer, runs[3], test, train)
    assert again["predictions"] == result["predictions"]


def test_outputs_are_cut_at_either_of_meditrons_stop_strings():
    assert parsing.strip_stop("the answer is b$$$ then c") == "the answer is b"
    assert parsing.strip_stop("x $$$ y ### z") == "x "
    assert parsing.strip_stop("plain") == "plain"


def test_evaluate_many_generates_once_per_output_shaping_config(tiny, data, monkeypatch):
    model, tokenizer = tiny
    test, train = data["medmcqa"]
    cot = dict(mode="cot", cot_max_new_tokens=6, batch_size=4)
    sc = dict(mode="sc_cot", cot_max_new_tokens=6, sc_samples=2, seeds=(1, 2), batch_size=4)
    configs = [
        runner.EvalConfig("medmcqa", parser="parity", **cot),
        runner.EvalConfig("medmcqa", parser="clean", **cot),
        runner.EvalConfig("medmcqa", parser="parity", **sc),
        runner.EvalConfig("medmcqa", parser="clean", **sc),
        runner.EvalConfig("medmcqa", mode="top_token", parser="parity", batch_size=4),
        runner.EvalConfig("medmcqa", mode="top_token", parser="clean", batch_size=4),
    ]
    alone = [runner.evaluate(model, tokenizer, c, test, train) for c in configs]
    calls = []
    outputs = runner._outputs
    monkeypatch.setattr(runner, "_outputs", lambda *a: calls.append(a[2].mode) or outputs(*a))
    shared = runner.evaluate_many(model, tokenizer, configs, test, train)
    # cot once, sc_cot once per seed; top-token's budget depends on the parser: twice
    assert calls == ["cot", "sc_cot", "sc_cot", "top_token", "top_token"]
    assert [r["reused_outputs"] for r in shared] == [False, True, False, True, False, False]
    for one, many in zip(alone, shared, strict=True):
        assert many["predictions"] == one["predictions"]
        assert many["accuracy"] == one["accuracy"]
        assert many["seconds"] > 0
