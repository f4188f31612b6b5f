"""The training loop: ``train_and_evaluate(config, workdir)``.

Builds the experiment from ``config`` (:mod:`jaxlab.train.build`); resumes from the newest
checkpoint in ``workdir/checkpoints`` if there is one (exactly: parameters, optimizer, step and
data position); then trains with a progress bar, writes metrics as JSON lines to
``workdir/metrics.jsonl`` (:mod:`jaxlab.train.metrics_io`), evaluates held-out loss and perplexity
every ``config.eval_every`` steps (:mod:`jaxlab.train.evaluation`), checkpoints every
``config.checkpoint_every`` steps (keeping ``config.keep_checkpoints``), plots the loss curve
to ``workdir/loss.png``, and when it reaches ``config.num_steps`` with ``config.export_hf`` set,
writes the final parameters there as a Hugging Face checkpoint (:func:`export_hf`). A
non-finite loss, gradient norm or parameter norm stops the run before anything from that step
is saved, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from jaxlab import models
from jaxlab.data import pipeline
from jaxlab.train import host_memory, pretrained
from jaxlab.train import workdir as workdir_lib
from jaxlab.train.build import (  # noqa: F401  (the public names of the training engine, here)
    SOURCES_FILE,
    Experiment,
    build_experiment,
    compile_steps,
    init_state,
    initial_params,
    load_frozen,
    pin_sources,
    validate_config,
)
from jaxlab.train.checkpoint import Checkpointer, CheckpointSaveError
from jaxlab.train.evaluation import eval_sets, evaluate
from jaxlab.train.feed import Prefetcher, gather_data_state, process_feed
from jaxlab.train.metrics_io import MetricsWriter, read_metrics  # noqa: F401
from jaxlab.train.step import MODEL_INPUTS, TrainState


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`train_and_evaluate` returns.

    Attributes:
      step: the step the run stopped at (``config.num_steps``, or ``stop_at``).
      start_step: the step this call started from (0 for a fresh run, else the resumed checkpoint).
      train: the last train metrics fetched (``loss``, ``grad_norm``, ``tokens``, ...,
        ``tokens_per_s``); empty when this call ran no step.
      eval: the last held-out metrics: ``eval_loss`` and ``eval_perplexity``, and with
        ``config.eval_per_source`` also ``eval_loss/<source>`` and ``eval_perplexity/<source>``.
      initial_eval: the held-out metrics before any training (a fresh run), else None.
      init_from: the ``config.init_from`` report (copied, kept, unused names), else None.
      state: the final train state (on the experiment's shardings).
      experiment: what was built from the config (mesh, model graph, objective, ...).
      workdir: where checkpoints, metrics and plots were written.
      exported_hf: the Hugging Face directory written at the end (``config.export_hf``), else
        None.
    """

    step: int
    start_step: int
    train: dict[str, float]
    eval: dict[str, float]
    initial_eval: dict[str, float] | None
    init_from: dict[str, Any] | None
    state: TrainState
    experiment: Experiment
    workdir: str
    exported_hf: str | None = None

    @property
    def eval_by_source(self) -> dict[str, dict[str, float]]:
        """``{source: {"loss": ..., "perplexity": ...}}`` from :attr:`eval`; ``""`` is all
        sources together."""
        by_source: dict[str, dict[str, float]] = {}
        for key, value in self.eval.items():
            metric, _, source = key.partition("/")
            by_source.setdefault(source, {})[metric.removeprefix("eval_")] = value
        return by_source


def train_and_evaluate(config, workdir: str, *, stop_at: int | None = None) -> TrainResult:
    """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

    Args:
      config: the experiment ConfigDict (see ``configs/lm_tiny.py``).
      workdir: local directory for checkpoints, metrics, plots.
      stop_at: stop after this step (as if interrupted; the schedule still spans
        ``config.num_steps``). Checkpoints the stop step.

    Returns:
      A :class:`TrainResult`: the last train and eval metrics, the first eval (before any
      training, if this run started from scratch), the final state and the :class:`Experiment`.

    Raises:
      NonFiniteLossError: the loss, the gradient or the updated parameters stopped being finite;
        nothing from that step on was saved.

    From the first call on, XLA compiles of a second or more in this process are followed by
    returning freed heap memory to the operating system (:mod:`jaxlab.train.host_memory`).
    """
    host_memory.trim_after_compiles()  # compile garbage is not kept resident
    exp = build_experiment(config)
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.hold(workdir):  # one trainer per workdir
        return _train_and_evaluate(exp, workdir, stop_at)


def _check_resume(workdir: str, config_json: dict, allowed) -> Callable[[int, dict], None]:
    def check(step: int, stored: dict) -> None:
        changes = workdir_lib.config_changes(stored, config_json, allowed)
        if changes:
            raise workdir_lib.ConfigChangedError(
                f"{workdir}: the config differs from the one stored with checkpoint {step} in "
                f"{'; '.join(changes)}. Resuming would mix two runs; to change these fields "
                f"deliberately, list them in config.allow_changes (e.g. "
                f"--config.allow_changes=num_steps,optim.learning_rate), or use a new workdir"
            )

    return check


def _train_and_evaluate(exp: Experiment, workdir: str, stop_at: int | None) -> TrainResult:
    config = exp.config
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    components = exp.components
    objective = exp.objective
    # An objective may ask for its components to be sampled uniformly (a data mixer's weights
    # act on the gradients or the losses, not on the sampling).
    # Each process reads and tokenizes only the rows its devices hold.
    process_index, process_count, place = process_feed(exp.mesh, config.batch_size)
    data = pipeline.train_iterator(
        config.data,
        exp.tokenizer,
        config.seq_len,
        config.batch_size,
        components,
        weights=[1.0] * len(components) if objective.uniform_sampling else None,
        process_index=process_index,
        process_count=process_count,
    )
    eval_data = eval_sets(exp, components)

    lead = jax.process_index() == 0
    config_json = json.loads(config.to_json_best_effort())
    start = checkpointer.latest_step()
    init_from, initial_eval, latest_eval = None, None, None
    if start is None:  # a fresh run; a resumed one always starts from its own checkpoint
        params, report = initial_params(exp)
        state, start = init_state(exp, params), 0
        if report is not None:
            init_from = report
            if lead:
                with open(os.path.join(workdir, "init_from.json"), "w") as f:
                    json.dump(report, f, indent=2)
            if report["kept"] or report["unused"]:
                logging.warning(
                    "config.init_from %s: kept the initialisation of %s; did not use %s",
                    config.init_from,
                    report["kept"],
                    report["unused"],
                )
    else:
        checkpointer, start, (state, data_state, _) = workdir_lib.restore_newest_intact(
            checkpointer,
            workdir,
            lambda c, step: c.restore(step, exp.abstract_state),
            _check_resume(
                workdir, config_json, workdir_lib.allowed_fields(config.get("allow_changes", ()))
            ),
        )
        data.set_state(data_state)
    metrics_writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), start)
    if lead:  # the current config, and every config the run has used
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)
        with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
            f.write(json.dumps({"start_step": start, "config": config_json}) + "\n")
        pretrained.write_model_config(workdir, exp.model_config)

    frozen = load_frozen(exp, pin_sources(exp, workdir, fresh=start == 0))
    train_step, eval_step = compile_steps(exp)
    keys = (*MODEL_INPUTS, *objective.batch_keys)
    if start == 0:
        first = evaluate(exp, state.params, eval_data, eval_step)
        metrics_writer.write({"step": 0, **first})
        initial_eval = first
    last_saved = start if start > 0 else None
    end = min(config.num_steps, stop_at) if stop_at is not None else config.num_steps
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window_start = time.perf_counter()

    def last_good() -> str:
        if last_saved is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {last_saved} in {checkpointer.path(last_saved)}"

    def flush() -> dict[str, float]:
        """Fetches and writes pending metrics; raises at the first non-finite step."""
        nonlocal window_start
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
            if bad:
                raise NonFiniteLossError(
                    f"training {' and '.join(bad)} is {m[bad[0]]} at step {s}; {last_good()}"
                )
            metrics_writer.write({"step": s, **m})
        elapsed = time.perf_counter() - window_start
        window_start = time.perf_counter()
        if not fetched:
            return {}
        last = dict(fetched[-1][1])
        last["tokens_per_s"] = sum(m["tokens"] for _, m in fetched) / max(elapsed, 1e-9)
        return last

    progress = tqdm(
        total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, disable=not lead
    )
    prefetcher = Prefetcher(data)
    last_train: dict[str, float] = {}
    try:
        for step in range(start + 1, end + 1):
            batch = place(prefetcher.next(), keys)
            state, metrics = train_step(state, batch, frozen)
            pending.append((step, metrics))
            progress.update(1)
            should_eval = step % config.eval_every == 0 or step == end
            should_save = step % config.checkpoint_every == 0 or step == end
            if step % config.log_every == 0 or should_eval or should_save:
                last_train = flush() or last_train
                progress.set_postfix(
                    loss=f"{last_train.get('loss', float('nan')):.4f}",
                    tok_s=f"{last_train.get('tokens_per_s', 0):,.0f}",
                )
            if should_eval:
                result = evaluate(exp, state.params, eval_data, eval_step)
                metrics_writer.write({"step": step, **result})
                latest_eval = result
                if lead:  # the latest held-out numbers, overall and per source
                    with open(os.path.join(workdir, "eval.json"), "w") as f:
                        json.dump({"step": step, **result}, f, indent=2)
                if lead:
                    progress.write(
                        f"step {step}: eval loss {result['eval_loss']:.4f}, "
                        f"perplexity {result['eval_perplexity']:.3f}"
                    )
            if should_save:
                try:
                    checkpointer.save(
                        step,
                        state,
                        gather_data_state(prefetcher.state, process_count),
                        config_json,
                    )
                except CheckpointSaveError as e:
                    raise CheckpointSaveError(f"{e}; {last_good()}") from None
                if objective.on_checkpoint is not None and lead:
                    objective.on_checkpoint(workdir, state.objective)
                last_saved = step
            if should_eval or should_save:
                window_start = time.perf_counter()  # throughput counts training time only
    finally:
        prefetcher.close()
        progress.close()
        checkpointer.close()
    if latest_eval is None:  # nothing left to train (a finished run): report where it stands
        latest_eval = evaluate(exp, state.params, eval_data, eval_step)
    exported = None
    if config.get("export_hf") and end == config.num_steps:
        exported = export_hf_path(config, workdir)
        export_hf(exp, state.params, exported)
    if lead:
        from jaxlab.eval.plots import plot_loss_curve

        plot_loss_curve(read_metrics(workdir), os.path.join(workdir, "loss.png"))
    return TrainResult(
        step=end,
        start_step=start,
        train=last_train,
        eval=latest_eval,
        initial_eval=initial_eval,
        init_from=init_from,
        state=state,
        experiment=exp,
        workdir=workdir,
        exported_hf=exported,
    )


def export_hf_path(config, workdir: str) -> str:
    """Where ``config.export_hf`` points: an absolute path as it is, a relative one inside
    ``workdir``."""
    return os.path.join(workdir, config.export_hf)


def export_hf(exp: Experiment, params, path: str) -> None:
    """Writes ``params`` as a Hugging Face checkpoint directory at ``path``
    (:func:`jaxlab.interop.hf.save_hf_llama`, in ``config.export_hf_dtype``, default the
    parameter dtype).

    Every process takes part in gathering each parameter to the host (the whole model then sits
    in every host's memory, in the parameter dtype); process 0 writes. The conversion runs on
    the CPU backend, so an accelerator never holds a second copy of the model.
    """
    from jaxlab.interop.hf import save_hf_llama  # imported here: safetensors, when exporting

    host = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return
    with jax.default_device(jax.devices("cpu")[0]):
        graphdef, state = nnx.split(
            nnx.eval_shape(lambda: models.build(exp.model_config, nnx.Rngs(0)))
        )
        nnx.replace_by_pure_dict(state, host)
        model = nnx.merge(graphdef, state)
        save_hf_llama(model, path, dtype=exp.config.get("export_hf_dtype") or None)
    logging.info("exported the final parameters to %s", path)
