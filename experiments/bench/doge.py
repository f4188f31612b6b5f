"""Cost of a DoGE proxy step against a plain training step, timed in the same run.

The byte-level Llama of ``--config``'s ``corpus.lm`` (default ``configs/doge.py``: 2 layers, 128
wide) on batches of 16 x 128 tokens drawn from the embedded-corpus domains ``corpus.domains``
(fewer: ``--config.corpus.domains="('email','asyncio')"``). Steps compared (each jitted and
compiled first, then timed interleaved: ``--repeats`` rounds, each running every variant for
``--steps`` steps; ratios are medians over rounds of the per-round ratios, so load that drifts
between rounds cancels):

* ``plain``: the engine's training step;
* ``doge``: the universal DoGE update over all parameters, per-domain gradients taken row by
  row (one forward and one backward pass; :func:`jaxlab.mixing.row_domain_gradients`);
* ``doge_selected``: the same with a parameter filter keeping the 2 smallest tensors (only the
  scores shrink: the row path takes every leaf's per-row gradient for the update anyway);
* ``doge_ood``: one domain held out as the target (its gradient comes from the same pass);
* ``doge_mixed_rows`` / ``doge_selected_mixed_rows``: ``doge`` / ``doge_selected`` on the same
  batches with every row's second half relabelled to the next domain, so the objective takes
  its general path (``k`` vmapped backward passes over the whole batch, as every batch did
  before the row path; with the filter only of the selected tensors, plus one backward pass for
  the update);
* ``doremi``: proxy and reference forward passes and one backward pass.

Printed and written: ms per step, the ratio to ``plain``, ``doge_selected`` / ``doge`` (and the
same on mixed rows) and the load average before and after the timed rounds.

  python -m experiments.bench.doge [--out=bench_results/bench_doge.json] [--quick]
      [--config.corpus.lm.model.num_layers=4]
"""

from __future__ import annotations

import copy
import os
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from experiments import run_config
from experiments.bench.common import environment, time_calls, write_json
from jaxlab import models, objectives
from jaxlab.data import pipeline
from jaxlab.train import loop
from jaxlab.train.step import TrainState, make_train_step

flags.DEFINE_string("out", "bench_results/bench_doge.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed runs (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per timed run.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 steps, one repeat.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "doge.py"),
    "The DoGE experiment's configuration: the model and data of corpus.lm, the domains of "
    "corpus.domains.",
    lock_config=True,
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    repeats, steps = (1, 2) if FLAGS.quick else (FLAGS.repeats, FLAGS.steps)
    corpus = run_config.from_flag(FLAGS["config"]).corpus
    config, names = corpus.lm, corpus.domains
    config.data.sources = tuple(f"embedded:{d}" for d in names)
    exp = loop.build_experiment(config)
    k = len(names)
    params = nnx.to_pure_dict(nnx.state(models.build(exp.model_config, nnx.Rngs(0)), nnx.Param))
    iterator = pipeline.train_iterator(
        config.data, exp.tokenizer, config.seq_len, config.batch_size, weights=[1.0] * k
    )
    keys = (*loop.MODEL_INPUTS, "domain")
    batches = [
        {key: jnp.asarray(b[key]) for key in keys} for b in (next(iterator) for _ in range(steps))
    ]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    smallest = sorted(leaves, key=lambda item: item[1].size)[:2]
    selected = tuple("/".join(str(k.key) for k in path) for path, _ in smallest)

    def objective(name, **mixer):
        """The engine's objective ``name`` with ``config.mixer`` overrides; DoReMi's reference
        is the initial model."""
        c = copy.deepcopy(config)
        c.objective.name = name
        c.mixer.update(**mixer)
        context = objectives.ObjectiveContext(
            config=c,
            graphdef=exp.graphdef,
            frozen={"reference": exp.graphdef},
            model_config=exp.model_config,
            frozen_configs={"reference": exp.model_config},
            params=params,
            schedule=exp.schedule,
            components=tuple(names),
        )
        return objectives.get_objective(name).build(context)

    variants = {
        "plain": objectives.get_objective("next_token").build(
            objectives.ObjectiveContext(
                config, exp.graphdef, {}, exp.model_config, {}, params, exp.schedule, tuple(names)
            )
        ),
        "doge": objective("doge"),
        "doge_selected": objective("doge", selected_params=selected),
        "doge_ood": objective("doge", target_sources=(names[-1],)),
        "doremi": objective("doremi", reference_workdir="(the initial model)"),
    }
    frozen = {"reference": params}
    half = config.seq_len // 2
    mixed_batches = [
        dict(b, domain=b["domain"].at[:, half:].set((b["domain"][:, half:] + 1) % k))
        for b in batches
    ]
    runs = {}
    for name, obj in variants.items():
        step = jax.jit(
            make_train_step(exp.graphdef, exp.optimizer, objective=obj, learning_rate=exp.schedule)
        )
        state = TrainState(jnp.zeros((), jnp.int32), params, exp.optimizer.init(params), obj.init())
        step_frozen = frozen if name == "doremi" else {}
        runs[name] = (step, state, step_frozen, batches)
        if name in ("doge", "doge_selected"):
            runs[f"{name}_mixed_rows"] = (step, state, step_frozen, mixed_batches)

    def run(name):
        step, s, step_frozen, step_batches = runs[name]
        for batch in step_batches:
            s, metrics = step(s, batch, step_frozen)
        return metrics["loss"]

    for name in runs:  # compile
        time_calls(lambda name=name: run(name), repeats=1, warmup=0)
    load_before = os.getloadavg()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name in runs:
            seconds[name] += time_calls(lambda name=name: run(name), repeats=1, warmup=0).seconds
    load_after = os.getloadavg()

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))

    rows = []
    for name in runs:
        ms = statistics.median(seconds[name]) / steps * 1e3
        rows.append(
            dict(variant=name, ms_per_step=ms, ratio_to_plain=ratio(name, "plain"), domains=k)
        )
        print(f"{name:16s} {ms:8.1f} ms/step  x{ratio(name, 'plain'):5.2f}", flush=True)
    selected_to_full = ratio("doge_selected", "doge")
    selected_to_full_mixed = ratio("doge_selected_mixed_rows", "doge_mixed_rows")
    print(f"doge_selected / doge x{selected_to_full:5.2f}")
    print(f"doge_selected_mixed_rows / doge_mixed_rows x{selected_to_full_mixed:5.2f}")
    print(f"load average before {load_before}, after {load_after}")
    write_json(
        FLAGS.out,
        dict(
            environment=environment(),
            rows=rows,
            doge_selected_to_doge=selected_to_full,
            doge_selected_to_doge_mixed_rows=selected_to_full_mixed,
            load_average_before=load_before,
            load_average_after=load_after,
            selected_tensors=list(selected),
            total_tensors=len(leaves),
        ),
    )


if __name__ == "__main__":
    app.run(main)
