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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from tqdm import tqdm

from jaxlab import models, optim
from jaxlab.data import pipeline
from jaxlab.data.tokenizers import Tokenizer, load_tokenizer
from jaxlab.train import sharding
from jaxlab.train.checkpoint import Checkpointer
from jaxlab.train.step import (
    MODEL_INPUTS,
    TrainState,
    activation_sharding_during_trace,
    make_eval_step,
    make_mixer_train_step,
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
    mixing: MixingPlan | None = None  # set when config.mixer.name learns domain weights


@dataclasses.dataclass(frozen=True)
class MixingPlan:
    """What a run with a data mixer needs: the mixer, which components it weights (``train``)
    and which are only targets (``target``, the OOD objective), by index into ``names``."""

    kind: str
    mixer: Any
    names: tuple[str, ...]
    train: tuple[int, ...]
    target: tuple[int, ...]


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
    mixer = config.get("mixer")
    if mixer is not None and mixer.name:
        if mixer.name not in MIXERS:
            raise ValueError(f"config.mixer.name must be '' or one of {MIXERS}, got "
                             f"{mixer.name!r}")  # fmt: skip
        if config.accum_steps != 1:
            raise ValueError(f"config.accum_steps must be 1 with a data mixer, got "
                             f"{config.accum_steps}")  # fmt: skip
        if config.data.get("weights_file") or len(set(config.data.weights)) > 1:
            raise ValueError("config.data.weights / weights_file: a mixer run samples its "
                             "components uniformly (the weights act on gradients or losses); "
                             "leave them empty")  # fmt: skip
        if mixer.name == "doremi" and not mixer.reference_workdir:
            raise ValueError("config.mixer.reference_workdir must name a finished run's workdir "
                             "(DoReMi's reference model)")  # fmt: skip


MIXERS = ("doge", "doremi")


def _parameter_filter(params, patterns) -> Any:
    """A pytree of bools: True for parameters whose path (``a/b/c``) contains a pattern."""
    if not patterns:
        return None
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: any(p in "/".join(str(getattr(k, "key", k)) for k in path)
                            for p in patterns), params)  # fmt: skip
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"config.mixer.selected_params {list(patterns)} match no parameter")
    return mask


def _mixing_plan(config, schedule, params) -> MixingPlan | None:
    """The mixer of ``config.mixer`` over the data components (None without one)."""
    from jaxlab import mixing

    m = config.get("mixer")
    if m is None or not m.name:
        return None
    names = tuple(c.name for c in pipeline.build_components(config.data))
    unknown = sorted(set(m.target_sources) - set(names))
    if unknown:
        raise ValueError(f"config.mixer.target_sources {unknown} are not data components "
                         f"{list(names)}")  # fmt: skip
    target = tuple(i for i, n in enumerate(names) if n in m.target_sources)
    train = tuple(i for i in range(len(names)) if i not in target)
    if len(train) < 2:
        raise ValueError(f"a data mixer needs >= 2 training components, got {list(names)} with "
                         f"targets {list(m.target_sources)}")  # fmt: skip
    if m.name == "doge":
        mixer = mixing.doge(num_domains=len(train), mu=m.mu, lr_schedule=schedule,
                            score_clip=tuple(m.score_clip),
                            objective="ood" if target else "universal", smoothing=m.smoothing,
                            grad_clip=m.grad_clip or None,
                            param_filter=_parameter_filter(params, m.selected_params))  # fmt: skip
    else:
        if target:
            raise ValueError("config.mixer.target_sources: DoReMi has no target domains")
        mixer = mixing.doremi(num_domains=len(train), step_size=m.step_size,
                              smoothing=m.smoothing)  # fmt: skip
    return MixingPlan(m.name, mixer, names, train, target)


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
    tokenizer = load_tokenizer(config.data.tokenizer or None)
    model_config = _model_config(config, tokenizer)
    abstract_model = nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules) or sharding.DEFAULT_RULES
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    schedule = optim.learning_rate_schedule(config.optim, config.num_steps)
    optimizer = optim.build_optimizer(config.optim, config.num_steps)
    pure_params = nnx.to_pure_dict(abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, pure_params)
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    plan = _mixing_plan(config, schedule, pure_params)
    abstract_mixer = () if plan is None else jax.eval_shape(plan.mixer.init)
    mixer_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_mixer)
    shardings = TrainState(sharding.replicated(mesh), param_shardings, opt_shardings,
                           mixer_shardings)  # fmt: skip
    abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), pure_params, abstract_opt,
                          abstract_mixer)  # fmt: skip
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return Experiment(config, mesh, tokenizer, model_config, graphdef, optimizer, schedule,
                      shardings, abstract, rules, plan)  # fmt: skip


def init_state(exp: Experiment) -> TrainState:
    """Fresh parameters (``config.seed``) and optimizer state, created already sharded."""

    def init():
        model = models.build(exp.model_config, nnx.Rngs(exp.config.seed))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        mixer = () if exp.mixing is None else exp.mixing.mixer.init()
        return TrainState(jnp.zeros((), jnp.int32), params, exp.optimizer.init(params), mixer)

    return jax.jit(init, out_shardings=exp.state_shardings)()


def compile_steps(exp: Experiment, reference_params=None):
    """The jitted train step (state donated) and eval step, with the experiment's shardings.
    With a data mixer the train step learns the domain weights (``reference_params``: DoReMi's
    reference model)."""
    plan = exp.mixing
    if plan is None:
        step = make_train_step(exp.graphdef, exp.optimizer, accum_steps=exp.config.accum_steps,
                               learning_rate=exp.schedule, mesh=exp.mesh,
                               rules=exp.rules)  # fmt: skip
    else:
        step = activation_sharding_during_trace(exp.mesh, exp.rules)(make_mixer_train_step(
            exp.graphdef, exp.optimizer, plan.mixer, kind=plan.kind, train_domains=plan.train,
            domain_names=tuple(plan.names[i] for i in plan.train), target_domains=plan.target,
            reference_params=reference_params, learning_rate=exp.schedule))  # fmt: skip
    train_step = jax.jit(
        step,
        in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh)),
        out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)),
        donate_argnums=0,
    )  # fmt: skip
    eval_step = jax.jit(
        make_eval_step(exp.graphdef, mesh=exp.mesh, rules=exp.rules),
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


def write_domain_weights(workdir: str, exp: Experiment, state: TrainState) -> None:
    """``domain_weights.json``: the mixer's averaged (published) and current weights by domain
    name; a base-model config reads it with ``config.data.weights_file``."""
    from jaxlab.mixing import averaged_weights, current_weights

    plan = exp.mixing
    mixer = jax.device_get(state.mixer)
    record = {"mixer": plan.kind, "steps": int(mixer.step),
              "domains": [plan.names[i] for i in plan.train],
              "average": [float(w) for w in averaged_weights(mixer)],
              "last": [float(w) for w in current_weights(mixer)],
              "targets": [plan.names[i] for i in plan.target]}  # fmt: skip
    with open(os.path.join(workdir, "domain_weights.json"), "w") as f:
        json.dump(record, f, indent=2)


def evaluate(exp: Experiment, params, eval_data, eval_step) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0.0
    for batch in eval_data:
        out = eval_step(params, _on_devices(batch, exp.mesh))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


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


def _reference_params(exp: Experiment, workdir: str):
    """The parameters of the newest checkpoint in ``workdir`` (a run of the same model)."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = checkpointer.latest_step()
    if step is None:
        raise ValueError(f"config.mixer.reference_workdir: no checkpoint in {workdir!r}")
    plain = exp.abstract_state._replace(mixer=())
    state, _, _ = checkpointer.restore(step, plain)
    checkpointer.close()
    return state.params


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
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    components = pipeline.build_components(config.data)
    plan = exp.mixing
    # A mixer run samples its components uniformly, as the DoGE authors do: the weights act on
    # the gradients (DoGE) or the losses (DoReMi), not on the sampling.
    data = pipeline.train_iterator(config.data, exp.tokenizer, config.seq_len, config.batch_size,
                                   components, weights=None if plan is None
                                   else [1.0] * len(components))  # fmt: skip
    eval_data = pipeline.eval_batches(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, config.eval_batches,
        components,
    )  # fmt: skip

    start = checkpointer.latest_step()
    if start is None:
        state, start = init_state(exp), 0
    else:
        state, data_state, _ = checkpointer.restore(start, exp.abstract_state)
        data.set_state(data_state)
    metrics_writer = _MetricsWriter(os.path.join(workdir, "metrics.jsonl"), start)
    config_json = json.loads(config.to_json_best_effort())
    lead = jax.process_index() == 0
    if lead:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_json, f, indent=2)

    reference = None
    if plan is not None and plan.kind == "doremi":
        reference = _reference_params(exp, config.mixer.reference_workdir)
    train_step, eval_step = compile_steps(exp, reference)
    keys = MODEL_INPUTS if plan is None else (*MODEL_INPUTS, "domain")
    summary: dict[str, Any] = {"start_step": start}
    if start == 0:
        first = evaluate(exp, state.params, eval_data, eval_step)
        metrics_writer.write({"step": 0, **first})
        summary["initial_eval"] = first
    last_saved = start if start > 0 else None
    end = min(config.num_steps, stop_at) if stop_at is not None else config.num_steps
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    window_start = time.perf_counter()

    def flush() -> dict[str, float]:
        """Fetches and writes pending metrics; raises at the first non-finite step."""
        nonlocal window_start
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        for s, m in fetched:
            bad = [k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(m[k])]
            if bad:
                where = (
                    f"the last good checkpoint is step {last_saved} in "
                    f"{checkpointer.path(last_saved)}"
                    if last_saved is not None
                    else "no checkpoint was saved yet"
                )
                raise NonFiniteLossError(
                    f"training {' and '.join(bad)} is {m[bad[0]]} at step {s}; {where}"
                )
            metrics_writer.write({"step": s, **m})
        elapsed = time.perf_counter() - window_start
        window_start = time.perf_counter()
        if not fetched:
            return {}
        last = dict(fetched[-1][1])
        last["tokens_per_s"] = sum(m["tokens"] for _, m in fetched) / max(elapsed, 1e-9)
        return last

    progress = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True,
                    disable=not lead)  # fmt: skip
    prefetcher = _Prefetcher(data)
    last_train: dict[str, float] = {}
    try:
        for step in range(start + 1, end + 1):
            state, metrics = train_step(state, _on_devices(prefetcher.next(), exp.mesh, keys))
            pending.append((step, metrics))
            progress.update(1)
            should_eval = step % config.eval_every == 0 or step == end
            should_save = step % config.checkpoint_every == 0 or step == end
            if step % config.log_every == 0 or should_eval or should_save:
                last_train = flush() or last_train
                progress.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}",
                                     tok_s=f"{last_train.get('tokens_per_s', 0):,.0f}")  # fmt: skip
            if should_eval:
                result = evaluate(exp, state.params, eval_data, eval_step)
                metrics_writer.write({"step": step, **result})
                summary["eval"] = result
                if lead:
                    progress.write(f"step {step}: eval loss {result['eval_loss']:.4f}, "
                                   f"perplexity {result['eval_perplexity']:.3f}")  # fmt: skip
            if should_save:
                checkpointer.save(step, state, prefetcher.state, config_json)
                if plan is not None and lead:
                    write_domain_weights(workdir, exp, state)
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
