"""The one writer of an experiment's outputs: ``REPORT.md``, ``results.json`` and its figures.

An experiment builds a :class:`Report` (paragraphs, tables, the claims table, figures) and hands
it with its results to :func:`write`. A reproduction states each claim it checks in the claims
table (claim, the paper's number, ours, verdict) together with the rule that turns the numbers
into the verdict, so a reader can re-derive every verdict from the table.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from matplotlib.figure import Figure

REPORT_FILE = "REPORT.md"
RESULTS_FILE = "results.json"
_ALIGN = {"l": "---", "r": "---:", "c": ":---:"}


@dataclasses.dataclass(frozen=True)
class Claim:
    """One row of the claims table: what the paper claims, its number, ours and the verdict
    (one of :data:`VERDICTS`)."""

    claim: str
    paper: str
    ours: str
    verdict: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(
                f"Claim {self.claim!r}: verdict must be one of {VERDICTS}, got {self.verdict!r}"
            )


# What a claim's rule decided: it held, it did not, the numbers do not decide (for example a
# difference within twice its standard error), or the run did not measure it; and what a
# reproduction set declares before its run (jaxlab.eval.claims): its size cannot decide it.
NOT_TESTABLE = "not testable at this scale"
VERDICTS = ("holds", "does not hold", "inconclusive", "not measured", NOT_TESTABLE)


def verdict(holds: bool | None) -> str:
    """A verdict from a rule's outcome (None: not measured)."""
    return "not measured" if holds is None else "holds" if holds else "does not hold"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """Markdown table lines. ``align`` has one letter per column, ``l`` (the default), ``r`` or
    ``c``; cells are written with ``str``."""
    if align and len(align) != len(header):
        raise ValueError(f"align={align!r} must have one letter per column ({len(header)})")
    unknown = set(align) - set(_ALIGN)
    if unknown:
        raise ValueError(f"align={align!r} may only hold l, r, c; got {sorted(unknown)}")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(_ALIGN[a] for a in align or "l" * len(header)) + "|",
    ]
    for row in rows:
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"table row {row!r} has {len(row)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines


def _cell(value: Any) -> str:
    """A table cell: ``str(value)`` with ``|`` escaped and newlines as ``<br>``, so free text
    keeps the table's shape."""
    return str(value).replace("|", r"\|").replace("\n", "<br>")


class Report:
    """A Markdown report, built block by block (each block is a list of lines; blocks are
    separated by one blank line)."""

    def __init__(self, title: str):
        self.lines = [f"# {title}"]
        self.claims_rules: list[str] = []  # the rule of each claims table, for results.json

    def add(self, *lines: str) -> Report:
        """A block of lines as they are (a paragraph: the lines of one sentence or more)."""
        self.lines += ["", *lines]
        return self

    def section(self, title: str) -> Report:
        return self.add(f"## {title}")

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = ""):
        """A table block (see :func:`table`)."""
        return self.add(*table(header, rows, align))

    def claims(self, claims: Sequence[Claim], rule: str) -> Report:
        """The claims table, preceded by the verdict rule that decides each verdict."""
        rows = [(c.claim, c.paper, c.ours, c.verdict) for c in claims]
        self.claims_rules.append(rule)
        self.add(f"Verdict rule: {rule}")
        return self.table(("claim", "paper", "ours", "verdict"), rows)

    def images(self, *images: tuple[str, str]) -> Report:
        """One line of images, ``(file name in the workdir, alt text)`` each."""
        return self.add(" ".join(f"![{alt}]({name})" for name, alt in images))

    def markdown(self) -> str:
        return "\n".join(self.lines) + "\n"


def write(workdir: str, report: Report, results: dict[str, Any] | None = None) -> str:
    """Writes ``workdir/REPORT.md`` and, given ``results``, ``workdir/results.json`` (indented
    JSON; with the report's claims tables' verdict rules as ``claims_rule``, so that a combined
    report can show each claim with its rule). Returns the Markdown."""
    os.makedirs(workdir, exist_ok=True)
    if results is not None and report.claims_rules:
        results = {**results, "claims_rule": " ".join(report.claims_rules)}
    text = report.markdown()
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
        f.write(text)
    if results is not None:
        with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
            json.dump(results, f, indent=2)
    return text


def save_figure(fig: Figure, workdir: str, name: str, dpi: int = 120) -> str:
    """Saves a figure of :func:`jaxlab.eval.plots.figure` as ``workdir/name``; returns the path."""
    path = os.path.join(workdir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
