"""Tiny benchmark files in each benchmark's published format, written into a folder."""

from __future__ import annotations

import csv
import json
import os

from jaxlab.eval.medical import MMLU_FEWSHOT_POOL, MMLU_MEDICAL_SUBJECTS


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _medqa_row(i: int, letters: str) -> dict:
    options = {k: f"drug {k.lower()}{i}" for k in letters}
    gold = letters[i % len(letters)]
    return {
        "question": f"A {30 + i}-year-old man has a fever. Which drug is best",
        "answer": options[gold],
        "options": options,
        "meta_info": "step1",
        "answer_idx": gold,
    }


def write_all(root: str, n: int = 4) -> dict[str, str]:
    """Writes every benchmark under ``root``; returns ``{benchmark: data_dir}``."""
    dirs = {b: os.path.join(root, b) for b in ("medqa", "medqa4", "medmcqa", "pubmedqa", "mmlu")}
    for split in ("train", "test"):
        _jsonl(
            os.path.join(dirs["medqa"], f"{split}.jsonl"),
            [_medqa_row(i, "ABCDE") for i in range(n)],
        )
        _jsonl(
            os.path.join(dirs["medqa4"], f"phrases_no_exclude_{split}.jsonl"),
            [_medqa_row(i, "ABCD") for i in range(n)],
        )
    for name in ("train.json", "dev.json"):
        _jsonl(
            os.path.join(dirs["medmcqa"], name),
            [
                {
                    "id": f"m{i}",
                    "question": f"Which nerve supplies muscle {i}?",
                    "opa": "Radial",
                    "opb": "Ulnar",
                    "opc": "Median",
                    "opd": "Axillary",
                    "cop": 1 + i % 4,
                    "exp": f"Because of anatomy {i}",
                    "subject_name": "Anatomy",
                }
                for i in range(n)
            ],
        )
    decisions = ("yes", "no", "maybe")
    for name in (os.path.join("pqal_fold0", "train_set.json"), "test_set.json"):
        path = os.path.join(dirs["pubmedqa"], name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        records = {
            str(1000 + i): {
                "QUESTION": f"Does treatment {i} reduce mortality?",
                "CONTEXTS": [f"Background {i}.", f"Results {i}."],
                "LABELS": ["BACKGROUND", "RESULTS"],
                "MESHES": ["Humans"],
                "YEAR": "2001",
                "reasoning_required_pred": "yes",
                "reasoning_free_pred": "yes",
                "final_decision": decisions[i % 3],
                "LONG_ANSWER": f"Treatment {i} works.",
            }
            for i in range(n)
        }
        with open(path, "w") as f:
            json.dump(records, f)
    for folder in ("dev", "test"):
        os.makedirs(os.path.join(dirs["mmlu"], folder), exist_ok=True)
        subjects = MMLU_FEWSHOT_POOL if folder == "dev" else MMLU_MEDICAL_SUBJECTS
        for s, subject in enumerate(subjects):
            with open(os.path.join(dirs["mmlu"], folder, f"{subject}_{folder}.csv"), "w") as f:
                writer = csv.writer(f)
                for i in range(2):
                    writer.writerow(
                        [
                            f"{subject} question {i}, with a comma",
                            "w",
                            "x",
                            "y",
                            "z",
                            "ABCD"[(s + i) % 4],
                        ]
                    )
    return {
        "medqa": dirs["medqa"],
        "medqa4": dirs["medqa4"],
        "medmcqa": dirs["medmcqa"],
        "pubmedqa": dirs["pubmedqa"],
        "mmlu_medical": dirs["mmlu"],
    }
