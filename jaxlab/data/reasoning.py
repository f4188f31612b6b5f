"""A seeded multi-step arithmetic task with a chain of thought and an answer marker (offline).

A problem of difficulty ``k`` defines ``a`` as a constant and then ``k`` more variables, each the
previous one combined with an earlier variable or a constant, all modulo ``modulus``; it asks for
the last one, so the answer depends on every step::

    prompt:  a=37;b=a+12;c=b-a;c?
    answer:  b=a+12=37+12=49;c=b-a=49-37=12;####12

The answer (what the model is trained on, and what it generates) is the chain of thought: one
line per step, which restates the step, substitutes the values and gives the result, then the
answer marker ``####`` and the final value. Values are written zero-padded to the width of
``modulus - 1`` (``07`` for modulus 100), so every number of a task has the same digit count.

Splits. ``train`` problems have difficulties ``train_steps`` (a range), ``test`` problems
``test_steps``; difficulties take turns (problem ``i`` has the ``i % n``-th difficulty of the
range), so each difficulty gets the same count (to within one). Test problems are distinct, and
no training problem has the prompt of a test problem (drawn again if it does), so the splits
never overlap even when the difficulty ranges do. Both splits are a pure function of the
task's fields: every problem is drawn from ``numpy.random.default_rng([seed, split, i, retry])``,
so the first ``n`` test problems are the same for any ``num_test >= n``.

Variables are named ``a, b, c, ...`` in order, so a test difficulty above the training range
asks for letters no training example defines: a model has never seen them. The default task
(and ``configs/reasoning_lm.py``) tests on unseen problems of the hardest trained difficulty
(train on 1-8 steps, test on 8), where errors compound over the most steps.

Engine. A data source ``reasoning:train=1-8&test=8&modulus=10`` (:func:`parse_spec`) gives
prompt/answer batches (:mod:`jaxlab.data.prompts`, template ``"none"``: ``[bos] prompt answer
[eos]``, the loss on the answer and eos only): training batches from the ``train`` split,
held-out batches from the ``test`` split. The tokenizer ``"reasoning"``
(:func:`jaxlab.data.tokenizers.load_tokenizer`) is a character tokenizer over :data:`ALPHABET`:
46 ids instead of the byte tokenizer's 259, every one of which occurs in the task, so sampling at
temperature 1 never draws an id that training never showed (with bytes, 200-odd ids keep
near-random embeddings), and a distillation KL sums over the task's symbols only.

Scoring. :func:`extract_answer` reads the integer after the first marker and returns None when
there is no marker or no integer after it: callers count None as a failure of its own, never as
a guessed answer; :func:`is_correct` is True only for an extracted answer equal to the value.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import urllib.parse
from typing import Any

import numpy as np

from jaxlab.data.tokenizers import CharTokenizer

MARKER = "####"
OPS = {"add": "+", "sub": "-", "mul": "*"}
VARIABLES = string.ascii_lowercase
ALPHABET = string.digits + VARIABLES + "=+-*;?#"
SPLITS = ("train", "test")
MAX_RETRIES = 1000  # draws of one problem before giving up on a distinct one

# What must follow the first marker: optional spaces, an optional sign, digits.
_ANSWER = re.compile(r" *(-?\d+)")


def tokenizer() -> CharTokenizer:
    """The character tokenizer of the task (46 ids: pad 0, bos 1, eos 2, then :data:`ALPHABET`)."""
    return CharTokenizer(ALPHABET)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem.

    Attributes:
      prompt: the definitions and the question, e.g. ``a=37;b=a+12;b?``.
      answer: the chain of thought and the marker, e.g. ``b=a+12=37+12=49;####49``.
      value: the correct final value, in ``[0, modulus)``.
      steps: the difficulty (number of steps after ``a``; the chain of thought's line count).
      values: every variable's value in order (``values[0]`` is ``a``, ``values[-1]`` the answer).
    """

    prompt: str
    answer: str
    value: int
    steps: int
    values: tuple[int, ...]

    def record(self) -> dict[str, str]:
        """The prompt/answer record :mod:`jaxlab.data.prompts` reads."""
        return {"prompt": self.prompt, "answer": self.answer}


def _steps_range(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1] <= len(VARIABLES) - 1
    )
    if not ok:
        raise ValueError(
            f"ArithmeticTask.{name} must be an int or a (low, high) pair of ints with "
            f"1 <= low <= high <= {len(VARIABLES) - 1} (one variable per step after 'a'), "
            f"got {value!r}"
        )
    return int(value[0]), int(value[1])


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """The task's settings; :meth:`split` generates the problems.

    Attributes:
      train_steps: difficulties of the training problems, ``(low, high)`` inclusive, or one int.
      test_steps: difficulties of the test problems, likewise.
      num_train: training problems.
      num_test: test problems.
      modulus: values live in ``[0, modulus)``; 2 to 1000.
      ops: operations, a tuple of ``"add"``, ``"sub"``, ``"mul"``; each step draws one uniformly.
      const_prob: probability that a step's second operand is a constant rather than an earlier
        variable (uniform among those defined).
      seed: the generation seed.
    """

    train_steps: tuple[int, int] = (1, 8)
    test_steps: tuple[int, int] = (8, 8)
    num_train: int = 20000
    num_test: int = 500
    modulus: int = 10
    ops: tuple[str, ...] = ("add", "sub")
    const_prob: float = 0.5
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "train_steps", _steps_range("train_steps", self.train_steps))
        object.__setattr__(self, "test_steps", _steps_range("test_steps", self.test_steps))
        ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
        if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(
                f"ArithmeticTask.ops must be distinct names from {sorted(OPS)}, got {self.ops!r}"
            )
        object.__setattr__(self, "ops", ops)
        for name in ("num_train", "num_test", "modulus", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ArithmeticTask.{name} must be an int >= 0, got {value!r}")
        if not 2 <= self.modulus <= 1000:
            raise ValueError(f"ArithmeticTask.modulus must be in [2, 1000], got {self.modulus}")
        if not 0.0 <= self.const_prob <= 1.0:
            raise ValueError(f"ArithmeticTask.const_prob must be in [0, 1], got {self.const_prob}")

    @property
    def width(self) -> int:
        """Digits of every written value."""
        return len(str(self.modulus - 1))

    def _number(self, value: int) -> str:
        return str(value).zfill(self.width)

    def problem(self, rng: np.random.Generator, steps: int) -> Problem:
        """One problem of difficulty ``steps`` drawn from ``rng``."""
        m = self.modulus
        values = [int(rng.integers(m))]
        definitions = [f"a={self._number(values[0])}"]
        lines = []
        for i in range(1, steps + 1):
            name, previous = VARIABLES[i], VARIABLES[i - 1]
            symbol = OPS[self.ops[int(rng.integers(len(self.ops)))]]
            if rng.random() < self.const_prob:
                operand, other = int(rng.integers(m)), None
            else:
                j = int(rng.integers(i))
                operand, other = values[j], VARIABLES[j]
            x = values[-1]
            value = {"+": x + operand, "-": x - operand, "*": x * operand}[symbol] % m
            written = self._number(operand) if other is None else other
            definitions.append(f"{name}={previous}{symbol}{written}")
            lines.append(
                f"{name}={previous}{symbol}{written}="
                f"{self._number(x)}{symbol}{self._number(operand)}={self._number(value)};"
            )
            values.append(value)
        prompt = ";".join(definitions) + f";{VARIABLES[steps]}?"
        answer = "".join(lines) + MARKER + self._number(values[-1])
        return Problem(prompt, answer, values[-1], steps, tuple(values))

    def _draw(self, split: str, count: int, steps_range, exclude: set[str]) -> list[Problem]:
        low, high = steps_range
        split_index = SPLITS.index(split)
        problems = []
        for i in range(count):
            steps = low + i % (high - low + 1)
            for retry in range(MAX_RETRIES):
                rng = np.random.default_rng([self.seed, split_index, i, retry])
                problem = self.problem(rng, steps)
                if problem.prompt not in exclude:
                    break
            else:
                raise ValueError(
                    f"ArithmeticTask: no {split} problem of difficulty {steps} outside the "
                    f"{len(exclude)} excluded prompts after {MAX_RETRIES} draws; difficulty "
                    f"{steps} with modulus {self.modulus} has too few distinct problems for "
                    f"num_{split}={count}"
                )
            problems.append(problem)
            if split == "test":
                exclude.add(problem.prompt)  # test problems are distinct
        return problems

    def split(self, name: str) -> list[Problem]:
        """The ``"train"`` or ``"test"`` problems (module docstring)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return list(_generated_split(self, name))

    def records(self, name: str) -> list[dict[str, str]]:
        """The split as prompt/answer records."""
        return [p.record() for p in self.split(name)]


@functools.lru_cache(maxsize=8)
def _generated_split(task: ArithmeticTask, name: str) -> tuple[Problem, ...]:
    # Cached per process: a split is a pure function of the task's fields (and of this module's
    # code and MAX_RETRIES: patch those, clear the cache), drawing 20,000 problems takes about a
    # second, and a distillation run asks for the same split once per training or evaluation
    # loop (about ten times).
    if name == "test":
        return tuple(task._draw("test", task.num_test, task.test_steps, set()))
    test_prompts = {p.prompt for p in _generated_split(task, "test")}
    return tuple(task._draw("train", task.num_train, task.train_steps, test_prompts))


# --------------------------------------------------------------------------------------------
# A spec string, as config.data.sources names sources.

_INT_KEYS = ("num_train", "num_test", "modulus", "seed")


def _parse_steps(spec: str, key: str, text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    try:
        return (int(low), int(high)) if dash else (int(low), int(low))
    except ValueError:
        raise ValueError(
            f"reasoning source {spec!r}: {key} must be N or LOW-HIGH (difficulties), got {text!r}"
        ) from None


def parse_spec(spec: str) -> ArithmeticTask:
    """``reasoning:train=1-6&test=8&num_train=20000&num_test=500&modulus=100&ops=add,sub&
    const_prob=0.5&seed=0`` -> the :class:`ArithmeticTask` (omitted keys keep its defaults;
    ``reasoning`` alone is the default task)."""
    kind, _, query = spec.partition(":")
    if kind != "reasoning":
        raise ValueError(f"reasoning source {spec!r} must look like 'reasoning:train=1-6&...'")
    fields: dict[str, Any] = {}
    known = ("train", "test", "ops", "const_prob", *_INT_KEYS)
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True):
        if key not in known:
            raise ValueError(f"reasoning source {spec!r}: unknown key {key!r}; known: {known}")
        if key in ("train", "test"):
            fields[f"{key}_steps"] = _parse_steps(spec, key, value)
        elif key == "ops":
            fields["ops"] = tuple(value.split(","))
        else:
            try:
                fields[key] = float(value) if key == "const_prob" else int(value)
            except ValueError:
                kind_name = "a number" if key == "const_prob" else "an int"
                raise ValueError(
                    f"reasoning source {spec!r}: {key} must be {kind_name}, got {value!r}"
                ) from None
    try:
        return ArithmeticTask(**fields)
    except ValueError as e:
        raise ValueError(f"reasoning source {spec!r}: {e}") from None


# --------------------------------------------------------------------------------------------
# Scoring.


def extract_answer(text: str) -> int | None:
    """The integer right after the first :data:`MARKER` in ``text`` (spaces and a sign
    allowed; whatever follows the digits is ignored), or None when there is no marker or the
    first one is not followed by digits (a malformed output: ``"####;####5"`` and ``"#####5"``
    give None, never a later marker's number)."""
    at = text.find(MARKER)
    if at < 0:
        return None
    match = _ANSWER.match(text, at + len(MARKER))
    return None if match is None else int(match.group(1))


def is_correct(text: str, value: int) -> bool:
    """Whether ``text``'s extracted answer equals ``value`` (False when none is extracted)."""
    answer = extract_answer(text)
    return answer is not None and answer == value
