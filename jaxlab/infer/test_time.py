"""Test-time scaling: many sampled completions per problem, scored by coverage, majority vote or
best-of-n, against the wall-clock seconds they cost.

* :func:`draw_samples` draws ``n`` completions for each problem (one prefill per batch of
  problems, :func:`jaxlab.infer.generate` with ``num_samples``), extracts an answer from each with
  a task-supplied function (``None`` when it finds none: a failure, counted, never a guess), and
  times the generation (compilation excluded, device work waited for).
* :func:`pass_at_k` is the unbiased coverage estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al.
  2021) in a product form that stays exact in floating point for large ``n``;
  :func:`coverage` averages it over problems.
* :func:`majority_at_k` votes among the first ``k`` samples' answers; ties go to the tied answer
  that appears first among those samples (no peeking at the reference), and a problem with no
  extracted answer counts as wrong. :func:`best_of_k` keeps the answer of the best-scored sample.
* :func:`seconds_axis` turns sample counts into seconds per problem; :func:`crossover` finds where
  one model's curve reaches another's on that axis; :func:`bootstrap_interval` gives confidence
  intervals over problems.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxlab.infer.decode import generate
from jaxlab.infer.sampling import SamplingConfig


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of ``k`` samples is correct, from ``n``
    samples of which ``c`` were: ``1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``.

    Args:
      n: samples drawn, >= 1.
      c: correct samples, ``0 <= c <= n``.
      k: budget, ``1 <= k <= n``.
    """
    n = _check_count("pass_at_k: n", n, 1)
    c = _check_count("pass_at_k: c", c, 0)
    k = _check_count("pass_at_k: k", k, 1)
    if c > n or k > n:
        raise ValueError(f"pass_at_k: need c <= n and k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _correctness(answers, references) -> np.ndarray:
    if len(answers) != len(references):
        raise ValueError(
            f"answers ({len(answers)} problems) and references ({len(references)}) must have "
            "one entry per problem"
        )
    widths = {len(row) for row in answers}
    if len(widths) != 1:
        raise ValueError(f"every problem needs the same number of samples, got {sorted(widths)}")
    return np.array(
        [
            [a is not None and a == ref for a in row]
            for row, ref in zip(answers, references, strict=True)
        ],
        dtype=bool,
    ).reshape(len(answers), -1)


def coverage(answers: Sequence[Sequence[Any]], references: Sequence[Any], k: int) -> np.ndarray:
    """Per-problem :func:`pass_at_k` at ``k`` (float64 ``[problems]``) from all ``n`` samples'
    extracted answers (``None``: no answer, never correct)."""
    correct = _correctness(answers, references)
    n = correct.shape[1]
    return np.array([pass_at_k(n, int(c), k) for c in correct.sum(axis=1)])


def majority_vote(row: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-``None`` answer of ``row``; among tied answers the one that appears
    first in ``row``; ``None`` when ``row`` has no answer."""
    counts = Counter(a for a in row if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in row if a is not None and counts[a] == top)


def majority_at_k(
    answers: Sequence[Sequence[Hashable | None]], references: Sequence[Any], k: int
) -> np.ndarray:
    """Whether the :func:`majority_vote` of each problem's first ``k`` samples equals its
    reference (bool ``[problems]``)."""
    correct = _correctness(answers, references)  # validates the shapes
    k = _check_count("majority_at_k: k", k, 1)
    if k > correct.shape[1]:
        raise ValueError(f"majority_at_k: k={k} exceeds the {correct.shape[1]} samples drawn")
    votes = [majority_vote(row[:k]) for row in answers]
    return np.array(
        [v is not None and v == ref for v, ref in zip(votes, references, strict=True)], bool
    )


def best_of_k(
    answers: Sequence[Sequence[Any]],
    scores: np.ndarray,
    references: Sequence[Any],
    k: int,
) -> np.ndarray:
    """Whether the answer of the highest-scored sample among each problem's first ``k`` (samples
    without an answer skipped; ties to the earlier sample) equals the reference (bool
    ``[problems]``). ``scores`` ``[problems, n]``: e.g. the completion's log-probability, or a
    verifier's score."""
    correct = _correctness(answers, references)
    scores = np.asarray(scores, np.float64)
    if scores.shape != correct.shape:
        raise ValueError(
            f"best_of_k: scores must be [problems, n]={correct.shape}, got {scores.shape}"
        )
    k = _check_count("best_of_k: k", k, 1)
    if k > correct.shape[1]:
        raise ValueError(f"best_of_k: k={k} exceeds the {correct.shape[1]} samples drawn")
    out = np.zeros(len(answers), bool)
    for p, row in enumerate(answers):
        candidates = [i for i in range(k) if row[i] is not None]
        if candidates:
            best = max(candidates, key=lambda i: (scores[p, i], -i))
            out[p] = bool(correct[p, best])
    return out


def bootstrap_interval(
    values: np.ndarray, *, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem ``values`` (problems resampled
    with replacement)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"bootstrap_interval: values must be a non-empty 1-D array, got {values.shape}"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_interval: level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def seconds_axis(ks: Sequence[int], seconds_per_sample: float) -> np.ndarray:
    """Seconds per problem that ``k`` samples cost, for each ``k`` in ``ks``."""
    if not seconds_per_sample > 0:
        raise ValueError(
            f"seconds_axis: seconds_per_sample must be > 0, got {seconds_per_sample!r}"
        )
    return np.asarray(ks, np.float64) * float(seconds_per_sample)


def crossover(
    seconds_a: np.ndarray, values_a: np.ndarray, seconds_b: np.ndarray, values_b: np.ndarray
) -> float | None:
    """The first time at which curve ``b`` reaches curve ``a`` (``b >= a``), both linearly
    interpolated, on the seconds both curves cover; ``None`` if it never does there.

    Returns the start of the common range when ``b`` is already ahead there.
    """
    curves = []
    for name, (x, y) in {"a": (seconds_a, values_a), "b": (seconds_b, values_b)}.items():
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape or x.ndim != 1 or x.size == 0 or np.any(np.diff(x) <= 0):
            raise ValueError(
                f"crossover: seconds_{name} must be increasing and match values_{name} in shape, "
                f"got {x.shape} and {y.shape}"
            )
        curves.append((x, y))
    (xa, ya), (xb, yb) = curves
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if lo > hi:
        return None
    grid = np.unique(np.concatenate([xa, xb, [lo, hi]]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    gap = np.interp(grid, xb, yb) - np.interp(grid, xa, ya)
    if gap[0] >= 0:
        return float(grid[0])
    for i in range(1, grid.size):
        if gap[i] >= 0:  # the gap is linear between grid points: solve for its zero
            return float(
                grid[i - 1] + (grid[i] - grid[i - 1]) * -gap[i - 1] / (gap[i] - gap[i - 1])
            )
    return None


class Samples(NamedTuple):
    """What :func:`draw_samples` returns.

    Attributes:
      tokens: int32 ``[problems, n, max_new_tokens]`` generated ids (padding after ``lengths``).
      texts: ``[problems][n]`` decoded completions.
      answers: ``[problems][n]`` extracted answers, ``None`` where extraction failed.
      logprobs: float64 ``[problems, n]`` sum of each completion's token log-probabilities (the
        model's raw softmax), a ready score for :func:`best_of_k`.
      lengths: int ``[problems, n]`` generated tokens per completion.
      seconds: wall-clock seconds of the timed generation calls (compilation excluded).
      rows_per_call: completions decoded together per call (problems per call x n).
      rows_generated: completions decoded in the timed calls, the padding rows of a last,
        partly filled call included (they cost the same time as real ones).
      failures: how many completions had no extractable answer.
    """

    tokens: np.ndarray
    texts: list[list[str]]
    answers: list[list[Any]]
    logprobs: np.ndarray
    lengths: np.ndarray
    seconds: float
    rows_per_call: int
    rows_generated: int
    failures: int

    @property
    def seconds_per_sample(self) -> float:
        """Seconds per decoded completion at ``rows_per_call`` rows per call."""
        return self.seconds / self.rows_generated


def draw_samples(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    extract: Callable[[str], Any],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    problems_per_call: int = 1,
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    add_bos: bool = False,
) -> Samples:
    """Draws ``num_samples`` completions for every prompt and extracts their answers.

    Prompts are tokenized (without end-of-sequence), right-padded to the longest, and generated in
    calls of ``problems_per_call`` problems (the last call padded with repeats of its first problem,
    dropped afterwards, so every call has one shape and compiles once). The first call runs once
    untimed to compile; ``seconds`` sums the timed calls, each waited for on the device.

    ``add_bos`` prepends the tokenizer's beginning-of-sequence id, as training data may have.
    Call ``c`` draws with key ``fold_in(PRNGKey(seed), c)``, so results are reproducible by seed
    and do not depend on timing.
    """
    num_samples = _check_count("draw_samples: num_samples", num_samples, 1)
    problems_per_call = _check_count("draw_samples: problems_per_call", problems_per_call, 1)
    if not prompts:
        raise ValueError("draw_samples: prompts must be a non-empty sequence of strings")
    if not temperature > 0:
        raise ValueError(f"draw_samples: temperature must be > 0 for sampling, got {temperature!r}")
    encoded = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("draw_samples: every prompt must encode to at least one token")
    width = max(len(e) for e in encoded)
    ids = np.zeros((len(encoded), width), np.int32)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = e
    lengths = np.array([len(e) for e in encoded], np.int32)
    sampling = SamplingConfig(temperature=float(temperature), top_k=top_k)
    key = jax.random.PRNGKey(seed)

    def call(index: int, rows: np.ndarray):
        out = generate(
            model,
            ids[rows],
            lengths[rows],
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            rng=jax.random.fold_in(key, index),
            stop_tokens=stop_tokens,
            num_samples=num_samples,
            stop_strings=stop_strings,
            tokenizer=tokenizer if stop_strings else None,
        )
        return jax.block_until_ready(out)

    calls = []
    for c, start in enumerate(range(0, len(prompts), problems_per_call)):
        rows = np.arange(start, min(start + problems_per_call, len(prompts)))
        real = rows.size
        rows = np.concatenate([rows, np.full(problems_per_call - real, rows[0])])
        calls.append((c, rows, real))
    call(*calls[0][:2])  # compile (same shapes as every call)
    seconds, ids_out, texts, answers, logprobs, counts = 0.0, [], [], [], [], []
    for c, rows, real in calls:
        begin = time.perf_counter()
        out = call(c, rows)
        seconds += time.perf_counter() - begin
        tokens = np.asarray(out.tokens).reshape(problems_per_call, num_samples, -1)[:real]
        gen_lengths = np.asarray(out.lengths).reshape(problems_per_call, num_samples)[:real]
        lp = np.asarray(out.logprobs, np.float64).reshape(problems_per_call, num_samples, -1)
        for p in range(real):
            row_texts = [
                tokenizer.decode([int(t) for t in tokens[p, s, : gen_lengths[p, s]]])
                for s in range(num_samples)
            ]
            texts.append(row_texts)
            answers.append([extract(t) for t in row_texts])
        ids_out.append(tokens)
        logprobs.append(lp[:real].sum(axis=-1))
        counts.append(gen_lengths)
    failures = sum(a is None for row in answers for a in row)
    return Samples(
        np.concatenate(ids_out),
        texts,
        answers,
        np.concatenate(logprobs),
        np.concatenate(counts),
        seconds,
        problems_per_call * num_samples,
        len(calls) * problems_per_call * num_samples,
        failures,
    )
