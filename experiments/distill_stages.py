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
* ``init="source"``: from a model the caller names (``--source`` or :func:`distill`'s
  ``source``: ``run:DIR[@STEP]`` or ``hf:PATH``), e.g. a student built by
  :func:`jaxlab.distill.transfer` and written with
  :func:`jaxlab.train.pretrained.save_model_source`: ``exact`` when the source's architecture is
  the stage's, else ``partial`` with the renames for layers the source runs as attention (every
  layer of a Llama).
* ``init="previous"``: from the previous stage's run (``run:WORKDIR/<k-1>_<stage>``): ``exact``
  when the architecture is unchanged, else ``partial`` with the same renames for layers the
  previous stage still ran as attention.

A config holds the student's engine config (as ``configs/lm_tiny.py``), ``stage_order`` (stage
names) and ``stages.<name>``: ``init``, ``warmup_fraction`` (the stage's warm-up as a fraction of
its ``num_steps``, at least one step; unset: ``optim.warmup_steps``) and any engine fields to
override in that stage (``num_steps``, ``objective``, ``optim``, ``model``, ...). Rerunning the
command resumes: a finished stage only reloads its last checkpoint. ``WORKDIR/stages.json``
lists the stages in the order they ran, with their workdirs, sources and final metrics.
:func:`distill` runs the stages in-process (what ``main`` does with the flags), e.g. from
``experiments/distill.py``.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxlab import models
from jaxlab.eval import report
from jaxlab.train import loop, pretrained

INITS = ("teacher", "source", "previous")
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
    flags.DEFINE_string(
        "source",
        None,
        "The model a stage with init='source' starts from: run:DIR[@STEP] or hf:PATH.",
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
        if "warmup_alpha_b3" in engine.optim:  # AdEMAMix's alpha/beta3 warm-up spans the stage
            engine.optim.warmup_alpha_b3 = engine.num_steps
        engine.init_from = init  # a marker until run_stages knows the source's workdir
        staged.append((name, engine))
    return staged


def _start_from(engine, source: str, source_attention, same: bool) -> None:
    """Sets ``engine.init_from*``: ``exact`` from ``source`` when ``same`` (its architecture is
    the stage's), else ``partial`` with the norm renames of :func:`norm_renames`."""
    engine.init_from = source
    engine.init_from_mode = "exact" if same else "partial"
    engine.init_from_map = () if same else norm_renames(source_attention, engine.model)


def _source_architecture(source: str, engine, name: str) -> tuple[tuple[int, ...] | None, bool]:
    """The attention layers of ``source``'s model (None: a model without Mamba layers, every
    layer attention) and whether its architecture is the stage's."""
    field = f"source (config.stages.{name}.init='source')"
    source_config = pretrained.source_model_config(pretrained.parse_source(source, field))
    values = engine.model.to_dict()
    values["vocab_size"] = values.get("vocab_size") or source_config.vocab_size
    same = not pretrained.architecture_differences(models.make_config(values), source_config)
    attention = getattr(source_config, "attention_layers", None)
    return (None if attention is None else tuple(attention)), same


def run_stages(
    config, workdir: str, source: str | None = None
) -> list[tuple[str, loop.TrainResult]]:
    """Runs (or resumes) every stage in ``WORKDIR/<k>_<name>``; writes ``WORKDIR/stages.json``.
    ``source`` (``run:DIR[@STEP]`` or ``hf:PATH``) is what stages with ``init="source"`` start
    from. Returns ``(name, TrainResult)`` per stage, in order."""
    staged = stage_configs(config)
    results, summary, previous = [], [], None
    for k, (name, engine) in enumerate(staged):
        stage_dir = os.path.join(workdir, f"{k}_{name}")
        if engine.init_from == "teacher":
            if not engine.objective.teacher:
                raise ValueError(
                    f"config.stages.{name}.init='teacher' needs config.objective.teacher "
                    "(or --teacher)"
                )
            _start_from(engine, engine.objective.teacher, None, same=False)
        elif engine.init_from == "source":
            if not source:
                raise ValueError(
                    f"config.stages.{name}.init='source' needs a source (--source, or "
                    f"distill(source=...)): run:DIR or hf:PATH, got {source!r}"
                )
            _start_from(engine, source, *_source_architecture(source, engine, name))
        else:
            previous_dir, previous_model = previous
            _start_from(
                engine,
                f"run:{previous_dir}",
                tuple(previous_model.get("attention_layers", ()) or ()),
                same=previous_model.to_dict() == engine.model.to_dict(),
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


def distill(
    config, workdir: str, *, teacher: str | None = None, source: str | None = None
) -> list[tuple[str, loop.TrainResult]]:
    """Runs (or resumes) the stages of ``config`` in ``workdir`` and writes its report: what the
    program does with its flags, callable in-process.

    Args:
      config: a stages config (as ``configs/distill_mohawk.py``); not modified.
      workdir: where the stage runs, ``stages.json`` and ``REPORT.md`` go (made if missing).
      teacher: if given, ``config.objective.teacher`` (a bare workdir becomes ``run:DIR``).
      source: what stages with ``init="source"`` start from (``run:DIR[@STEP]``, ``hf:PATH``).

    Returns:
      ``(name, TrainResult)`` per stage, in order; the last is the final stage (its
      ``workdir``, ``state`` and ``eval`` metrics).
    """
    if teacher:
        config = ml_collections.ConfigDict(config.to_dict())
        config.objective.teacher = teacher_source(teacher)
    os.makedirs(workdir, exist_ok=True)
    results = run_stages(config, workdir, source)
    if jax.process_index() == 0:
        _report(workdir, results)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    results = distill(FLAGS.config, FLAGS.workdir, teacher=FLAGS.teacher, source=FLAGS.source)
    for name, result in results:
        print(f"stage {name}: step {result.step}, eval {result.eval}")


if __name__ == "__main__":
    define_flags()
    jax.config.config_with_absl()
    app.run(main)
