"""The ten papers, the experiments that test their claims, and the one report that gathers them.

Each experiment owns its claims: it states them, with the paper's number and a verdict rule fixed
in its code before the run, and writes them to its ``results.json`` (``claims``, ``claims_rule``;
see :mod:`jaxlab.eval.report`). This module is the index over them: :data:`PAPERS` says which
experiment runs test which paper (and :data:`COMPOSITIONS` which runs put several papers' parts
together), :func:`run_record` / :func:`finished` keep track of what a reproduction has run, and
:func:`summary` writes the combined ``REPORT.md``: one table with every claim of every paper and
composition, then one section per paper with its claims, its verdict rule and its plots.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from jaxlab.eval import report

RUN_RECORD = "reproduce.json"  # what the runner ran in a run's directory, and how it ended
RUN_LOG = "run.log"  # the run's output


@dataclasses.dataclass(frozen=True)
class Paper:
    """One of the ten results (``number`` 1-10), or a composition of several (a letter):
    ``runs`` names the runs whose claims test it."""

    number: int | str
    title: str
    result: str
    runs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Run:
    """One experiment run of a reproduction set: ``python -m module --config=config *args`` in
    ``root/name``.

    ``config`` is the experiment's config file (with ``:arg`` if it takes one; empty: the
    experiment's default). ``args`` may hold ``{root}`` (the set's directory), so a run can read
    another's outputs; it then names that run in ``after``. ``minutes`` is its expected wall time
    on 2 CPU cores. ``untestable``: ``(text, reason)`` pairs declared before the run: its claims
    whose text holds ``text`` (``"*"``: all) cannot be decided at this size, for ``reason``.
    ``reports``: the run is an experiment that writes claims to its ``results.json``; False for
    an engine run (``experiments.train_lm``) whose outputs a later run reads: it has finished
    when it exited with status 0.
    """

    name: str
    module: str
    config: str = ""
    args: tuple[str, ...] = ()
    minutes: float = 1.0
    after: tuple[str, ...] = ()
    untestable: tuple[tuple[str, str], ...] = ()
    reports: bool = True

    def argv(self, root: str) -> list[str]:
        """The command line, ``--workdir`` included."""
        config = [f"--config={self.config}"] if self.config else []
        return [
            "-m",
            self.module,
            f"--workdir={os.path.join(root, self.name)}",
            *config,
            *(a.replace("{root}", root) for a in self.args),
        ]


PAPERS = (
    Paper(
        1,
        "AdEMAMix (Pagliardini, Ablin, Grangier 2024)",
        "Adam with a second, very slow EMA of gradients mixed in; matches AdamW trained on about "
        "twice the tokens and forgets training data more slowly.",
        ("ademamix_lm",),
    ),
    Paper(
        2,
        "DenseFormer (Pagliardini, Mohtashami, Fleuret, Jaggi 2024)",
        "After each block, a learned depth-weighted average of all earlier representations: a "
        "DenseFormer beats a deeper standard Transformer at equal perplexity or speed.",
        ("denseformer_lm",),
    ),
    Paper(
        3,
        "CoTFormer (Mohtashami, Pagliardini, Jaggi 2025)",
        "A shared block repeated with each repeat attending to earlier repeats' tokens (implicit "
        "chain of thought) beats the Block Universal Transformer; a router adapts depth per token.",
        ("cotformer_lm",),
    ),
    Paper(
        4,
        "Sparse Flash Attention (Pagliardini, Paliotta, Jaggi, Fleuret 2023)",
        "Flash-attention kernels for query/key dropping and hash-bucket attention, causal on "
        "original positions, train language models faster at long sequences with no loss of "
        "perplexity.",
        ("sparse_lm",),
    ),
    Paper(
        5,
        "Thinking Slow, Fast (Paliotta, Wang, Pagliardini, ..., Dao 2025)",
        "Pure and hybrid Mamba students distilled from a Llama teacher generate faster, so with "
        "many samples they beat the teacher under a fixed time budget.",
        ("distill", "test_time_scaling"),
    ),
    Paper(
        6,
        "Layer Parallelism (Calvo Gonzalez, Paliotta, Pagliardini, Jaggi, Fleuret 2025)",
        "Pairs of middle layers of a pretrained LLM evaluated in parallel on the same input: about "
        "1.2x tokens/s keeping 95-99% of accuracy, with no retraining.",
        ("layer_parallel",),
    ),
    Paper(
        7,
        "MEDITRON (Chen et al. 2023)",
        "Continued pretraining of Llama-2 on curated medical text with replay (GAP-Replay), then "
        "finetuning, beats the same pipeline without continued pretraining on medical QA.",
        ("meditron",),
    ),
    Paper(
        8,
        "DoGE (Fan, Pagliardini, Jaggi 2023)",
        "Domain weights learned by a small proxy model from gradient alignment between domains "
        "train a better model than uniform or DoReMi weights.",
        ("doge",),
    ),
    Paper(
        9,
        "ACVI last iterate (Chavdarova, Yang, Pagliardini, Jordan 2024)",
        "An ADMM-based interior-point method for constrained variational inequalities with an "
        "O(1/sqrt(K)) last-iterate gap for monotone operators; inexact and projection variants.",
        ("acvi",),
    ),
    Paper(
        10,
        "UDP (Pagliardini, Manunza, Jaggi, Jordan, Chavdarova 2022)",
        "Training on points perturbed towards higher model uncertainty reaches max-margin "
        "boundaries on linear models and reduces simplicity bias.",
        ("udp",),
    ),
)


COMPOSITIONS = (
    Paper(
        "A",
        "Composition A (DenseFormer with sparse attention and AdEMAMix on a DoGE mixture, "
        "distilled into Mamba hybrids, with test-time scaling)",
        "A DenseFormer with hash-bucket sparse attention, trained with AdEMAMix on a DoGE-"
        "reweighted mixture of the embedded corpus and then on the arithmetic task, distilled "
        "into Mamba hybrids that keep its depth-weighted averages and sparse attention, then "
        "sampled under a time budget (configs/composition.py; the first two runs are engine runs "
        "without claims).",
        ("compose_mixture", "compose_pretrain", "compose_distill", "compose_tts"),
    ),
    Paper(
        "B",
        "Composition B (Layer Parallelism on the MEDITRON model)",
        "Layer Parallelism applied to the MEDITRON run's continued-pretrained model as it is.",
        ("layer_parallel_meditron",),
    ),
)


def check_runs(runs: Sequence[Run], papers: Sequence[Paper] = PAPERS) -> None:
    """Raises ValueError unless ``runs`` has unique names, every run named in ``after`` comes
    earlier, and every paper's runs are there."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs must have unique names, got {names}")
    seen: set[str] = set()
    for r in runs:
        late = [a for a in r.after if a not in seen]
        if late:
            raise ValueError(f"run {r.name!r}: after={late} must name runs listed before it")
        seen.add(r.name)
    missing = sorted({n for p in papers for n in p.runs} - seen)
    if missing:
        raise ValueError(f"runs must include every paper's runs; missing {missing}")


def _read_json(path: str) -> dict[str, Any] | None:
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_record(root: str, name: str) -> dict[str, Any] | None:
    """What the runner recorded for run ``name`` (argv, seconds, returncode), or None."""
    return _read_json(os.path.join(root, name, RUN_RECORD))


def write_run_record(root: str, name: str, record: Mapping[str, Any]) -> None:
    path = os.path.join(root, name, RUN_RECORD)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(record), f, indent=2)
    os.replace(path + ".tmp", path)


def results_of(root: str, name: str) -> dict[str, Any] | None:
    return _read_json(os.path.join(root, name, report.RESULTS_FILE))


def dependency_stamps(root: str, run: Run) -> dict[str, float | None]:
    """When each run that ``run`` reads (``after``) started, from their records: a run is
    stale when one of them ran again since."""
    return {a: (run_record(root, a) or {}).get("started") for a in run.after}


def finished(root: str, run: Run) -> bool:
    """Whether ``run`` ended well with these same arguments, on the current outputs of the runs
    it reads, and (an experiment that reports) its results hold claims: a rerun of the set skips
    it."""
    record = run_record(root, run.name)
    results = results_of(root, run.name)
    return (
        record is not None
        and record.get("returncode") == 0
        and record.get("argv") == run.argv(root)
        and record.get("after", {}) == dependency_stamps(root, run)
        and (not run.reports or (results is not None and "claims" in results))
    )


def _reason(run: Run, claim: str) -> str | None:
    """Why ``claim`` of ``run`` is not testable at the set's size, or None."""
    for text, reason in run.untestable:
        if text == "*" or text in claim:
            return reason
    return None


def _unmatched(run: Run, claimed: Sequence[report.Claim]) -> list[str]:
    """Declared untestable texts that name none of the run's claims (a renamed claim)."""
    return [t for t, _ in run.untestable if t != "*" and not any(t in c.claim for c in claimed)]


def run_claims(root: str, run: Run) -> list[report.Claim]:
    """The claims of a finished run, with those declared untestable at this size shown as
    ``report.NOT_TESTABLE``, the rule's verdict and the reason kept in ``ours``. Empty if the
    run did not finish."""
    if not run.reports or not finished(root, run):
        return []
    out = []
    for c in results_of(root, run.name).get("claims", []):
        try:
            c = report.Claim(**c)
        except (TypeError, ValueError) as error:  # one bad file must not stop the whole report
            c = report.Claim(
                str(c), "", f"unreadable claim in results.json: {error}", "not measured"
            )
        reason = _reason(run, c.claim)
        if reason is not None:
            c = dataclasses.replace(
                c,
                ours=f"{c.ours} (the rule says: {c.verdict}; {reason})",
                verdict=report.NOT_TESTABLE,
            )
        out.append(c)
    return out


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _run_state(root: str, run: Run) -> str:
    record = run_record(root, run.name)
    if record is None:
        return "not run"
    if finished(root, run):
        return f"finished in {_minutes(record.get('seconds', 0.0))}"
    if record.get("returncode") is None:
        return f"interrupted (log: `{run.name}/{RUN_LOG}`)"
    if record.get("returncode") != 0:
        why = record.get("error") or f"exit status {record.get('returncode')}"
        return f"failed ({why}; log: `{run.name}/{RUN_LOG}`)"
    return "finished with other arguments or on other outputs of the runs it reads: to rerun"


def summary(
    root: str,
    runs: Sequence[Run],
    title: str,
    preamble: Sequence[str] = (),
    papers: Sequence[Paper] = PAPERS,
    compositions: Sequence[Paper] = COMPOSITIONS,
) -> report.Report:
    """The combined report of the runs in ``root``: a table of every paper's claims with the
    paper's number, ours and the verdict, then a section per paper (its runs, claims with their
    rules, plots). A paper whose runs did not finish says so in the table instead of claims.
    The compositions whose runs are all in ``runs`` follow the papers, as papers do; other runs
    come last."""
    by_name = {r.name: r for r in runs}
    papers = [*papers, *(c for c in compositions if all(n in by_name for n in c.runs))]
    doc = report.Report(title)
    if preamble:
        doc.add(*preamble)
    doc.add(
        "Verdicts: **holds** / **does not hold** by the rule each experiment fixed before its "
        "run (in its section below); **inconclusive**: the numbers do not decide at this scale "
        "(for example a difference within its noise); **not measured**: this run could not test "
        "it, with the reason in 'ours'; **not testable at this scale**: declared before the run "
        "(in the set's config) as not decidable at this size, with the rule's verdict and the "
        "reason in 'ours'."
    )
    others = [r for r in runs if all(r.name not in p.runs for p in papers)]
    groups = [(_label(p), p.runs) for p in papers]
    groups += [(r.name, (r.name,)) for r in others]
    rows, missing = [], []
    for label, names in groups:
        for name in names:
            claimed = run_claims(root, by_name[name])
            rows += [(label, c.claim, c.paper, c.ours, c.verdict) for c in claimed]
            if not claimed and (by_name[name].reports or not finished(root, by_name[name])):
                state = f"{name}: {_run_state(root, by_name[name])}"
                rows.append((label, f"(no results from {name})", "", state, "not measured"))
                missing.append(name)
    doc.add("At a glance, claims per verdict (the table after it has every claim):")
    doc.table(("paper", *report.VERDICTS), glance(groups, rows), "l" + "r" * len(report.VERDICTS))
    if missing:
        doc.add(f"Runs without results: {', '.join(missing)}.")
    doc.table(("paper", "claim", "paper's number", "ours", "verdict"), rows)
    for paper in papers:
        doc.section(
            paper.title if isinstance(paper.number, str) else f"{paper.number}. {paper.title}"
        )
        doc.add(paper.result)
        for name in paper.runs:
            _run_section(doc, root, by_name[name])
    if others:
        doc.section("Other runs")
    for run in others:
        doc.add(f"### {run.name}")
        _run_section(doc, root, run)
    return doc


def glance(groups, rows) -> list[tuple]:
    """Per paper (or other run) and in all, how many claims got each verdict; placeholder rows
    of runs without results are not claims."""
    claims_only = [r for r in rows if not r[1].startswith("(no results")]
    out = []
    for label in [g[0] for g in groups] + ["all"]:
        mine = [r for r in claims_only if label in ("all", r[0])]
        out.append((label, *(sum(r[-1] == v for r in mine) for v in report.VERDICTS)))
    return out


def _run_section(doc: report.Report, root: str, run: Run) -> None:
    """A run's command, state, claims with their rule, and plots."""
    name = run.name
    outputs = (
        f"its full report: [{name}/REPORT.md]({name}/{report.REPORT_FILE})"
        if run.reports
        else f"an engine run without claims, its outputs in [{name}/]({name}/)"
    )
    doc.add(
        f"Run `{name}`: `{shlex.join(['python', *run.argv(root)])}`; {_run_state(root, run)}; "
        f"{outputs}."
    )
    if not finished(root, run):
        return
    rule = (results_of(root, name) or {}).get("claims_rule")
    if rule:
        doc.add(f"Verdict rule: {rule}")
    claimed = run_claims(root, run)
    unmatched = _unmatched(run, claimed)
    if unmatched:
        doc.add(f"Declared not testable at this size but matching no claim: {unmatched}.")
    if claimed:
        doc.table(
            ("claim", "paper", "ours", "verdict"),
            [(c.claim, c.paper, c.ours, c.verdict) for c in claimed],
        )
    plots = sorted(glob.glob(os.path.join(root, name, "*.png")))
    if plots:
        doc.images(*((f"{name}/{os.path.basename(p)}", os.path.basename(p)) for p in plots))


def _label(paper: Paper) -> str:
    """A paper's number and name without its authors (``3. CoTFormer``); a composition's name
    without its description (``Composition A``)."""
    short = paper.title.split(" (")[0]
    return short if isinstance(paper.number, str) else f"{paper.number}. {short}"
