"""Evaluate a jaxlab model on a medical benchmark in one of four modes, per few-shot seed.

Modes (``MODES``):

* ``"top_token"``: MEDITRON's "top-token" as it ran: short greedy generation, then parsing. The
  budget is, with the ``parity`` parser, the token length of the gold of the first question of
  each batch of ``batch_size`` (their ``tokenizer_param(target[0])``), +8 with few-shot; with
  the ``clean`` parser the longest label's (``" " + label``), +8 with few-shot, so no gold is
  peeked at.
* ``"likelihood"``: lm-eval's multiple choice: every label's continuation (see
  :func:`jaxlab.eval.medical.prompts.continuation`) is scored by its summed log-probability after
  the prompt (:func:`jaxlab.infer.score`, context and continuation encoded separately), and the
  best-scored label is the answer (ties to the first). Nothing is parsed, so nothing fails.
* ``"cot"``: chain-of-thought: the CoT cue, greedy generation up to ``cot_max_new_tokens`` (1024
  in MEDITRON), parsing after the last "answer is".
* ``"sc_cot"``: self-consistency: ``sc_samples`` CoT completions per question at
  ``temperature`` (5 and 0.8 in the paper) from :func:`jaxlab.infer.test_time.draw_samples`,
  then a majority vote (``parity``: :func:`~jaxlab.eval.medical.parsing.parity_vote`, failed
  branches voting with their raw text; ``clean``: failures abstain).

Greedy generation stops at the tokenizer's eos and pad ids and at ``"###"`` and ``"$$$"``
(MEDITRON's stop strings). MEDITRON also decoded with vLLM's ``frequency_penalty=1.0``, which
:func:`jaxlab.infer.generate` does not offer: it cannot change a first generated token (nothing
has been generated yet), so top-token answers are unaffected; CoT texts may differ.

Scoring: ``accuracy`` is correct / questions (MEDITRON's headline: a parse failure counts as
wrong), ``accuracy_parsed`` correct / parsed questions (their ``accuracy_calibrate``), and
``parse_failures`` the count, all per seed with the mean and sample standard deviation (ddof=1)
over seeds. Seeds pick the few-shot demonstrations and the SC-CoT samples; a zero-shot greedy
or likelihood run does not depend on them and runs once (``seeds`` in the result says which).
With the ``parity`` parser the gold is compared as MEDITRON did (lowercased; in CoT, MedMCQA's
and PubMedQA's golds are their explanation followed by ``The answer is: X ###``, parsed back),
and MMLU-medical outputs are always parsed as CoT (the first word after the last "answer is"),
as its ``evaluate.py`` does for any run named "...medical...".
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxlab.eval.medical import parsing
from jaxlab.eval.medical import prompts as prompts_lib
from jaxlab.eval.medical.data import BENCHMARKS, Question
from jaxlab.infer import generate_in_batches, score
from jaxlab.infer.test_time import draw_samples

MODES = ("top_token", "likelihood", "cot", "sc_cot")
_COT_GOLD_BENCHMARKS = ("medmcqa", "pubmedqa")  # those with an explanation column in MEDITRON


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How to evaluate (module docstring).

    Attributes:
      benchmark: one of ``data.BENCHMARKS``.
      mode: one of ``MODES``.
      fmt: prompt format, ``"meditron"`` or ``"lm_eval"`` (CoT modes need ``"meditron"``).
      parser: ``"parity"`` (MEDITRON's rules and quirks) or ``"clean"``.
      shots: few-shot demonstrations (3 for 7B, 5 for 70B in the paper; 0 for CoT modes).
      seeds: few-shot / sampling seeds (the paper's 1234, 432, 32).
      chat: wrap prompts in MEDITRON's ChatML (finetuned models).
      sc_samples: SC-CoT completions per question.
      temperature: SC-CoT sampling temperature.
      cot_max_new_tokens: generation budget of the CoT modes.
      batch_size: questions per generation call (MEDITRON's default 16: it sets the parity
        top-token budget) and rows per likelihood call.
      add_bos: prepend the tokenizer's bos (None: when it has one, as vLLM's Llama prompts do).
    """

    benchmark: str
    mode: str = "top_token"
    fmt: str = "meditron"
    parser: str = "parity"
    shots: int = 0
    seeds: tuple[int, ...] = prompts_lib.SEEDS
    chat: bool = False
    sc_samples: int = 5
    temperature: float = 0.8
    cot_max_new_tokens: int = 1024
    batch_size: int = 16
    add_bos: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "seeds", tuple(self.seeds))  # hashable: generation_key
        choices = {
            "benchmark": BENCHMARKS,
            "mode": MODES,
            "fmt": prompts_lib.FORMATS,
            "parser": parsing.PARSERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"EvalConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.mode in ("cot", "sc_cot"):
            if self.fmt != "meditron":
                raise ValueError(f"mode={self.mode!r} needs fmt='meditron', got {self.fmt!r}")
            if self.shots:
                raise ValueError(
                    f"mode={self.mode!r} is zero-shot (MEDITRON's few-shot CoT demonstrations "
                    f"are hand-written files, not part of the datasets), got shots={self.shots}"
                )
        for name in ("sc_samples", "cot_max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.shots < 0:
            raise ValueError(f"EvalConfig.shots must be >= 0, got {self.shots}")
        if not self.seeds:
            raise ValueError("EvalConfig.seeds must name at least one seed")
        if not self.temperature > 0:
            raise ValueError(f"EvalConfig.temperature must be > 0, got {self.temperature!r}")

    @property
    def cot(self) -> bool:
        return self.mode in ("cot", "sc_cot")

    @property
    def effective_seeds(self) -> tuple[int, ...]:
        """The seeds that change anything: all of them with demonstrations or sampling."""
        if self.shots > 0 or self.mode == "sc_cot":
            return tuple(self.seeds)
        return tuple(self.seeds[:1])


def _demos(config: EvalConfig, train: Sequence[Question], q: Question, seed: int, cache: dict):
    if config.shots == 0:
        return []
    subject = (
        q.subject if (config.fmt == "lm_eval" and config.benchmark == "mmlu_medical") else None
    )
    if subject not in cache:
        cache[subject] = prompts_lib.few_shot(train, config.shots, seed, subject=subject)
    return cache[subject]


def build_prompts(
    config: EvalConfig, test: Sequence[Question], train: Sequence[Question], seed: int
) -> list[str]:
    """The prompt of every test question for ``seed``."""
    cache: dict = {}
    return [
        prompts_lib.prompt(
            config.benchmark,
            q,
            _demos(config, train, q, seed, cache),
            fmt=config.fmt,
            cot=config.cot,
            chat=config.chat,
        )
        for q in test
    ]


def _add_bos(config: EvalConfig, tokenizer) -> bool:
    return tokenizer.bos_id is not None if config.add_bos is None else config.add_bos


def _stop_tokens(tokenizer) -> tuple[int, ...]:
    return tuple(i for i in (tokenizer.eos_id, tokenizer.pad_id) if i is not None)


def _padded(rows: Sequence[Sequence[int]], width: int, pad: int = 0) -> np.ndarray:
    out = np.full((len(rows), width), pad, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _bucket(model, width: int, new_tokens: int) -> int:
    """``width`` rounded up to a multiple of 64 where the model has room: fewer shapes, fewer
    compilations across seeds and batches (padding is after every real token, so it changes
    nothing)."""
    rounded = -(-width // 64) * 64
    return rounded if rounded + new_tokens <= model.config.max_seq_len else width


def _check_fits(model, width: int, new_tokens: int, what: str) -> None:
    limit = model.config.max_seq_len
    if width + new_tokens > limit:
        raise ValueError(
            f"{what}: the longest prompt ({width} tokens) + {new_tokens} new tokens exceeds the "
            f"model's max_seq_len={limit}"
        )


def greedy_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    budgets: Sequence[int],
    *,
    batch_size: int,
    add_bos: bool,
) -> list[str]:
    """Greedy completions of ``prompts`` (``budgets[i]``: the new-token budget of the batch that
    starts at question ``i * batch_size``), stopped at eos/pad, ``"###"`` and ``"$$$"``, cut
    before them."""
    encoded = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    width = max(len(e) for e in encoded)
    _check_fits(model, width, max(budgets), "greedy generation")
    width = _bucket(model, width, max(budgets))
    outputs = generate_in_batches(
        model,
        encoded,
        batch_size=batch_size,
        max_new_tokens=budgets,
        width=width,
        stop_tokens=_stop_tokens(tokenizer),
        stop_strings=parsing.STOP_STRINGS,
        tokenizer=tokenizer,
    )
    return [parsing.strip_stop(tokenizer.decode(tokens.tolist())) for tokens in outputs]


def label_logprobs(
    model,
    tokenizer,
    contexts: Sequence[str],
    labels: Sequence[Sequence[str]],
    *,
    batch_size: int,
    add_bos: bool,
) -> list[np.ndarray]:
    """Summed log-probability of each label's continuation after its context: one float64
    array per question, ``[len(labels[i])]``."""
    rows, masks, owner = [], [], []
    for i, (context, names) in enumerate(zip(contexts, labels, strict=True)):
        context_ids = tokenizer.encode(context, add_bos=add_bos)
        for name in names:
            cont = tokenizer.encode(prompts_lib.continuation(context, name))
            if not context_ids or not cont:
                raise ValueError(f"question {i}: empty context or continuation for {name!r}")
            rows.append(context_ids + cont)
            masks.append([0] * len(context_ids) + [1] * len(cont))
            owner.append(i)
    width = max(2, max(len(r) for r in rows))
    _check_fits(model, width, 0, "likelihood scoring")
    width = _bucket(model, width, 0)
    scores, per_call = [], min(batch_size, len(rows))
    for start in range(0, len(rows), per_call):
        chunk, chunk_masks = rows[start : start + per_call], masks[start : start + per_call]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (per_call - real)  # one shape for every call
        chunk_masks = chunk_masks + [chunk_masks[0]] * (per_call - real)
        summed = score(model, _padded(chunk, width), _padded(chunk_masks, width))
        scores.extend(np.asarray(summed, np.float64)[:real].tolist())
    out: list[list[float]] = [[] for _ in contexts]
    for i, s in zip(owner, scores, strict=True):
        out[i].append(s)
    return [np.asarray(s) for s in out]


def _gold_text(config: EvalConfig, q: Question) -> str:
    """The gold as MEDITRON stored it: in CoT, MedMCQA's and PubMedQA's carry the explanation."""
    if config.cot and config.benchmark in _COT_GOLD_BENCHMARKS:
        return f"{q.explanation}.\nThe answer is: {q.answer} ###"
    return q.answer


def _judge(config: EvalConfig, q: Question, text: str) -> tuple[str | None, bool]:
    """``(answer, correct)`` of one output; answer None for a parse failure."""
    if config.parser == "parity":
        # evaluate.py turns CoT parsing on for every run whose name holds "medical": MMLU-medical
        cot = config.cot or config.benchmark == "mmlu_medical"
        return parsing.judge_parity(
            text, _gold_text(config, q), yes_no=q.is_yes_no, shots=config.shots, cot=cot
        )
    answer = parsing.parse_clean(
        text, labels=q.labels, options=q.options, shots=config.shots, cot=config.cot
    )
    return answer, answer is not None and answer == q.answer


def _budgets(config: EvalConfig, tokenizer, test: Sequence[Question]) -> list[int]:
    extra = 8 if config.shots > 0 else 0
    starts = range(0, len(test), config.batch_size)
    if config.cot:
        return [config.cot_max_new_tokens] * len(starts)
    if config.parser == "parity":  # tokenizer_param(tokenizer, batch['gold'])'s target[0]
        return [len(tokenizer.encode(test[s].answer)) + extra for s in starts]
    longest = max(len(tokenizer.encode(f" {label}")) for label in test[0].labels)
    return [longest + extra] * len(starts)


def _outputs(
    model,
    tokenizer,
    config: EvalConfig,
    test: Sequence[Question],
    train: Sequence[Question],
    seed: int,
):
    """What the model produced for one seed, before any parsing: per question the label scores
    (likelihood), the sampled texts (sc_cot) or the greedy text."""
    prompts = build_prompts(config, test, train, seed)
    add_bos = _add_bos(config, tokenizer)
    if config.mode == "likelihood":
        return label_logprobs(
            model,
            tokenizer,
            prompts,
            [q.labels for q in test],
            batch_size=config.batch_size,
            add_bos=add_bos,
        )
    if config.mode == "sc_cot":
        return draw_samples(
            model,
            tokenizer,
            prompts,
            num_samples=config.sc_samples,
            extract=parsing.strip_stop,
            max_new_tokens=config.cot_max_new_tokens,
            temperature=config.temperature,
            problems_per_call=min(config.batch_size, len(test)),
            seed=seed,
            stop_tokens=_stop_tokens(tokenizer),
            stop_strings=parsing.STOP_STRINGS,
            add_bos=add_bos,
        ).answers
    return greedy_texts(
        model,
        tokenizer,
        prompts,
        _budgets(config, tokenizer, test),
        batch_size=config.batch_size,
        add_bos=add_bos,
    )


def _records(config: EvalConfig, test: Sequence[Question], outputs) -> list[dict[str, Any]]:
    """One record per question from :func:`_outputs`, judged by ``config.parser``."""
    records = []
    for q, out in zip(test, outputs, strict=True):
        if config.mode == "likelihood":
            pred = q.labels[int(np.argmax(out))]
            record = dict(pred=pred, correct=pred == q.answer, failed=False, scores=out.tolist())
        elif config.mode == "sc_cot":
            branch = [_judge(config, q, t)[0] for t in out]
            if config.parser == "parity":  # failed branches vote with their raw text
                votes = [
                    p if p is not None else t.lower() for p, t in zip(branch, out, strict=True)
                ]
                pred = parsing.parity_vote(votes)
                pred = pred if pred in parsing.PARITY_ANSWERS else None
                correct = pred is not None and pred == parsing.parity_gold(_gold_text(config, q))
            else:
                pred = parsing.vote(branch)
                correct = pred is not None and pred == q.answer
            record = dict(
                pred=pred, correct=correct, failed=pred is None, output=list(out), branches=branch
            )
        else:
            pred, correct = _judge(config, q, out)
            record = dict(pred=pred, correct=correct, failed=pred is None, output=out)
        records.append(dict(id=q.id, gold=q.answer, **record))
    return records


def evaluate_seed(
    model,
    tokenizer,
    config: EvalConfig,
    test: Sequence[Question],
    train: Sequence[Question],
    seed: int,
) -> list[dict[str, Any]]:
    """One record per test question for one seed: ``{id, gold, pred, correct, failed, output}``
    (``output``: the generated text(s); ``scores`` in likelihood mode)."""
    return _records(config, test, _outputs(model, tokenizer, config, test, train, seed))


def generation_key(config: EvalConfig) -> EvalConfig:
    """``config`` with what does not change the model's outputs normalised away: the parser
    changes only the top-token budget, so CoT, SC-CoT and likelihood runs that differ only in
    parser share one generation."""
    if config.mode == "top_token":
        return config
    return dataclasses.replace(config, parser=parsing.PARSERS[0])


def _summary(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "per_seed": values}


def evaluate(
    model,
    tokenizer,
    config: EvalConfig,
    test: Sequence[Question],
    train: Sequence[Question] = (),
) -> dict[str, Any]:
    """Evaluates ``model`` on ``test`` (demonstrations from ``train``) for every effective seed.

    Returns a JSON-able dict: the config, ``seeds``, ``num_questions``, ``accuracy`` and
    ``accuracy_parsed`` (``{mean, std, per_seed}``), ``parse_failures`` (``{total,
    per_seed}``), ``per_subject`` accuracy (``{subject: {mean, std, per_seed}}``, MMLU only),
    ``seconds`` and ``questions_per_second`` (all seeds, compilation included),
    ``reused_outputs`` (False here, see :func:`evaluate_many`) and ``predictions`` (``{seed:
    [record]}``, see :func:`evaluate_seed`).
    """
    return evaluate_many(model, tokenizer, [config], test, train)[0]


def evaluate_many(
    model,
    tokenizer,
    configs: Sequence[EvalConfig],
    test: Sequence[Question],
    train: Sequence[Question] = (),
) -> list[dict[str, Any]]:
    """:func:`evaluate` for each of ``configs``, generating once for configs that differ only
    in what does not change the outputs (:func:`generation_key`, e.g. a CoT run parsed with
    both parsers). A result that reused an earlier one's outputs says ``reused_outputs: True``;
    its ``seconds`` still count that generation, so ``questions_per_second`` is the mode's cost
    alone."""
    if not test:
        raise ValueError("evaluate: test must hold at least one question")
    for config in configs:  # before anything is generated
        if config.shots and not train:
            raise ValueError(f"evaluate: shots={config.shots} needs train questions, got none")
    generated: dict = {}  # (generation key, seed) -> (outputs, seconds)
    results = []
    for config in configs:
        seeds = config.effective_seeds
        key = generation_key(config)
        reused = all((key, seed) in generated for seed in seeds)
        seconds = 0.0
        per_seed = {}
        for seed in seeds:
            begin = time.perf_counter()
            if (key, seed) not in generated:
                outputs = _outputs(model, tokenizer, config, test, train, seed)
                generated[key, seed] = (outputs, time.perf_counter() - begin)
                begin = time.perf_counter()
            outputs, generation_seconds = generated[key, seed]
            per_seed[seed] = _records(config, test, outputs)
            seconds += generation_seconds + time.perf_counter() - begin
        results.append(_result(config, test, per_seed, seconds, reused))
    return results


def _result(config, test, per_seed, seconds: float, reused: bool) -> dict[str, Any]:
    seeds = list(per_seed)
    acc, acc_parsed, failures = [], [], []
    for records in per_seed.values():
        correct = sum(r["correct"] for r in records)
        failed = sum(r["failed"] for r in records)
        acc.append(correct / len(records))
        parsed = len(records) - failed
        acc_parsed.append(correct / parsed if parsed else 0.0)
        failures.append(failed)
    subjects = list(dict.fromkeys(q.subject for q in test if q.subject))
    per_subject = {
        subject: _summary(
            [
                np.mean(
                    [
                        r["correct"]
                        for r, q in zip(records, test, strict=True)
                        if q.subject == subject
                    ]
                )
                for records in per_seed.values()
            ]
        )
        for subject in subjects
    }
    return {
        "config": {**dataclasses.asdict(config), "seeds": list(config.seeds)},
        "seeds": seeds,
        "num_questions": len(test),
        "accuracy": _summary(acc),
        "accuracy_parsed": _summary(acc_parsed),
        "parse_failures": {"total": int(sum(failures)), "per_seed": failures},
        **({"per_subject": per_subject} if per_subject else {}),
        "seconds": seconds,
        "questions_per_second": len(test) * len(seeds) / seconds,
        "reused_outputs": reused,
        "predictions": {str(seed): records for seed, records in per_seed.items()},
    }


def write_json(path: str, result: dict[str, Any]) -> str:
    """Writes ``result`` as indented JSON at ``path`` (folders created); returns the path."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
