"""Answers from generated text: MEDITRON's rules exactly (``parity``) or fixed (``clean``).

:func:`parse_parity` ports ``eval`` of epfLLM/meditron ``evaluation/evaluate.py`` step by step,
quirks included:

1. lowercase the output and the gold; 2. if the output holds ``"\\n##"``, keep the line after
it; 3. a gold of the form ``"... answer is: X ###"`` (their CoT golds) becomes ``X``; 4. few-shot:
keep the output before its first blank line; 5. non-alphanumerics become spaces, runs of spaces
one; 6. CoT: the first word after the last ``"answer is"``; 7. multiple choice: the first
character; yes/no: ``yesyes``/``nono``/``yesno``/``noyes`` collapse to their first word; 8. only
``a``-``e``, ``yes`` and ``no`` are answers: **"maybe" is never one**, so a PubMedQA question
whose gold is "maybe" can never be scored correct, and an output of ``maybe`` is a failure;
9. failures (``None`` here) count as wrong in MEDITRON's headline ``accuracy``.
Quirks kept: the output's first character is the choice (``"because ..."`` -> ``b``); a letter
beyond the question's options (``e`` on a 4-option question) is a valid, wrong answer.

:func:`parse_clean` fixes them: the answer must be a whole word naming one of the question's own
labels (``a``.. up to its option count, or yes/no/maybe, so "maybe" is scorable), optionally in
``(b)``/``b.``/``b)`` form (a lone letter followed by prose, "a patient ...", is not an answer)
or as an option's exact text; anything else is a failure, reported separately. CoT takes the
first word after the last ``answer is`` (or ``answer:``).

Both cut the output at the first of MEDITRON's stop strings (:data:`STOP_STRINGS`, ``"###"`` and
``"$$$"``) first: vLLM's stop strings end the text before the stop string, while
:func:`jaxlab.infer.generate` keeps the token that completes it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

PARSERS = ("parity", "clean")
# MEDITRON's inference stops at these strings (beside eos and pad).
STOP_STRINGS = ("###", "$$$")
PARITY_ANSWERS = ("a", "b", "c", "d", "e", "yes", "no")
_DOUBLES = (("yesyes", "yes"), ("nono", "no"), ("yesno", "yes"), ("noyes", "no"))


def strip_stop(text: str) -> str:
    """The text before the first of :data:`STOP_STRINGS` (what vLLM returns for them)."""
    for stop in STOP_STRINGS:
        text = text.split(stop)[0]
    return text


def parity_gold(gold: str) -> str | None:
    """The gold as MEDITRON compares it: lowercased; CoT golds ``"... answer is: X ###"`` -> X
    (None when such a gold has no ``answer is:``)."""
    gold = gold.lower()
    if "###" in gold:
        parts = gold.split("answer is:")
        if len(parts) < 2:
            return None
        gold = parts[1].split("###")[0].strip()
    return gold


def parse_parity(output: str, *, yes_no: bool, shots: int = 0, cot: bool = False) -> str | None:
    """MEDITRON's extracted answer from ``output`` (module docstring); None when unparseable.

    Args:
      output: the generated text (cut at ``"###"`` already, see :func:`strip_stop`).
      yes_no: PubMedQA (``boolean`` answers) rather than multiple choice.
      shots: few-shot demonstrations in the prompt (> 0 keeps text before the first blank line).
      cot: chain-of-thought (the first word after the last ``answer is``).
    """
    output = output.lower()
    if "\n##" in output:
        output = output.split("\n##")[1].split("\n")[0].strip().lower()
    if shots > 0:
        output = output.split("\n\n")[0].strip()
    output = re.sub(r"[^a-zA-Z0-9]", " ", output).strip()
    output = re.sub(" +", " ", output)
    if cot:
        words = output.split("answer is")[-1].split()
        if not words:
            return None
        output = words[0]
    if yes_no:
        for double, single in _DOUBLES:  # their if/elif chain: only the first match applies
            if double in output:
                output = output.replace(double, single)
                break
    elif output:
        output = output[0]
    return output if output in PARITY_ANSWERS else None


def judge_parity(
    output: str, gold: str, *, yes_no: bool, shots: int = 0, cot: bool = False
) -> tuple[str | None, bool]:
    """MEDITRON's verdict on one output: ``(answer, correct)``, answer None for a failure (an
    unparseable output, or a ``###`` gold without ``answer is:``, which fails whatever the
    output); a failure is never correct."""
    gold = parity_gold(gold)
    if gold is None:
        return None, False
    answer = parse_parity(output, yes_no=yes_no, shots=shots, cot=cot)
    return answer, answer is not None and answer == gold


def parity_vote(predictions: Sequence[str]) -> str:
    """SC-CoT's vote in MEDITRON: ``Counter(preds).most_common(1)``; a failed branch takes part
    with its raw output as its "prediction" (so failures can win), ties go to the first seen."""
    if not predictions:
        raise ValueError("parity_vote: predictions must be non-empty")
    return Counter(predictions).most_common(1)[0][0]


_COT_MARKERS = re.compile(r"answer\s+is\s*:?|answer\s*:")
_WORD = re.compile(r"[a-z0-9]+")


def parse_clean(
    output: str,
    *,
    labels: Sequence[str],
    options: Sequence[str] = (),
    shots: int = 0,
    cot: bool = False,
) -> str | None:
    """The label ``output`` names, or None (a parse failure, never a guess).

    Args:
      output: the generated text.
      labels: the question's labels, ``("A", "B", ...)`` or ``("yes", "no", "maybe")``; the
        result is one of them, in that spelling.
      options: the option texts; an output that starts with one (case-insensitive) names it.
      shots: few-shot demonstrations in the prompt (> 0: text before the first blank line).
      cot: the answer follows the last ``answer is`` / ``answer:``.
    """
    text = strip_stop(output).lower()
    if shots > 0:
        text = text.strip().split("\n\n")[0]
    if cot:
        marks = list(_COT_MARKERS.finditer(text))
        if not marks:
            return None
        text = text[marks[-1].end() :]
    text = text.strip()
    by_word = {label.lower(): label for label in labels}
    if options and len(options) != len(labels):
        raise ValueError(f"parse_clean: options ({len(options)}) and labels ({len(labels)}) differ")
    named = []  # an option's own text as a whole phrase, the longest that matches
    for option, label in zip(options, labels, strict=False):
        option = option.strip().lower()
        if len(option) > 1 and re.match(re.escape(option) + r"(?![a-z0-9])", text):
            named.append((len(option), label))
    if named:
        return max(named, key=lambda pair: pair[0])[1]
    match = _WORD.search(text)
    if match is None or text[: match.start()].strip(" ([*\"'") != "":
        return None
    word = match.group()
    # a lone letter must end there or be followed by punctuation: "a patient ..." is prose
    if len(word) == 1 and not re.match(r"($|[^a-z0-9 \t])", text[match.end() :]):
        return None
    if word in by_word:
        return by_word[word]
    # "yesyes" and the like: one label repeated
    for key, label in by_word.items():
        if len(key) > 1 and re.fullmatch(f"(?:{re.escape(key)})+", word):
            return label
    return None


def vote(answers: Sequence[Hashable | None]) -> Hashable | None:
    """Clean SC-CoT vote: :func:`jaxlab.infer.test_time.majority_vote` (failures do not vote;
    ties to the first seen; None if no branch parsed)."""
    from jaxlab.infer.test_time import majority_vote

    return majority_vote(answers)
