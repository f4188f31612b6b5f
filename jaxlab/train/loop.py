"""The training loop: ``train_and_evaluate(config, workdir)``.

Builds the mesh, data, model and optimizer from ``config``; resumes from the newest checkpoint in
``workdir/checkpoints`` if there is one (exactly: parameters, optimizer, step and data position);
then trains with a progress bar, writes metrics as JSON lines to ``workdir/metrics.jsonl``,
evaluates held-out loss and perplexity every ``config.eval_every`` steps, checkpoints every
``config.checkpoint_every`` steps (keeping ``config.keep_checkpoints``), and plots the loss curve
to ``workdir/loss.png``. A non-finite loss, gradient norm or parameter norm stops the run before
anything from that step is saved, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

import jaxlab.distill  # noqa: F401  (registers its objectives)
import jaxlab.mixing  # noqa: F401  (registers its objectives)
from jaxlab import models, objectives, optim
from jaxlab.data import pipeline
from jaxlab.data.tokenizers import Tokenizer
from jaxlab.train import pretrained, sharding
from jaxlab.train import workdir as workdir_lib
from jaxlab.train.checkpoint import Checkpointer, CheckpointSaveError
from jaxlab.train.step import (
    MODEL_INPUTS,
    TrainState,
    activation_sharding_during_trace,
    make_eval_step,
    make_train_step,
)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class Experiment:
    """Everything ``train_and_evaluate`` builds from a config, before any step runs."""

    config: Any
    mesh: jax.sharding.Mesh
    tokenizer: Tokenizer
    model_config: Any  # the model's config dataclass (models.make_config)
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    abstract_state: TrainState
    rules: tuple
    objective: objectives.Objective
    frozen: dict[str, pretrained.FrozenModel]  # the frozen models the objective reads, by name
    trainable: Any  # pytree of bools like the parameters (False: config.optim.frozen), or None
    components: list[pipeline.Component]  # the data components (batch["domain"] indices)

    @property
    def frozen_shardings(self) -> dict[str, Any]:
        return {n: jax.tree.map(lambda a: a.sharding, f.abstract) for n, f in self.frozen.items()}


def validate_config(config) -> None:
    """Errors that name the field for values no run could use."""
    for field in ("num_steps", "batch_size", "seq_len", "eval_every", "checkpoint_every"):
        value = config[field]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be a positive int, got {value!r}")
    for field in ("eval_batches", "keep_checkpoints", "accum_steps", "log_every"):
        if config[field] < 1:
            raise ValueError(f"config.{field} must be >= 1, got {config[field]!r}")
    if config.batch_size % config.accum_steps:
        raise ValueError(
            f"config.batch_size={config.batch_size} must be divisible by "
            f"config.accum_steps={config.accum_steps}"
        )
    if config.init_from_mode not in ("exact", "partial"):
        raise ValueError(
            f"config.init_from_mode must be 'exact' or 'partial', got {config.init_from_mode!r}"
        )
    objectives.get_objective(config.objective.name).validate(config)


def _model_config(config, tokenizer: Tokenizer):
    values = config.model.to_dict()
    if not values.get("vocab_size"):
        values["vocab_size"] = tokenizer.vocab_size
    if values["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})"
        )
    model_config = models.make_config(values)
    if config.seq_len > model_config.max_seq_len:
        raise ValueError(
            f"config.seq_len={config.seq_len} exceeds config.model.max_seq_len="
            f"{model_config.max_seq_len}"
        )
    return model_config


def build_experiment(config) -> Experiment:
    """Mesh, tokenizer, model structure, optimizer and shardings (nothing allocated)."""
    validate_config(config)
    try:
        mesh = sharding.make_mesh(**config.mesh.to_dict())
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.batch_size // config.accum_steps) % rows:
        raise ValueError(
            f"config.batch_size={config.batch_size} (per accumulation step "
            f"{config.batch_size // config.accum_steps}) must be divisible by the mesh's "
            f"data x fsdp = {rows}"
        )
    tokenizer = pipeline.make_tokenizer(config.data)
    model_config = _model_config(config, tokenizer)
    abstract_model = nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules) or sharding.DEFAULT_RULES
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    schedule = optim.learning_rate_schedule(config.optim, config.num_steps)
    optimizer = optim.build_optimizer(config.optim, config.num_steps)
    pure_params = nnx.to_pure_dict(abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, pure_params)
    masked = optax.transforms.MaskedNode  # frozen leaves' places in a masked state
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer,
        lambda state, s: state if isinstance(state, masked) else s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding | masked),
    )
    components = pipeline.build_components(config.data)  # read once per run
    dtypes = {"param_dtype": model_config.param_dtype, "dtype": model_config.dtype}
    registered = objectives.get_objective(config.objective.name)
    frozen = {
        name: pretrained.frozen_model(
            source,
            name,
            dtypes=dtypes,
            shardings_of=lambda a: sharding.state_shardings(a, mesh, rules),
        )
        for name, source in registered.frozen_models(config).items()
    }
    trainable = None
    if config.optim.get("frozen"):
        frozen_mask = optim.params_matching(pure_params, config.optim.frozen, "config.optim.frozen")
        trainable = jax.tree.map(lambda f: not f, frozen_mask)
    context = objectives.ObjectiveContext(
        config=config,
        graphdef=graphdef,
        frozen={n: f.graphdef for n, f in frozen.items()},
        model_config=model_config,
        frozen_configs={n: f.model_config for n, f in frozen.items()},
        params=pure_params,
        schedule=schedule,
        components=tuple(c.name for c in components),
        trainable=trainable,
    )
    objective = registered.build(context)
    abstract_objective = jax.eval_shape(objective.init)
    objective_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_objective)
    shardings = TrainState(
        sharding.replicated(mesh), param_shardings, opt_shardings, objective_shardings
    )
    abstract = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32), pure_params, abstract_opt, abstract_objective
    )
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return Experiment(
        config,
        mesh,
        tokenizer,
        model_config,
        graphdef,
        optimizer,
        schedule,
        shardings,
        abstract,
        rules,
        objective,
        frozen,
        trainable,
        components,
    )


def init_state(exp: Experiment, params=None) -> TrainState:
    """Fresh parameters (``config.seed``; or ``params``, already placed) and optimizer state,
    created already sharded."""

    def init(params):
        if params is None:
            params = _random_params(exp)
        return TrainState(
            jnp.zeros((), jnp.int32), params, exp.optimizer.init(params), exp.objective.init()
        )

    return jax.jit(init, out_shardings=exp.state_shardings)(params)


def _random_params(exp: Experiment):
    model = models.build(exp.model_config, nnx.Rngs(exp.config.seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def initial_params(exp: Experiment):
    """The parameters a fresh run starts from: ``config.init_from`` (``hf:PATH``,
    ``run:WORKDIR[@STEP]``) or random (``config.seed``). Returns ``(params, report)``; the
    report lists the copied, kept (random) and unused parameter names, or is None."""
    config = exp.config
    if not config.init_from:
        return None, None
    source = pretrained.pinned(pretrained.parse_source(config.init_from))
    if config.init_from_mode == "exact":
        differences = pretrained.architecture_differences(
            exp.model_config, pretrained.source_model_config(source)
        )
        if differences:
            raise ValueError(
                f"config.init_from {source}: config.model differs from the "
                f"source's model in {differences}"
            )
    partial = config.init_from_mode == "partial"
    fallback = None
    if partial:
        fallback = jax.jit(lambda: _random_params(exp), out_shardings=exp.state_shardings.params)()
    params, report = pretrained.load_params(
        source,
        exp.abstract_state.params,
        partial=partial,
        mapping=list(config.init_from_map),
        fallback=fallback,
    )
    return params, {"source": str(source), **report}


def load_frozen(exp: Experiment, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """``{name: params}`` of the objective's frozen models, on their shardings; ``sources``
    (``{name: "run:WORKDIR@STEP"}``, as :func:`pin_sources` wrote them) overrides where they are
    read from."""
    sources = sources or {}
    return {
        name: pretrained.load_frozen(
            f, name, pretrained.parse_source(sources[name]) if name in sources else None
        )
        for name, f in exp.frozen.items()
    }


SOURCES_FILE = "frozen_sources.json"


def pin_sources(exp: Experiment, workdir: str, fresh: bool) -> dict[str, str]:
    """The frozen models' sources with their checkpoint steps fixed: resolved now and written to
    ``WORKDIR/frozen_sources.json`` for a fresh run, read back from it on resume, so a resumed
    run reads the same teacher or reference even if that run trained on."""
    path = os.path.join(workdir, SOURCES_FILE)
    if not fresh and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    sources = {name: str(pretrained.pinned(f.source)) for name, f in exp.frozen.items()}
    if sources and jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(sources, f, indent=2)
    return sources


def compile_steps(exp: Experiment):
    """The jitted train step ``(state, batch, frozen) -> (state, metrics)`` (state donated;
    ``frozen`` from :func:`load_frozen`, ``{}`` when the objective reads no frozen model) and
    eval step ``(params, batch)``, with the experiment's shardings. Both are traced inside the
    activation-sharding rules of the mesh (the one place where they are applied)."""
    pinned = activation_sharding_during_trace(exp.mesh, exp.rules)
    step = make_train_step(
        exp.graphdef,
        exp.optimizer,
        objective=exp.objective,
        learning_rate=exp.schedule,
        trainable=exp.trainable,
        seed=exp.config.seed,
    )
    train_step = jax.jit(
        pinned(step),
        in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh), exp.frozen_shardings),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        pinned(make_eval_step(exp.graphdef)),
        in_shardings=(exp.state_shardings.params, sharding.batch_sharding(exp.mesh)),
        out_shardings=sharding.replicated(exp.mesh),
    )
    return train_step, eval_step


def _parse_lines(lines) -> list[dict[str, Any]]:
    """Metrics records; a line torn by a crash mid-write is skipped."""
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logging.warning("skipping an unreadable metrics line: %r", line[:200])
    return records


class _MetricsWriter:
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


def _on_devices(batch: dict[str, np.ndarray], mesh, keys=MODEL_INPUTS) -> dict[str, jax.Array]:
    return sharding.global_batch_to_devices({k: batch[k] for k in keys}, mesh)


def eval_sets(exp: Experiment, components) -> dict[str, list[dict[str, np.ndarray]]]:
    """Held-out batches: ``""`` over all components' validation documents, and with
    ``config.eval_per_source`` (and more than one component) each component's own, by name."""
    config = exp.config
    args = (config.data, exp.tokenizer, config.seq_len, config.batch_size, config.eval_batches)
    sets = {"": pipeline.eval_batches(*args, components)}
    with_validation = [c for c in components if len(c.validation)]
    if config.eval_per_source and len(with_validation) > 1:
        for c in with_validation:
            sets[c.name] = pipeline.eval_batches(*args, [c])
    return sets


def evaluate(exp: Experiment, params, eval_data, eval_step) -> dict[str, float]:
    """``eval_loss`` and ``eval_perplexity`` (token means) over ``eval_data``: a list of batches,
    or ``{name: batches}`` from :func:`eval_sets`, where each named source adds
    ``eval_loss/<name>`` and ``eval_perplexity/<name>``."""
    sets = eval_data if isinstance(eval_data, dict) else {"": eval_data}
    result = {}
    for name, batches in sets.items():
        loss_sum, tokens = 0.0, 0.0
        for batch in batches:
            out = eval_step(params, _on_devices(batch, exp.mesh))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
        loss = loss_sum / max(tokens, 1.0)
        suffix = f"/{name}" if name else ""
        result[f"eval_loss{suffix}"] = loss
        result[f"eval_perplexity{suffix}"] = math.exp(min(loss, 50.0))
    return result


class _Prefetcher:
    """Builds the next batches on a background thread while the devices train.

    Each batch comes with the iterator state *after* it, so a checkpoint stores the position of
    the batches consumed, not of those merely prefetched.
    """

    def __init__(self, iterator: pipeline.DataIterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.state = iterator.get_state()

        def produce():
            try:
                while not self._stop.is_set():
                    item = (next(iterator), iterator.get_state())
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
            except BaseException as e:  # surfaced in the training thread
                self._queue.put(e)

        self._thread = threading.Thread(target=produce, daemon=True, name="jaxlab-data")
        self._thread.start()

    def next(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.state = item
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def train_and_evaluate(config, workdir: str, *, stop_at: int | None = None) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its newest checkpoint.

    Args:
      config: the experiment ConfigDict (see ``configs/lm_tiny.py``).
      workdir: local directory for checkpoints, metrics, plots.
      stop_at: stop after this step (as if interrupted; the schedule still spans
        ``config.num_steps``). Checkpoints the stop step.

    Returns:
      The last train and eval metrics, the first eval (before any training, if this run started
      from scratch), the final state and the :class:`Experiment`.

    Raises:
      NonFiniteLossError: the loss, the gradient or the updated parameters stopped being finite;
        nothing from that step on was saved.
    """
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


def _train_and_evaluate(exp: Experiment, workdir: str, stop_at: int | None) -> dict[str, Any]:
    config = exp.config
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    components = exp.components
    objective = exp.objective
    # An objective may ask for its components to be sampled uniformly (a data mixer's weights
    # act on the gradients or the losses, not on the sampling).
    data = pipeline.train_iterator(
        config.data,
        exp.tokenizer,
        config.seq_len,
        config.batch_size,
        components,
        weights=[1.0] * len(components) if objective.uniform_sampling else None,
    )
    eval_data = eval_sets(exp, components)

    lead = jax.process_index() == 0
    config_json = json.loads(config.to_json_best_effort())
    start = checkpointer.latest_step()
    summary: dict[str, Any] = {}
    if start is None:  # a fresh run; a resumed one always starts from its own checkpoint
        params, report = initial_params(exp)
        state, start = init_state(exp, params), 0
        if report is not None:
            summary["init_from"] = report
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
    summary["start_step"] = start
    metrics_writer = _MetricsWriter(os.path.join(workdir, "metrics.jsonl"), start)
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
        summary["initial_eval"] = first
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
    prefetcher = _Prefetcher(data)
    last_train: dict[str, float] = {}
    try:
        for step in range(start + 1, end + 1):
            batch = _on_devices(prefetcher.next(), exp.mesh, keys)
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
                summary["eval"] = result
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
                    checkpointer.save(step, state, prefetcher.state, config_json)
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
    if "eval" not in summary:  # nothing left to train (a finished run): report where it stands
        summary["eval"] = evaluate(exp, state.params, eval_data, eval_step)
    summary.update(train=last_train, step=end, state=state, experiment=exp)
    if lead:
        from jaxlab.eval.plots import plot_loss_curve

        plot_loss_curve(read_metrics(workdir), os.path.join(workdir, "loss.png"))
    return summary
