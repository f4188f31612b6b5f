"""Medical QA benchmarks from local files in their published formats, as :class:`Question` s.

Each benchmark is a directory holding its released files (nothing is downloaded):

* ``medqa`` (5 options) and ``medqa4`` (4 options): MedQA's JSONL (jind11/MedQA
  ``data_clean/questions/US/{train,test}.jsonl`` and ``US/4_options/phrases_no_exclude_*.jsonl``),
  one object per line with ``question``, ``answer`` (the correct option's text) and ``options``,
  either a ``{"A": text, ...}`` mapping (the release, GBaker/MedQA-USMLE-4-options) or a list of
  ``{"key", "value"}`` (bigbio ``med_qa_en_source``). The gold is the key whose text equals
  ``answer`` (MEDITRON's rule), else ``answer_idx``.
* ``medmcqa``: MedMCQA's ``train.json`` / ``dev.json`` (JSON lines despite the suffix) with
  ``question``, ``opa``..``opd``, ``cop`` (1-based in the release; ``cop_base=0`` for the
  0-based Hugging Face export) and ``exp``. The test split is ``dev.json`` (the released test set
  has no answers; MEDITRON evaluates the validation split).
* ``pubmedqa``: PubMedQA's PQA-L JSON, a mapping ``{pmid: {QUESTION, CONTEXTS, final_decision,
  LONG_ANSWER, ...}}``: ``pqal_fold0/train_set.json`` and ``test_set.json`` (the 500-question
  test set of ``preprocess/split_dataset.py``). Options are yes/no/maybe.
* ``mmlu_medical``: MMLU's headerless CSVs (Hendrycks ``data/{dev,test}/{subject}_{split}.csv``:
  question, A, B, C, D, answer letter). ``test`` holds the 9 medical subjects; ``train`` is the
  ``dev`` split (5 examples per subject, lukaemon/mmlu's ``train``) of the 11 subjects MEDITRON
  pooled for its demonstrations (``MMLU_FEWSHOT_POOL``: the 9 and two chemistry subjects).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

BENCHMARKS = ("medqa", "medqa4", "medmcqa", "pubmedqa", "mmlu_medical")
SPLITS = ("train", "test")
PUBMEDQA_OPTIONS = ("yes", "no", "maybe")
# MEDITRON's order (evaluation/evaluate.py); the two chemistry subjects it loads are dropped.
MMLU_MEDICAL_SUBJECTS = (
    "anatomy",
    "college_biology",
    "college_medicine",
    "professional_medicine",
    "medical_genetics",
    "virology",
    "clinical_knowledge",
    "high_school_biology",
    "nutrition",
)
# The 11 subjects MEDITRON's loader pools (its order): few-shot demonstrations are drawn from all
# of their dev rows, the chemistry ones included, before evaluate.py drops chemistry.
MMLU_FEWSHOT_POOL = (
    *MMLU_MEDICAL_SUBJECTS[:8],
    "high_school_chemistry",
    "nutrition",
    "college_chemistry",
)
_FILES = {
    "medqa": {"train": "train.jsonl", "test": "test.jsonl"},
    "medqa4": {"train": "phrases_no_exclude_train.jsonl", "test": "phrases_no_exclude_test.jsonl"},
    "medmcqa": {"train": "train.json", "test": "dev.json"},
    "pubmedqa": {"train": os.path.join("pqal_fold0", "train_set.json"), "test": "test_set.json"},
}
_NUM_OPTIONS = {"medqa": 5, "medqa4": 4, "medmcqa": 4, "mmlu_medical": 4}


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question.

    Attributes:
      id: where it came from (file and line, pmid, subject and row).
      question: the question text as released.
      options: the option texts; for PubMedQA ``("yes", "no", "maybe")``.
      answer: the gold label: an option letter ``"A"``.. for multiple choice, ``"yes"``/``"no"``/
        ``"maybe"`` for PubMedQA.
      context: PubMedQA's abstract contexts joined by newlines; None elsewhere.
      subject: the MMLU subject; None elsewhere.
      explanation: the released explanation (MedMCQA ``exp``, PubMedQA ``LONG_ANSWER``) or None.
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: str
    context: str | None = None
    subject: str | None = None
    explanation: str | None = None

    @property
    def is_yes_no(self) -> bool:
        return self.options == PUBMEDQA_OPTIONS

    @property
    def labels(self) -> tuple[str, ...]:
        """What an answer names: option letters, or yes/no/maybe."""
        if self.is_yes_no:
            return PUBMEDQA_OPTIONS
        return tuple(chr(ord("A") + i) for i in range(len(self.options)))


def _check(benchmark: str, split: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _path(data_dir: str, name: str) -> str:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data_dir={data_dir!r} must hold {name!r} (not found: {path})")
    return path


def _jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number} is not a JSON object: {e}") from None
    return rows


def _field(row: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise ValueError(f"{where}: the record has no {key!r} field (fields: {sorted(row)})")
    return row[key]


def _medqa(where: str, row: Mapping[str, Any], num_options: int) -> Question:
    options = _field(row, "options", where)
    if isinstance(options, Mapping):
        pairs = [(str(k), str(v)) for k, v in options.items()]
    else:
        pairs = [(str(o["key"]), str(o["value"])) for o in options]
    if len(pairs) != num_options:
        raise ValueError(f"{where}: expected {num_options} options, got {len(pairs)}: {pairs}")
    keys = [k for k, _ in pairs]
    expected = [chr(ord("A") + i) for i in range(num_options)]
    if keys != expected:
        raise ValueError(f"{where}: option keys must be {expected}, got {keys}")
    answer = str(_field(row, "answer", where))
    gold = next((k for k, v in pairs if v == answer), row.get("answer_idx"))
    if gold not in expected:
        raise ValueError(
            f"{where}: no option's text equals answer={answer!r} and answer_idx="
            f"{row.get('answer_idx')!r} is not one of {expected}"
        )
    return Question(where, str(_field(row, "question", where)), tuple(v for _, v in pairs), gold)


def _medmcqa(where: str, row: Mapping[str, Any], cop_base: int) -> Question:
    options = tuple(str(_field(row, key, where)) for key in ("opa", "opb", "opc", "opd"))
    cop = _field(row, "cop", where)
    index = int(cop) - cop_base
    if not 0 <= index < 4:
        raise ValueError(
            f"{where}: cop={cop!r} is not a labelled answer ({cop_base}..{cop_base + 3} with "
            f"cop_base={cop_base})"
        )
    return Question(
        where,
        str(_field(row, "question", where)),
        options,
        chr(ord("A") + index),
        explanation=row.get("exp"),
    )


def _pubmedqa(path: str) -> list[Question]:
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, Mapping):
        raise ValueError(f"{path} must hold a JSON object {{pmid: record}}, got {type(records)}")
    out = []
    for pmid, row in records.items():
        where = f"{path}:{pmid}"
        decision = str(_field(row, "final_decision", where)).lower()
        if decision not in PUBMEDQA_OPTIONS:
            raise ValueError(f"{where}: final_decision must be one of {PUBMEDQA_OPTIONS}")
        out.append(
            Question(
                where,
                str(_field(row, "QUESTION", where)),
                PUBMEDQA_OPTIONS,
                decision,
                context="\n".join(_field(row, "CONTEXTS", where)),
                explanation=row.get("LONG_ANSWER"),
            )
        )
    return out


def _mmlu(data_dir: str, split: str, subjects) -> list[Question]:
    folder = "dev" if split == "train" else "test"
    out = []
    for subject in subjects:
        path = _path(data_dir, os.path.join(folder, f"{subject}_{folder}.csv"))
        with open(path, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                where = f"{path}:{number}"
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise ValueError(
                        f"{where}: an MMLU row is question,A,B,C,D,answer-letter; got {row}"
                    )
                out.append(Question(where, row[0], tuple(row[1:5]), row[5], subject=subject))
    return out


def read_file(benchmark: str, path: str, *, cop_base: int = 1) -> list[Question]:
    """The questions of one released file of ``benchmark`` (any of ``BENCHMARKS`` but
    ``mmlu_medical``, whose questions are spread over per-subject files), in file order: e.g.
    MedQA's ``train.jsonl``, MedMCQA's ``train.json``, PubMedQA's ``train_set.json`` or the
    artificial ``ori_pqaa.json`` (same format), which a finetuning run reads.

    Args:
      benchmark: ``"medqa"``, ``"medqa4"``, ``"medmcqa"`` or ``"pubmedqa"``.
      path: the file.
      cop_base: MedMCQA's ``cop`` of option A (1 in the release, 0 in the HF export).
    """
    if benchmark not in _FILES:
        raise ValueError(
            f"benchmark must be one of {tuple(_FILES)} for one file, got {benchmark!r}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{benchmark}: no file at path={path!r}")
    if benchmark == "pubmedqa":
        return _pubmedqa(path)
    if benchmark == "medmcqa":
        if cop_base not in (0, 1):
            raise ValueError(f"cop_base must be 0 or 1, got {cop_base!r}")
        return [_medmcqa(where, row, cop_base) for where, row in _jsonl(path)]
    return [_medqa(where, row, _NUM_OPTIONS[benchmark]) for where, row in _jsonl(path)]


def load(
    benchmark: str,
    data_dir: str,
    split: str = "test",
    *,
    cop_base: int = 1,
    subjects: tuple[str, ...] | None = None,
) -> list[Question]:
    """The questions of ``split`` (``"train"``: few-shot pool, ``"test"``: evaluated) of
    ``benchmark`` from its released files under ``data_dir`` (see the module docstring), in
    file order.

    Args:
      benchmark: one of ``BENCHMARKS``.
      data_dir: the benchmark's directory.
      split: ``"train"`` or ``"test"``.
      cop_base: MedMCQA's ``cop`` of option A (1 in the release, 0 in the HF export).
      subjects: MMLU subjects, in order; default ``MMLU_MEDICAL_SUBJECTS`` for ``test`` and
        ``MMLU_FEWSHOT_POOL`` for ``train``.
    """
    _check(benchmark, split)
    if benchmark == "mmlu_medical":
        if subjects is None:
            subjects = MMLU_FEWSHOT_POOL if split == "train" else MMLU_MEDICAL_SUBJECTS
        return _mmlu(data_dir, split, subjects)
    return read_file(benchmark, _path(data_dir, _FILES[benchmark][split]), cop_base=cop_base)
