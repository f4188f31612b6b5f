"""Multi-stage distillation: one engine run per stage, each starting from the previous stage's.

  python -m experiments.distill_stages --config=configs/distill_mohawk.py \
      --workdir=runs/mohawk --teacher=runs/teacher
  python -m experiments.distill_stages --config=configs/distill_mambainllama.py:25 \
      --workdir=runs/mil25 --teacher=runs/teacher --config.stages.e2e.num_steps=100

The engine runs one objective per run, and distillation changes the objective between stages
(MOHAWK: matrix alignment, hidden-state alignment, then KL) and, for MambaInLlama's stepwise
replacement, the student's architecture too. So each stage is its own run in
``WORKDIR/<k>_<stage>``, with its own schedule (a WSD or cosine decay restarting at the stage's
step 0) and frozen parameters, initialised with ``init_from``:

* ``init="teacher"``: from the teacher (``config.objective.teacher``), ``partial``: the embedding,
  norms, MLPs and the attention blocks a hybrid keeps are copied; the new mixers start from
  ``config.seed``. A Llama block's ``post_attention_norm`` becomes a Mamba block's
  ``post_mixer_norm`` (``init_from_map``).
* ``init="previous"``: from the previous stage's run (``run:WORKDIR/<k-1>_<stage>``): ``exact``
  when the architecture is unchanged, else ``partial`` with the same renames for layers the
  previous stage still ran as attention.

A config holds the student's engine config (as ``configs/lm_tiny.py``), ``stage_order`` (stage
names) and ``stages.<name>``: ``init``, ``warmup_fraction`` (the stage's warm-up as a fraction of
its ``num_steps``, at least one step; unset: ``optim.warmup_steps``) and any engine fields to
override in that stage (``num_steps``, ``objective``, ``optim``, ``model``, ...). Rerunning the
command resumes: a finished stage only reloads its last checkpoint. ``WORKDIR/stages.json``
lists the stages in the order they ran, with their workdirs, sources and final metrics.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxlab.eval import report
from jaxlab.train import loop

INITS = ("teacher", "previous")
STAGE_FIELDS = ("stages", "stage_order")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; only when run as a program, so that tests and other
    experiments can import this module beside another that defines the same names."""
    flags.DEFINE_string("workdir", None, "Directory of the stage runs and stages.json.")
    flags.DEFINE_string(
        "teacher",
        None,
        "The trained teacher: a run's workdir (run:DIR) or hf:PATH; sets config.objective.teacher.",
    )
    config_flags.DEFINE_config_file("config", None, "Distillation stages.", lock_config=True)
    flags.mark_flags_as_required(["config", "workdir"])


def _merge(target: ml_collections.ConfigDict, overrides, where: str) -> None:
    """Sets ``overrides``' fields in ``target``, recursing into sub-configs; a field the engine
    config lacks is an error naming it."""
    for key, value in overrides.items():
        if key not in target:
            raise ValueError(f"{where}.{key}: the engine config has no field {key!r}")
        if isinstance(value, ml_collections.ConfigDict | dict) and isinstance(
            target[key], ml_collections.ConfigDict
        ):
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = value


def norm_renames(source_attention, target_model) -> tuple[tuple[str, str], ...]:
    """``init_from_map`` pairs for layers that are Mamba blocks in ``target_model`` but attention
    blocks in the source (``source_attention``: their indices, or None for all, a Llama):
    ``layers/<i>/post_attention_norm`` -> ``layers/<i>/post_mixer_norm``."""
    attention = set(target_model.get("attention_layers", ()) or ())
    renames = []
    for i in range(target_model.num_layers):
        in_source = source_attention is None or i in source_attention
        if in_source and i not in attention:
            renames.append((f"layers/{i}/post_attention_norm", f"layers/{i}/post_mixer_norm"))
    return tuple(renames)


def stage_configs(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """``(name, engine config)`` per stage, in ``config.stage_order``, without ``init_from``
    (:func:`run_stages` fills it in from the stages' workdirs)."""
    order = tuple(config.stage_order)
    if not order or len(set(order)) != len(order):
        raise ValueError(f"config.stage_order must name distinct stages, got {list(order)}")
    missing = [name for name in order if name not in config.stages]
    if missing:
        raise ValueError(
            f"config.stage_order names {missing}, not in config.stages {list(config.stages)}"
        )
    base = ml_collections.ConfigDict(
        {k: v for k, v in config.to_dict().items() if k not in STAGE_FIELDS}
    )
    staged = []
    for name in order:
        stage = config.stages[name].to_dict()
        init = stage.pop("init", "previous")
        warmup_fraction = stage.pop("warmup_fraction", None)
        if init not in INITS:
            raise ValueError(f"config.stages.{name}.init must be one of {INITS}, got {init!r}")
        if init == "previous" and not staged:
            raise ValueError(
                f"config.stages.{name}.init='previous' in the first stage: no stage before it"
            )
        engine = ml_collections.ConfigDict(base.to_dict())
        _merge(engine, stage, f"config.stages.{name}")
        if warmup_fraction is not None:  # follows num_steps set on the command line
            if not 0 <= warmup_fraction <= 1:
                raise ValueError(
                    f"config.stages.{name}.warmup_fraction must be in [0, 1], got {warmup_fraction}"
                )
            engine.optim.warmup_steps = min(
                max(round(warmup_fraction * engine.num_steps), 1 if warmup_fraction else 0),
                engine.num_steps,
            )
        engine.init_from = init  # a marker until run_stages knows the source's workdir
        staged.append((name, engine))
    return staged


def run_stages(config, workdir: str) -> list[tuple[str, loop.TrainResult]]:
    """Runs (or resumes) every stage in ``WORKDIR/<k>_<name>``; writes ``WORKDIR/stages.json``.
    Returns ``(name, TrainResult)`` per stage, in order."""
    staged = stage_configs(config)
    results, summary, previous = [], [], None
    for k, (name, engine) in enumerate(staged):
        stage_dir = os.path.join(workdir, f"{k}_{name}")
        if engine.init_from == "teacher":
            engine.init_from = engine.objective.teacher
            if not engine.init_from:
                raise ValueError(
                    f"config.stages.{name}.init='teacher' needs config.objective.teacher "
                    "(or --teacher)"
                )
            engine.init_from_mode = "partial"
            engine.init_from_map = norm_renames(None, engine.model)
        else:
            previous_dir, previous_model = previous
            engine.init_from = f"run:{previous_dir}"
            same = previous_model.to_dict() == engine.model.to_dict()
            engine.init_from_mode = "exact" if same else "partial"
            engine.init_from_map = (
                ()
                if same
                else norm_renames(
                    tuple(previous_model.get("attention_layers", ()) or ()), engine.model
                )
            )
        result = loop.train_and_evaluate(engine, stage_dir)
        results.append((name, result))
        summary.append(
            dict(
                stage=name,
                workdir=stage_dir,
                objective=engine.objective.name,
                num_steps=engine.num_steps,
                init_from=engine.init_from,
                init_from_mode=engine.init_from_mode,
                frozen=list(engine.optim.frozen),
                schedule=engine.optim.schedule,
                train=result.train,
                eval=result.eval,
            )
        )
        previous = (stage_dir, engine.model)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "stages.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return results


def _report(workdir: str, results) -> None:
    doc = report.Report(f"Distillation stages: {workdir}").add(
        "One engine run per stage, in order; each started from the previous one "
        "(`stages.json`, and `config.json` and `metrics.jsonl` in each stage's workdir)."
    )
    rows = []
    for name, result in results:
        objective = result.experiment.config.objective.name
        loss = result.train.get("loss", float("nan"))
        rows.append(
            (name, objective, result.step, f"{loss:.4f}", f"{result.eval['eval_loss']:.4f}")
        )
    doc.table(
        ("stage", "objective", "steps", "last train loss", "held-out CE"), rows, align="llrrr"
    )
    report.write(workdir, doc, dict(stages=[name for name, _ in results]))


def teacher_source(value: str) -> str:
    """``run:DIR`` for a bare workdir; ``hf:``/``run:`` sources pass through."""
    return value if value.startswith(("run:", "hf:")) else f"run:{value}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    if FLAGS.teacher:
        config.objective.teacher = teacher_source(FLAGS.teacher)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    results = run_stages(config, FLAGS.workdir)
    for name, result in results:
        print(f"stage {name}: step {result.step}, eval {result.eval}")
    if jax.process_index() == 0:
        _report(FLAGS.workdir, results)


if __name__ == "__main__":
    define_flags()
    jax.config.config_with_absl()
    app.run(main)
