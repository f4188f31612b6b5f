"""All ten papers in one command: runs a reproduction set and writes one report over them.

  python -m experiments.reproduce --workdir=runs/demo                       # make demo
  python -m experiments.reproduce --config=configs/reproduce.py:repro --workdir=runs/repro
  python -m experiments.reproduce --only=acvi,udp --plan                    # what would run

Each experiment of the set (``configs/reproduce.py``) runs as its own process in
``WORKDIR/<name>`` with its output in ``WORKDIR/<name>/run.log``, one progress line across them;
a run that finished with the same arguments is skipped on a rerun (``--force`` reruns it), a run
that fails is reported as failed and the others go on. ``WORKDIR/REPORT.md`` (rewritten after
every run) gathers every paper's claims (``jaxlab.eval.claims``): the paper's number, ours, the
verdict by the rule each experiment fixed before its run, and the plots. The runs share jax's
persistent compilation cache in ``WORKDIR/.jax_cache`` (``JAX_COMPILATION_CACHE_DIR`` if set).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from jaxlab.eval import claims, report

FLAGS = flags.FLAGS
POLL_SECONDS = 1.0
QUIET_PROGRESS_SECONDS = 30.0  # how often a non-terminal output gets a progress line
COMPILATION_CACHE = ".jax_cache"  # in WORKDIR, unless JAX_COMPILATION_CACHE_DIR is set


def runs_of(config) -> list[claims.Run]:
    runs = [
        claims.Run(
            name=r.name,
            module=r.module,
            config=r.config,
            args=tuple(r.args),
            minutes=float(r.minutes),
            after=tuple(r.after),
            untestable=tuple(tuple(u) for u in r.get("untestable", ())),
            reports=bool(r.get("reports", True)),
        )
        for r in config.runs
    ]
    claims.check_runs(runs)
    return runs


def selected(runs: list[claims.Run], only: list[str]) -> list[claims.Run]:
    names = [r.name for r in runs]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"--only must name runs of the set {names}, got unknown {unknown}")
    return [r for r in runs if not only or r.name in only]


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:d}:{int(seconds) % 60:02d}"


def _last_line(path: str, width: int) -> str:
    """The last non-empty line of a log (progress bars end lines with carriage returns)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [s.strip() for s in tail.replace("\r", "\n").split("\n") if s.strip()]
    return lines[-1][:width] if lines else ""


def set_aside(root: str, run: claims.Run) -> str | None:
    """Moves the run's folder to ``NAME.prev-<time>`` when it holds a run of other arguments or
    of other runs it reads (or, with --force, any run), so the experiment starts afresh instead
    of resuming or refusing; nothing is deleted. Returns the new path, or None if nothing was
    moved."""
    workdir = os.path.join(root, run.name)
    record = claims.run_record(root, run.name)
    if not os.path.isdir(workdir) or not os.listdir(workdir):
        return None
    same = (
        record is not None
        and record.get("argv") == run.argv(root)
        and record.get("after", {}) == claims.dependency_stamps(root, run)
    )
    if same and not FLAGS.force:
        return None  # an interrupted or failed run of these arguments: the experiment resumes
    moved = f"{workdir}.prev-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    os.rename(workdir, moved)
    return moved


def run_one(root: str, run: claims.Run, index: int, total: int) -> bool:
    """Runs ``run`` as a subprocess with a progress line; records how it ended. True if it
    finished with exit status 0 and wrote its claims (if it is an experiment that reports)."""
    moved = set_aside(root, run)
    workdir = os.path.join(root, run.name)
    os.makedirs(workdir, exist_ok=True)
    for name in (report.RESULTS_FILE, report.REPORT_FILE):  # never a previous attempt's results
        if os.path.exists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))
    argv = run.argv(root)
    record = dict(
        module=run.module,
        argv=argv,
        started=time.time(),
        returncode=None,
        after=claims.dependency_stamps(root, run),
    )
    claims.write_run_record(root, run.name, record)
    log_path = os.path.join(workdir, claims.RUN_LOG)
    tty = sys.stdout.isatty()
    head = f"[{index}/{total}] {run.name} (expected ~{_clock(run.minutes * 60)})"
    if moved:
        print(f"{head}: its earlier run (other arguments, or --force) moved to {moved}")
    command = shlex.join(["python", *argv])
    print(f"{head}: {command}", flush=True)
    start = last_print = time.monotonic()
    status_line = False  # a tty's progress line is open (ended below)
    with open(log_path, "a") as log:
        log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}: {command}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Many runs compile the same programs (the same small models in several experiments,
        # the same student in its stages): jax's persistent cache shares them across processes.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, COMPILATION_CACHE))
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        while True:
            try:  # returns as soon as the run exits (a sleep would hold every run a poll longer)
                proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - start
            if tty:
                width = shutil.get_terminal_size().columns - 1
                line = f"{head} {_clock(elapsed)} | {_last_line(log_path, width)}"
                print("\r" + line[:width].ljust(width), end="", flush=True)
                status_line = True
            elif elapsed - (last_print - start) >= QUIET_PROGRESS_SECONDS:
                print(f"{head} {_clock(elapsed)} | {_last_line(log_path, 100)}", flush=True)
                last_print = time.monotonic()
    seconds = time.monotonic() - start
    record.update(seconds=seconds, returncode=proc.returncode)
    results = claims.results_of(root, run.name)
    if run.reports and proc.returncode == 0 and (results is None or "claims" not in results):
        record["error"] = f"exited 0 without writing claims to {report.RESULTS_FILE}"
        record["returncode"] = 1
    claims.write_run_record(root, run.name, record)
    if status_line:
        print()
    ok = claims.finished(root, run)
    print(f"{head}: {'done' if ok else 'FAILED'} in {_clock(seconds)}", flush=True)
    if not ok:
        with open(log_path, errors="replace") as f:
            print("".join(f.readlines()[-20:]), flush=True)
    return ok


def machine() -> str:
    """The CPU, core count, and jax's backend and version, asked of a child process: the
    runner itself never starts a jax backend, which would hold a TPU or most of a GPU's memory
    while the runs need it."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend(), jax.__version__)"],
        capture_output=True,
        text=True,
    )
    backend, _, version = probe.stdout.strip().partition(" ")
    jax_part = f"{backend} backend, jax {version}" if probe.returncode == 0 else "jax not found"
    return f"{model}, {os.cpu_count()} CPU cores, {jax_part}"


def write_summary(root: str, set_name: str, runs: list[claims.Run], where: str) -> str:
    records = [claims.run_record(root, r.name) or {} for r in runs]
    seconds = sum(rec.get("seconds", 0.0) for rec in records if rec.get("returncode") == 0)
    doc = claims.summary(
        root,
        runs,
        title=f"jaxlab: the ten papers, {set_name} set",
        preamble=(
            f"Written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {where}. "
            f"The finished runs took {_clock(seconds)} (min:s) of wall time in all, each as "
            f"recorded when it ran. Every run's command, log and full report are in its folder.",
        ),
    )
    report.write(root, doc)
    return os.path.join(root, report.REPORT_FILE)


def main(argv):
    del argv
    config, root = FLAGS.config, os.path.normpath(FLAGS.workdir)
    runs = runs_of(config)
    todo = selected(runs, FLAGS.only)
    print(f"{config.set} set: {len(todo)} runs in {root}")
    # A finished run reruns too when a run it reads reruns first (its stamp will change).
    rerun: set[str] = set()
    for r in todo:
        if FLAGS.force or not claims.finished(root, r) or any(a in rerun for a in r.after):
            rerun.add(r.name)
    plan = [
        (r.name, r.module, _clock(r.minutes * 60), "to run" if r.name in rerun else "done, skipped")
        for r in todo
    ]
    print("\n".join(report.table(("run", "module", "expected (min:s)", "state"), plan, "llrl")))
    expected = sum(r.minutes for r, p in zip(todo, plan, strict=True) if p[-1] == "to run")
    print(f"expected wall time of what is to run: {_clock(expected * 60)} (on 2 CPU cores)\n")
    if FLAGS.plan:
        return
    where = machine()
    failed = []
    for i, run in enumerate(todo, 1):
        if claims.finished(root, run) and not FLAGS.force:
            print(f"[{i}/{len(todo)}] {run.name}: finished before with these arguments, skipped")
            continue
        missing = [
            a for a in run.after if not claims.finished(root, next(r for r in runs if r.name == a))
        ]
        if missing:
            claims.write_run_record(
                root,
                run.name,
                dict(
                    module=run.module,
                    argv=run.argv(root),
                    returncode=1,
                    seconds=0.0,
                    error=f"needs {missing}, which did not finish",
                ),
            )
            print(
                f"[{i}/{len(todo)}] {run.name}: not run, it needs {missing}, which did not finish"
            )
            failed.append(run.name)
            continue
        if not run_one(root, run, i, len(todo)):
            failed.append(run.name)
        write_summary(root, config.set, runs, where)
    path = write_summary(root, config.set, runs, where)
    print(f"\nwrote {path}")
    if failed:
        raise SystemExit(
            f"runs that did not finish: {failed} (logs: {root}/<name>/{claims.RUN_LOG})"
        )


if __name__ == "__main__":
    flags.DEFINE_string("workdir", "runs/demo", "Directory of the set's runs and its REPORT.md.")
    flags.DEFINE_list("only", [], "Run only these runs of the set (the report covers all).")
    flags.DEFINE_bool("force", False, "Rerun runs that finished before.")
    flags.DEFINE_bool("plan", False, "Print the plan (runs, expected times, state) and stop.")
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(__file__), "..", "configs", "reproduce.py"),
        "The reproduction set: configs/reproduce.py:demo (default) or :repro.",
        lock_config=True,
    )
    app.run(main)
