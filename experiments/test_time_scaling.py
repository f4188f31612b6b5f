r"""Test-time scaling under a fixed time budget (issue 21): coverage and majority vote of many
sampled chains of thought, against the measured seconds they cost, teacher against students.

For each model of ``experiment.models`` (``name=run:DIR[@STEP]`` or ``name=hf:PATH``, any
registered family, loaded with :func:`jaxlab.train.pretrained.load_model`; the first is the
reference, the teacher) draws ``num_samples`` completions at ``temperature`` for each of the first
``num_problems`` test problems of the task (``config.data.sources[0]``, the test difficulty) with
:func:`jaxlab.infer.test_time.draw_samples`, ``problems_per_call * num_samples`` rows at once:
the batch size at which seconds per sample are measured (compilation excluded). Answers are read
with :func:`jaxlab.data.reasoning.extract_answer`; a completion without one is a failure, counted
and never correct. For k = 1, 2, 4, ..., n: coverage (unbiased pass@k) and majority@k (first k
samples, ties to the earliest), each with a 95% bootstrap interval over problems; plotted against
k and against seconds per problem (k x seconds per sample). Each student's crossover with the
teacher on the seconds axis (:func:`jaxlab.infer.test_time.crossover`), with how often a
crossover exists when problems are resampled; chance levels (a uniform guess among the
``modulus`` values) are drawn beside the curves.

With ``experiment.models`` empty the experiment trains what it needs with the engine: the
teacher (the run config, ``configs/reasoning_lm.py``) in ``WORKDIR/teacher`` and, as a stand-in
student until distilled students exist, a Mamba LM of about the same size trained from scratch on
the same task (``config.student_model``) in ``WORKDIR/mamba_student``; finished runs there are
reused; with ``experiment.distill_workdir`` set instead (a finished ``experiments/distill`` run),
its teacher and the students of ``experiment.distill_students`` are compared. Writes
``REPORT.md``, ``results.json``, ``coverage_vs_seconds.png``, ``majority_vs_seconds.png`` and
``accuracy_vs_k.png`` in ``--workdir``.

  python -m experiments.test_time_scaling --workdir=runs/test_time_scaling
  python -m experiments.test_time_scaling --workdir=runs/tts \
      --config.experiment.models=teacher=run:runs/reasoning,hybrid=run:runs/hybrid
  python -m experiments.test_time_scaling --workdir=runs/test_time_scaling \
      --config.experiment.distill_workdir=runs/distill
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from experiments import run_config
from jaxlab.data import reasoning
from jaxlab.data.pipeline import make_tokenizer
from jaxlab.eval import report
from jaxlab.eval.plots import figure
from jaxlab.infer import test_time
from jaxlab.train import loop, pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This experiment's flags (:func:`experiments.run_config.define_flags`)."""
    run_config.define_flags(
        "test_time_scaling",
        "The teacher's run config with student_model and the experiment block.",
    )


LEVEL = 0.95
STUDENT = "mamba (stand-in, from scratch)"
# The paper's claims ("Thinking Slow, Fast", arXiv 2502.20339; brief sections 1.5-1.7): only the
# abstract's qualitative statement is verified; the speed figures come from secondary summaries.
PAPER = dict(
    majority="students' majority-vote accuracy overtakes their Llama-3.2 teachers' under fixed "
    "time budgets on MATH500/GSM8K (abstract, qualitative; crossover time not found)",
    coverage="students' coverage (pass@k) overtakes the teachers' under fixed time budgets "
    "(abstract, qualitative; crossover time not found)",
    speed="generation 'up to 4.2x' faster; 'similar accuracy with 2.5x lower inference time' "
    "(secondary summaries only, not in the abstract: unverified)",
)


def parse_models(spec: str) -> dict[str, str]:
    """``"teacher=run:DIR,hybrid=run:DIR@500"`` -> ``{name: source}`` in order (names unique)."""
    out: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, eq, source = item.partition("=")
        if not eq or not name.strip() or not source.strip():
            raise ValueError(
                f"config.experiment.models: each entry must be 'name=SOURCE' (SOURCE run:DIR, "
                f"run:DIR@STEP or hf:PATH), got {item!r} in {spec!r}"
            )
        if name.strip() in out:
            raise ValueError(f"config.experiment.models names {name.strip()!r} twice: {spec!r}")
        pretrained.parse_source(source.strip(), f"config.experiment.models[{name.strip()!r}]")
        out[name.strip()] = source.strip()
    return out


def distilled_models(distill_workdir: str, students) -> dict[str, str]:
    """The teacher and ``students`` of a finished ``experiments/distill`` run in
    ``distill_workdir`` (its ``results.json``), each student at its last stage:
    ``{name: "run:DIR"}``, the teacher first.

    The record's paths are relative to where ``experiments.distill`` ran; those inside its
    workdir (the students' stages, and the teacher unless it was a ``--teacher_workdir`` elsewhere)
    are found under ``distill_workdir`` by their place in it, so a moved workdir still resolves."""
    path = os.path.join(distill_workdir, "results.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"config.experiment.distill_workdir={distill_workdir!r}: no results.json there; "
            "run `python -m experiments.distill --workdir=...` to the end first"
        )
    with open(path) as f:
        record = json.load(f)
    runs, recorded_root = {}, None
    for name in students:
        if name not in record["students"]:
            raise ValueError(
                f"config.experiment.distill_students names {name!r}, which the run in "
                f"{distill_workdir!r} did not train (it has {sorted(record['students'])})"
            )
        # experiments/distill's layout: WORKDIR/student_NAME[/<k>_<stage>].
        folder = f"student_{name}"
        parts = os.path.normpath(record["students"][name]["stages"][-1]["workdir"]).split(os.sep)
        if folder not in parts:
            raise ValueError(
                f"{path}: student {name!r}'s last stage {'/'.join(parts)!r} is not inside "
                f"its folder {folder!r}"
            )
        at = len(parts) - 1 - parts[::-1].index(folder)
        recorded_root = parts[:at]
        runs[name] = os.path.join(distill_workdir, *parts[at:])
    teacher = record["teacher"]["workdir"]
    teacher_parts = os.path.normpath(teacher).split(os.sep)
    inside = recorded_root is not None and not os.path.isabs(teacher)
    if inside and teacher_parts[: len(recorded_root)] == recorded_root:
        teacher = os.path.join(distill_workdir, *teacher_parts[len(recorded_root) :])
    if not os.path.isdir(teacher):
        raise ValueError(
            f"config.experiment.distill_workdir={distill_workdir!r}: its teacher run "
            f"{record['teacher']['workdir']!r} (looked for at {teacher!r}) is not a directory"
        )
    return {"teacher": f"run:{teacher}", **{n: f"run:{d}" for n, d in runs.items()}}


def run_configs(base: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The teacher's and the stand-in student's run configs (``base`` without the experiment's
    own blocks; the student with ``student_model`` as its model)."""
    teacher = copy.deepcopy(base)
    with teacher.unlocked():
        del teacher["experiment"]
        del teacher["student_model"]
    student = copy.deepcopy(teacher)
    with student.unlocked():
        student.model = copy.deepcopy(base.student_model)
    return {"teacher": teacher, STUDENT: student}


def train_models(base, workdir: str) -> dict[str, str]:
    """Trains (or reuses) the teacher and the stand-in student; ``{name: "run:DIR"}``."""
    sources = {}
    for name, config in run_configs(base).items():
        run_dir = os.path.join(workdir, "teacher" if name == "teacher" else "mamba_student")
        print(f"--- training {name}: {run_dir}", flush=True)
        loop.train_and_evaluate(config, run_dir)
        sources[name] = f"run:{run_dir}"
    return sources


def k_grid(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n`` itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


def per_problem_curves(answers, references, ks) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and majority correctness per problem and k: two float ``[problems, len(ks)]``."""
    cov = np.stack([test_time.coverage(answers, references, k) for k in ks], axis=1)
    maj = np.stack([test_time.majority_at_k(answers, references, k) for k in ks], axis=1)
    return cov, maj.astype(np.float64)


def curve_stats(values: np.ndarray, resamples: int, seed: int) -> dict[str, list[float]]:
    """Mean over problems per k with its bootstrap interval."""
    intervals = [
        test_time.bootstrap_interval(values[:, j], level=LEVEL, resamples=resamples, seed=seed)
        for j in range(values.shape[1])
    ]
    return dict(
        mean=values.mean(axis=0).tolist(),
        low=[lo for lo, _ in intervals],
        high=[hi for _, hi in intervals],
    )


def lead(teacher_s, teacher_curve, student_s, student_curve) -> float:
    """The student's largest lead over the teacher (student - teacher, both interpolated) on the
    seconds both curves cover; -inf when they cover no common seconds."""
    lo, hi = max(teacher_s[0], student_s[0]), min(teacher_s[-1], student_s[-1])
    if lo > hi:
        return -np.inf
    grid = np.unique(np.concatenate([teacher_s, student_s, [lo, hi]]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    gap = np.interp(grid, student_s, student_curve) - np.interp(grid, teacher_s, teacher_curve)
    return float(gap.max())


def crossover_stats(
    teacher_s, teacher_values, student_s, student_values, resamples: int, seed: int
) -> dict:
    """Where the student's mean curve first reaches the teacher's (seconds per problem, or None),
    its largest lead there, and the fraction of bootstrap resamples of the problems (the same
    resample for both models) in which the student leads somewhere (lead > 0)."""
    at = test_time.crossover(teacher_s, teacher_values.mean(0), student_s, student_values.mean(0))
    rng = np.random.default_rng(seed)
    leads = 0
    for _ in range(resamples):
        rows = rng.integers(0, teacher_values.shape[0], teacher_values.shape[0])
        leads += (
            lead(teacher_s, teacher_values[rows].mean(0), student_s, student_values[rows].mean(0))
            > 0
        )
    common = [max(teacher_s[0], student_s[0]), min(teacher_s[-1], student_s[-1])]
    return dict(
        seconds=at,
        lead=lead(teacher_s, teacher_values.mean(0), student_s, student_values.mean(0)),
        bootstrap_fraction=leads / resamples,
        common_range_s=common,
    )


def chance(modulus: int, ks) -> dict[str, list[float]]:
    """A uniform guess among the ``modulus`` values: coverage ``1 - (1 - 1/m)^k`` for k
    independent guesses; majority ``1/m`` (the vote of uniform guesses is itself uniform)."""
    p = 1.0 / modulus
    return dict(coverage=[1.0 - (1.0 - p) ** k for k in ks], majority=[p for _ in ks], per_guess=p)


def check_tokenizer(name: str, source: str, tokenizer_name: str) -> None:
    """A ``run:`` model must have trained with ``config.data.tokenizer``: another tokenizer's ids
    would be read as other characters, and every sample would be wrong without an error."""
    if not source.startswith("run:"):
        return  # a Hugging Face model: load_model checks its path and vocabulary
    spec = pretrained.parse_source(source, f"config.experiment.models[{name!r}]")
    path = os.path.join(spec.path, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        trained = json.load(f).get("data", {}).get("tokenizer")
    if trained is not None and trained != tokenizer_name:
        raise ValueError(
            f"model {name!r} ({source}) trained with tokenizer {trained!r}, but "
            f"config.data.tokenizer is {tokenizer_name!r}; set it to the models' tokenizer"
        )


def sample_model(
    name: str, source: str, tokenizer, tokenizer_name: str, problems, e, max_new_tokens: int
) -> dict:
    """Draws and scores one model's samples; the per-problem answers stay in the result."""
    check_tokenizer(name, source, tokenizer_name)
    model = pretrained.load_model(source, f"config.experiment.models[{name!r}]")
    vocab = model.config.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ValueError(
            f"model {name!r} ({source}) has vocab_size {vocab} but the task's tokenizer has "
            f"{tokenizer.vocab_size} ids: it was not trained with config.data.tokenizer "
            f"{tokenizer_name!r}"
        )
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    begin = time.perf_counter()
    samples = test_time.draw_samples(
        model,
        tokenizer,
        [p.prompt for p in problems],
        num_samples=e.num_samples,
        extract=reasoning.extract_answer,
        max_new_tokens=max_new_tokens,
        temperature=e.temperature,
        problems_per_call=e.problems_per_call,
        seed=e.seed,
        stop_tokens=(tokenizer.eos_id,),
        add_bos=True,
    )
    return dict(
        source=source,
        family=type(model.config).__name__,
        parameters=int(params),
        samples=samples,
        wall_s=time.perf_counter() - begin,
    )


def plot_vs(results, metric: str, axis: str, path: str, title: str) -> None:
    """One metric's curves (95% bands) per model against ``axis`` ("seconds" or "k"), chance
    dashed."""
    fig, ax = figure((6, 4))
    ks = results["ks"]
    for i, (name, r) in enumerate(results["models"].items()):
        x = r["seconds_per_problem"] if axis == "seconds" else ks
        c = r[metric]
        ax.plot(x, c["mean"], marker="o", color=f"C{i}", label=name)
        ax.fill_between(x, c["low"], c["high"], color=f"C{i}", alpha=0.2)
        if axis == "seconds":
            ax.plot(x, results["chance"][metric], ls=":", color=f"C{i}", lw=1)
    if axis == "k":
        ax.plot(ks, results["chance"][metric], ls=":", color="gray", label="chance")
    ax.set_xscale("log", base=2 if axis == "k" else 10)
    ax.set_xlabel("samples per problem k" if axis == "k" else "seconds per problem (measured)")
    ax.set_ylabel("coverage (pass@k)" if metric == "coverage" else "majority@k accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    report.save_figure(fig, os.path.dirname(path) or ".", os.path.basename(path))


def plot_vs_k(results, path: str) -> None:
    fig, axes = figure((10, 4), ncols=2)
    ks = results["ks"]
    for ax, metric in zip(axes, ("coverage", "majority"), strict=True):
        for i, (name, r) in enumerate(results["models"].items()):
            c = r[metric]
            ax.plot(ks, c["mean"], marker="o", color=f"C{i}", label=name)
            ax.fill_between(ks, c["low"], c["high"], color=f"C{i}", alpha=0.2)
        ax.plot(ks, results["chance"][metric], ls=":", color="gray", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("samples per problem k")
        ax.set_ylabel("coverage (pass@k)" if metric == "coverage" else "majority@k accuracy")
        ax.legend(fontsize=7)
    report.save_figure(fig, os.path.dirname(path) or ".", os.path.basename(path))


# How often, over bootstrap resamples of the problems, the student must lead somewhere for an
# overtake to count: a lead in one resample in two is noise, not a result.
FIRM = 0.95


def budget_verdict(lead_value: float, bootstrap_fraction: float) -> str:
    """The fixed-budget verdict: "holds" when the mean curve leads and the student leads in at
    least :data:`FIRM` of the resamples; "does not hold" when the mean curve never leads and it
    leads in at most ``1 - FIRM``; else "inconclusive"."""
    if lead_value > 0 and bootstrap_fraction >= FIRM:
        return "holds"
    if lead_value <= 0 and bootstrap_fraction <= 1 - FIRM:
        return "does not hold"
    return "inconclusive"


def null_reason(results, teacher: str, student: str, metric: str) -> str:
    """Why a student's curve does not overtake the teacher's: its speed, how much the teacher
    still gains with k (sampling and voting headroom), and where the student ends."""
    t, s = results["models"][teacher], results["models"][student]
    speed = s["samples_per_s"] / t["samples_per_s"]
    gain = t[metric]["mean"][-1] - t[metric]["mean"][0]
    voting = t["coverage"]["mean"][-1] - t["majority"]["mean"][-1]
    return (
        f"student speed {speed:.2f}x the teacher's at {results['rows_per_call']} rows per call; "
        f"the student's best {metric} {max(s[metric]['mean']):.3f} vs the teacher's "
        f"{t[metric]['mean'][0]:.3f} at k=1; the teacher gains {gain:+.3f} from k=1 to "
        f"k={results['ks'][-1]}, and its voting headroom (coverage - majority at k="
        f"{results['ks'][-1]}) is {voting:.3f}"
    )


def claims_of(results, teacher: str) -> list[report.Claim]:
    """The claims per student, by the verdict rule of :func:`write_report` (fixed before the
    numbers are read)."""
    claims = []
    t = results["models"][teacher]
    for student, cross in results["crossovers"].items():
        s = results["models"][student]
        speed = s["samples_per_s"] / t["samples_per_s"]
        claims.append(
            report.Claim(
                f"{student} generates samples faster than {teacher}",
                PAPER["speed"],
                f"{speed:.2f}x samples/s at {results['rows_per_call']} rows per call",
                report.verdict(speed > 1.0),
            )
        )
        for metric in ("majority", "coverage"):
            c = cross[metric]
            span = f"{c['common_range_s'][0]:.3g}-{c['common_range_s'][1]:.3g} s"
            firm = f"the student leads in {c['bootstrap_fraction']:.0%} of bootstrap resamples"
            if c["lead"] > 0:
                ours = (
                    f"reaches the teacher at {c['seconds']:.3g} s per problem and leads by up to "
                    f"{c['lead']:.3f} in the common range {span}; {firm}"
                )
            else:
                ours = (
                    f"never ahead in the common range {span} (largest lead {c['lead']:.3f}; "
                    f"{firm}): " + null_reason(results, teacher, student, metric)
                )
            claims.append(
                report.Claim(
                    f"{student}'s {metric}@k overtakes {teacher}'s at a fixed time budget",
                    PAPER[metric],
                    ours,
                    budget_verdict(c["lead"], c["bootstrap_fraction"]),
                )
            )
    return claims


VERDICT_RULE = (
    "written before the run. Speed: holds when the student's samples per second at the batch "
    "used exceeds the teacher's. Fixed budget (majority, coverage): holds when the student's "
    "mean curve against seconds per problem (linear interpolation between the measured k) is "
    "strictly above the teacher's at some budget inside the range both curves cover (a tie, "
    "e.g. both at 0, is not an overtake) and the student leads somewhere in at least 95% of "
    "bootstrap resamples of the problems; it does not hold when the mean curve never leads and "
    "the student leads in at most 5% of the resamples, with the reason given (throughput ratio "
    "at this length and batch, the teacher's gain from voting or sampling, the student's best "
    "value); anything between is inconclusive."
)


def write_report(workdir: str, results: dict, teacher: str, claims) -> None:
    e = results["experiment"]
    doc = report.Report("Test-time scaling under a fixed time budget (issue 21)")
    doc.add(
        f"{e['num_problems']} test problems of `{results['task']}` (difficulty "
        f"{results['test_steps']}, answers modulo {results['modulus']}), n = {e['num_samples']} "
        f"samples each at temperature {e['temperature']}, up to {results['max_new_tokens']} new "
        f"tokens, stop at eos; {results['rows_per_call']} rows per generation call "
        f"({e['problems_per_call']} problems x {e['num_samples']} samples, one prefill per "
        f"problem) on {results['backend']}. Seconds per sample = timed generation seconds / "
        f"samples (compilation excluded, device work waited for), measured at that batch; seconds "
        f"per problem = k x seconds per sample. Coverage: unbiased pass@k; majority@k: vote of "
        f"the first k samples, ties to the earliest answer, no answer counts as wrong. Intervals: "
        f"{LEVEL:.0%} percentile bootstrap over problems ({e['bootstrap_resamples']} resamples)."
    )
    if results["trained_here"]:
        doc.add(
            "No models were given (`experiment.models` empty), so this run trained its own: the "
            "teacher from `configs/reasoning_lm.py` and, **as a stand-in student until distilled "
            f"students exist**, `{STUDENT}`: a pure Mamba-1 LM of about the teacher's size "
            "(`config.student_model`) trained from scratch on the same task, steps and optimizer. "
            "It is not a distilled student, so its accuracy says nothing about distillation; "
            "only its speed and the fixed-budget comparison carry over."
        )
    doc.add(
        f"Chance: a uniform guess among the {results['modulus']} values has coverage "
        f"1 - (1 - 1/{results['modulus']})^k (k = {results['ks'][-1]}: "
        f"{results['chance']['coverage'][-1]:.3f}) and majority accuracy "
        f"{results['chance']['per_guess']:.2f}; with answers mod {results['modulus']}, coverage "
        "at large k is close to chance even for a model that guesses (dotted lines in the plots)."
    )
    doc.section("Models")
    doc.table(
        (
            "model",
            "source",
            "family",
            "parameters",
            "s per sample",
            "samples/s",
            "vs " + teacher,
            "no answer",
            "mean tokens",
            "sampling wall s",
        ),
        [
            (
                name,
                f"`{r['source']}`",
                r["family"],
                f"{r['parameters']:,}",
                f"{r['seconds_per_sample']:.4g}",
                f"{r['samples_per_s']:,.1f}",
                f"{r['samples_per_s'] / results['models'][teacher]['samples_per_s']:.2f}x",
                f"{r['failures']} / {r['samples']}",
                f"{r['mean_tokens']:.1f}",
                f"{r['wall_s']:.1f}",
            )
            for name, r in results["models"].items()
        ],
        align="llllrrrrrr",
    )
    for metric, label in (("coverage", "Coverage (pass@k)"), ("majority", "Majority@k")):
        doc.section(f"{label}, mean [{LEVEL:.0%} interval]")
        doc.table(
            ("k", *results["models"], "chance"),
            [
                (
                    k,
                    *(
                        f"{r[metric]['mean'][j]:.3f} [{r[metric]['low'][j]:.3f}, "
                        f"{r[metric]['high'][j]:.3f}] @ {r['seconds_per_problem'][j]:.3g} s"
                        for r in results["models"].values()
                    ),
                    f"{results['chance'][metric][j]:.3f}",
                )
                for j, k in enumerate(results["ks"])
            ],
            align="r" * (len(results["models"]) + 2),
        )
    doc.section("Claims")
    if not claims:
        doc.add("Only one model was given: no student to compare with the teacher.")
    else:
        doc.claims(claims, rule=VERDICT_RULE)
    doc.images(
        ("coverage_vs_seconds.png", "coverage vs seconds"),
        ("majority_vs_seconds.png", "majority vs seconds"),
        ("accuracy_vs_k.png", "coverage and majority vs k"),
    )
    print(report.write(workdir, doc, results), end="")


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    workdir, base = FLAGS.workdir, run_config.from_flag(FLAGS["config"])
    e = base.experiment
    for name in ("num_problems", "num_samples", "problems_per_call", "bootstrap_resamples"):
        if int(e[name]) < 1:
            raise ValueError(f"config.experiment.{name} must be >= 1, got {e[name]!r}")
    os.makedirs(workdir, exist_ok=True)
    sources = parse_models(e.models)
    if sources and e.distill_workdir:
        raise ValueError(
            "config.experiment.models and config.experiment.distill_workdir both name the "
            f"models (got {e.models!r} and {e.distill_workdir!r}): set one of them"
        )
    if e.distill_workdir:
        sources = distilled_models(e.distill_workdir, tuple(e.distill_students))
    trained_here = not sources
    if trained_here:
        sources = train_models(base, workdir)
    teacher = next(iter(sources))

    task_spec = base.data.sources[0]
    task = reasoning.parse_spec(task_spec)
    if task.num_test < e.num_problems:
        task = dataclasses.replace(task, num_test=int(e.num_problems))
    problems = task.split("test")[: e.num_problems]
    references = [p.value for p in problems]
    # The models' own tokenizer: the reasoning task's in configs/reasoning_lm.py, the byte
    # tokenizer in a composition whose teacher was pretrained on text first.
    tokenizer = make_tokenizer(base.data)
    max_new_tokens = int(e.max_new_tokens) or max(len(p.answer) for p in problems) + 1
    ks = k_grid(int(e.num_samples))
    results = dict(
        task=task_spec,
        test_steps=list(task.test_steps),
        modulus=task.modulus,
        experiment=e.to_dict(),
        trained_here=trained_here,
        max_new_tokens=max_new_tokens,
        rows_per_call=int(e.problems_per_call * e.num_samples),
        backend=jax.default_backend(),
        ks=ks,
        chance=chance(task.modulus, ks),
        models={},
        paper=PAPER,
    )
    curves = {}
    for name, source in sources.items():
        print(f"--- sampling {name}: {source}", flush=True)
        drawn = sample_model(
            name, source, tokenizer, base.data.tokenizer, problems, e, max_new_tokens
        )
        samples = drawn.pop("samples")
        cov, maj = per_problem_curves(samples.answers, references, ks)
        curves[name] = dict(coverage=cov, majority=maj)
        sps = samples.seconds_per_sample
        results["models"][name] = dict(
            drawn,
            samples=int(samples.logprobs.size),
            failures=int(samples.failures),
            mean_tokens=float(samples.lengths.mean()),
            seconds=samples.seconds,
            seconds_per_sample=sps,
            samples_per_s=1.0 / sps,
            seconds_per_problem=test_time.seconds_axis(ks, sps).tolist(),
            coverage=curve_stats(cov, int(e.bootstrap_resamples), int(e.seed)),
            majority=curve_stats(maj, int(e.bootstrap_resamples), int(e.seed)),
            answers=samples.answers,
        )
    t_seconds = np.asarray(results["models"][teacher]["seconds_per_problem"])
    results["crossovers"] = {
        name: {
            metric: crossover_stats(
                t_seconds,
                curves[teacher][metric],
                np.asarray(results["models"][name]["seconds_per_problem"]),
                curves[name][metric],
                int(e.bootstrap_resamples),
                int(e.seed),
            )
            for metric in ("majority", "coverage")
        }
        for name in sources
        if name != teacher
    }
    claims = claims_of(results, teacher)
    results["claims"] = [dataclasses.asdict(c) for c in claims]
    n = e.num_samples
    plot_vs(
        results,
        "coverage",
        "seconds",
        os.path.join(workdir, "coverage_vs_seconds.png"),
        f"coverage vs seconds per problem (k = 1..{n}; bands {LEVEL:.0%}; dotted: chance)",
    )
    plot_vs(
        results,
        "majority",
        "seconds",
        os.path.join(workdir, "majority_vs_seconds.png"),
        f"majority@k vs seconds per problem (k = 1..{n}; bands {LEVEL:.0%}; dotted: chance)",
    )
    plot_vs_k(results, os.path.join(workdir, "accuracy_vs_k.png"))
    write_report(workdir, results, teacher, claims)


if __name__ == "__main__":
    define_flags()
    jax.config.config_with_absl()
    app.run(main)
