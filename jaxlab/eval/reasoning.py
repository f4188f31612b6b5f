"""Greedy exact-match on the arithmetic task of :mod:`jaxlab.data.reasoning`, by difficulty.

A model continues ``[bos] prompt`` (the prompt part of the training examples) with
:func:`jaxlab.infer.generate_in_batches` until eos; the decoded continuation is scored with
:func:`jaxlab.data.reasoning.extract_answer`. An output without a marker or a number after it is
*malformed*: counted as wrong and also reported on its own, never read as a guessed answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxlab.data import prompts
from jaxlab.data.reasoning import Problem, extract_answer
from jaxlab.data.tokenizers import Tokenizer
from jaxlab.infer import generate_in_batches


def greedy_outputs(
    model,
    tokenizer: Tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """The greedy continuation of every problem's prompt, decoded (eos and what follows cut)."""
    encoded = [prompts.encode_prompt(p.prompt, tokenizer, template="none") for p in problems]
    outputs = generate_in_batches(
        model,
        encoded,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
    )
    return [tokenizer.decode(tokens) for tokens in outputs]


def exact_match(problems: Sequence[Problem], outputs: Sequence[str]) -> dict[int, dict[str, int]]:
    """``{difficulty: {"total", "correct", "malformed"}}`` of ``outputs`` (one per problem)."""
    if len(problems) != len(outputs):
        raise ValueError(
            f"exact_match: {len(problems)} problems but {len(outputs)} outputs; expected one "
            "output per problem"
        )
    counts: dict[int, dict[str, int]] = {}
    for problem, text in zip(problems, outputs, strict=True):
        row = counts.setdefault(problem.steps, {"total": 0, "correct": 0, "malformed": 0})
        answer = extract_answer(text)
        row["total"] += 1
        row["correct"] += int(answer is not None and answer == problem.value)
        row["malformed"] += int(answer is None)
    return dict(sorted(counts.items()))
