"""Prompts for the medical benchmarks in two formats, and few-shot selection by seed.

``"meditron"``: MEDITRON's evaluation prompt (epfLLM/meditron ``evaluation/benchmarks.py``,
``inference.py``, ``instructions.json``). A multiple-choice question block is
``Question: {q}`` (``?`` appended unless it ends in ``?`` or ``.``), a blank line, ``Options:``
and ``A. {option}`` lines; PubMedQA's block is its contexts joined by newlines, a newline and the
question. The prompt is ``{system}\\n{[demos\\n\\n]block}\\n{cue}\\n``, where each demonstration
is ``{block}\\nThe answer is: {gold}`` and demonstrations are joined by blank lines; with
demonstrations the final newline is dropped. The cue is ``The answer is:`` or, for
chain-of-thought, ``Let's think step by step.`` (PubMedQA's has a typographic apostrophe). A
finetuned model's prompt is wrapped in ChatML:
``<|im_start|>question\\n{prompt}<|im_end|>\\n<|im_start|>answer\\n``. MMLU uses MedMCQA's
instruction, MedQA-4 MedQA's (with its "from A to E", as the original).

``"lm_eval"``: lm-evaluation-harness's task prompts: MedQA ``Question: {q}\\nA. ..\\nAnswer:``
(its medqa_4options, extended to 5 options), MedMCQA ``Question: {q}\\nChoices:\\nA. ..\\nAnswer:``,
PubMedQA ``Abstract: {contexts}\\nQuestion: {q}\\nAnswer:``, MMLU
``The following are multiple choice questions (with answers) about {subject}.\\n\\n`` then
``{q.strip()}\\nA. ..\\nAnswer:``; demonstrations are ``{prompt} {gold}`` joined by blank lines;
answers are scored as the continuation ``" {label}"``.

Few-shot selection (:func:`few_shot`) reproduces ``datasets.Dataset.shuffle(seed).select(range(k))``
on the training rows in file order: the first ``k`` of ``numpy.random.default_rng(seed)
.permutation(n)``. The paper's seeds are ``SEEDS``. For MMLU in lm-eval format the pool is the
question's own subject (lm-eval's per-subject tasks); MEDITRON pools every subject's dev rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlab.eval.medical.data import Question

FORMATS = ("meditron", "lm_eval")
SEEDS = (1234, 432, 32)
COT_CUE = "Let's think step by step."
ANSWER_CUE = "The answer is:"
_MEDQA = (
    "You are a medical doctor taking the US Medical Licensing Examination. You need to "
    "demonstrate your understanding of basic and clinical science, medical knowledge, and "
    "mechanisms underlying health, disease, patient care, and modes of therapy. Show your "
    "ability to apply the knowledge essential for medical practice. For the following "
    "multiple-choice question, select one correct answer from A to E. Base your answer on the "
    "current and standard practices referenced in medical guidelines."
)
_MEDMCQA = (  # "realworld" is the original's spelling
    "You are a medical doctor answering realworld medical entrance exam questions. Based on "
    "your understanding of basic and clinical science, medical knowledge, and mechanisms "
    "underlying health, disease, patient care, and modes of therapy, answer the following "
    "multiple-choice question. Select one correct answer from A to D. Base your answer on the "
    "current and standard practices referenced in medical guidelines."
)
_PUBMEDQA = (
    "As an expert doctor in clinical science and medical knowledge, can you tell me if the "
    "following statement is correct? Answer yes, no, or maybe."
)
# benchmark -> (system instruction, chain-of-thought cue)
INSTRUCTIONS = {
    "medqa": (_MEDQA, COT_CUE),
    "medqa4": (_MEDQA, COT_CUE),
    "medmcqa": (_MEDMCQA, COT_CUE),
    "mmlu_medical": (_MEDMCQA, COT_CUE),
    "pubmedqa": (_PUBMEDQA, "Let\u2019s think step by step."),
}
CHATML = "<|im_start|>question\n{prompt}<|im_end|>\n<|im_start|>answer\n"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def _check_benchmark(benchmark: str) -> None:
    if benchmark not in INSTRUCTIONS:
        raise ValueError(f"benchmark must be one of {tuple(INSTRUCTIONS)}, got {benchmark!r}")


def few_shot(
    pool: Sequence[Question], shots: int, seed: int, *, subject: str | None = None
) -> list[Question]:
    """``shots`` demonstrations from ``pool``: ``Dataset.shuffle(seed).select(range(shots))``
    (restricted to ``subject`` when given)."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if subject is not None:
        pool = [q for q in pool if q.subject == subject]
    if shots > len(pool):
        raise ValueError(
            f"shots={shots} exceeds the {len(pool)} training questions"
            + (f" of subject {subject!r}" if subject else "")
        )
    if shots == 0:
        return []
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[int(i)] for i in order[:shots]]


def meditron_block(q: Question) -> str:
    """MEDITRON's question block (``format_mcq``, or PubMedQA's contexts then question)."""
    if q.is_yes_no:
        return f"{q.context}\n{q.question}"
    question = q.question
    if not question.endswith(("?", ".")):
        question += "?"
    options = "\n".join(f"{label}. {text}" for label, text in zip(q.labels, q.options, strict=True))
    return f"Question: {question}\n\nOptions:\n{options}"


def lm_eval_block(benchmark: str, q: Question) -> str:
    """lm-evaluation-harness's ``doc_to_text`` for ``benchmark``."""
    _check_benchmark(benchmark)
    options = "".join(f"{label}. {text}\n" for label, text in zip(q.labels, q.options, strict=True))
    if benchmark == "pubmedqa":
        return f"Abstract: {q.context}\nQuestion: {q.question}\nAnswer:"
    if benchmark == "medmcqa":
        return f"Question: {q.question}\nChoices:\n{options}Answer:"
    if benchmark == "mmlu_medical":
        return f"{q.question.strip()}\n{options}Answer:"
    return f"Question: {q.question}\n{options}Answer:"


def prompt(
    benchmark: str,
    q: Question,
    demos: Sequence[Question] = (),
    *,
    fmt: str = "meditron",
    cot: bool = False,
    chat: bool = False,
) -> str:
    """The text a model continues to answer ``q`` (module docstring).

    Args:
      benchmark: one of the benchmarks (picks the instruction and the lm-eval template).
      q: the question.
      demos: few-shot demonstrations (see :func:`few_shot`).
      fmt: ``"meditron"`` or ``"lm_eval"``.
      cot: chain-of-thought cue (``"meditron"`` only).
      chat: wrap in MEDITRON's ChatML (finetuned models).
    """
    _check_format(fmt)
    _check_benchmark(benchmark)
    if fmt == "meditron":
        system, cot_cue = INSTRUCTIONS[benchmark]
        shots = [f"{meditron_block(d)}\n{ANSWER_CUE} {d.answer}" for d in demos]
        body = "\n\n".join([*shots, meditron_block(q)])
        text = f"{system}\n{body}\n{cot_cue if cot else ANSWER_CUE}\n"
        if demos:  # inference.py format_prompt: prompt[:-1] for few-shot runs
            text = text[:-1]
    else:
        if cot:
            raise ValueError("cot=True needs fmt='meditron' (lm-eval's tasks have no CoT cue)")
        shots = [f"{lm_eval_block(benchmark, d)} {d.answer}" for d in demos]
        text = "\n\n".join([*shots, lm_eval_block(benchmark, q)])
        if benchmark == "mmlu_medical":
            subject = (q.subject or "").replace("_", " ")
            text = (
                f"The following are multiple choice questions (with answers) about {subject}."
                f"\n\n{text}"
            )
    return CHATML.format(prompt=text) if chat else text


def continuation(context: str, label: str) -> str:
    """The text whose likelihood scores answer ``label`` after ``context``: ``" " + label``
    (lm-eval's target delimiter), or ``label`` alone after a newline or space."""
    return label if context.endswith(("\n", " ")) else f" {label}"
