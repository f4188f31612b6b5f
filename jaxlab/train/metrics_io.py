"""Metrics as JSON lines in ``WORKDIR/metrics.jsonl``: written by process 0, read back by
experiments and plots; a resumed run drops the records past its checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import logging


def _parse_lines(lines) -> list[dict[str, Any]]:
    """Metrics records; a line torn by a crash mid-write is skipped."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logging.warning("skipping an unreadable metrics line: %r", line[:200])
    return records


class MetricsWriter:
    """JSON lines in ``path``, written by process 0 only."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.enabled = jax.process_index() == 0
        if self.enabled and os.path.exists(path):
            # Records past the checkpoint we resume from (all of them for a fresh start) would
            # otherwise be logged twice.
            with open(path) as f:
                kept = [r for r in _parse_lines(f) if resume_step > 0 and r["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return _parse_lines(f)
