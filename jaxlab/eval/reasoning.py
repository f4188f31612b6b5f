"""Greedy exact-match on the arithmetic task of :mod:`jaxlab.data.reasoning`, by difficulty.

A model continues ``[bos] prompt`` (the prompt part of the training examples) with
:func:`jaxlab.infer.generate` until eos; the decoded continuation is scored with
:func:`jaxlab.data.reasoning.extract_answer`. An output without a marker or a number after it is
*malformed*: counted as wrong and also reported on its own, never read as a guessed answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxlab.data import prompts
from jaxlab.data.reasoning import Problem, extract_answer
from jaxlab.data.tokenizers import Tokenizer
from jaxlab.infer import generate


def greedy_outputs(
    model,
    tokenizer: Tokenizer,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """The greedy continuation of every problem's prompt, decoded (eos and what follows cut)."""
    if batch_size < 1:
        raise ValueError(f"greedy_outputs: batch_size must be >= 1, got {batch_size}")
    encoded = [prompts.encode_prompt(p.prompt, tokenizer, template="none") for p in problems]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    texts = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - rows)  # one compiled shape for every chunk
        ids = np.full((batch_size, width), pad, np.int32)
        for row, prompt in enumerate(chunk):
            ids[row, : len(prompt)] = prompt
        out = generate(
            model,
            ids,
            [len(p) for p in chunk],
            max_new_tokens=max_new_tokens,
            stop_tokens=(tokenizer.eos_id,),
            pad_id=pad,
        )
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        texts += [tokenizer.decode(tokens[r, : lengths[r]]) for r in range(rows)]
    return texts


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
