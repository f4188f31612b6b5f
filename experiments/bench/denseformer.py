"""Cost of DenseFormer's depth-weighted averages against the same-depth Transformer.

For ``--config``'s model (default ``configs/lm_tiny.py``, depth 4) as a baseline, a 1x1 and a 2x2
DenseFormer: the jitted train step (the config's batch) and greedy decoding (batch 1 and 16, 128
tokens), timed round-robin in the same run (median), plus the train step's XLA temporary memory,
on one device. Goal from the issue: <= 1.05x the baseline's time.

  python -m experiments.bench.denseformer [--out=bench_results/bench_denseformer.json] [--quick]
      [--config.model.num_layers=8]

``--quick`` shrinks the config (2 layers, a [4, 32] batch) except for the fields ``--config.``
sets explicitly.
"""

from __future__ import annotations

import copy
import os
import statistics

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from experiments import run_config
from experiments.bench.common import environment, time_calls, write_json
from jaxlab.infer import generate
from jaxlab.train import loop, sharding
from jaxlab.train.step import MODEL_INPUTS

flags.DEFINE_string("out", "bench_results/bench_denseformer.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 10, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: 2 layers, small batch, 2 repeats.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_tiny.py"),
    "The baseline Transformer's configuration; the DenseFormers add model.dwa to it.",
    lock_config=True,
)
FLAGS = flags.FLAGS

VARIANTS = {"Transformer": None, "DenseFormer 1x1": (1, 1), "DenseFormer 2x2": (2, 2)}
QUICK = {"model.num_layers": 2, "batch_size": 4, "seq_len": 32}


def base_config() -> ml_collections.ConfigDict:
    """``--config`` on one device, shrunk by ``--quick`` where ``--config.`` sets nothing."""
    config = run_config.from_flag(FLAGS["config"], defaults=QUICK if FLAGS.quick else None)
    config.mesh.update(data=1, num_devices=1)
    return config


def make_config(base: ml_collections.ConfigDict, dwa) -> ml_collections.ConfigDict:
    """``base`` with depth-weighted averages of (dilation, period) ``dwa`` (None: the baseline)."""
    config = copy.deepcopy(base)
    if dwa is not None:
        with config.unlocked():
            config.model.dwa = ml_collections.ConfigDict(dict(dilation=dwa[0], period=dwa[1]))
    return config


def build(base, name):
    exp = loop.build_experiment(make_config(base, VARIANTS[name]))
    state = loop.init_state(exp)
    train_step, _ = loop.compile_steps(exp)
    rng = np.random.default_rng(0)
    shape = (exp.config.batch_size, exp.config.seq_len)
    batch = {k: np.ones(shape, np.int32) for k in MODEL_INPUTS}
    batch["inputs"] = batch["targets"] = rng.integers(0, 256, shape).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    batch = sharding.global_batch_to_devices(batch, exp.mesh)
    compiled = train_step.lower(state, batch, {}).compile()
    try:
        temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    except (AttributeError, NotImplementedError):
        temp_mib = None
    holder = {"state": state}

    def train():
        holder["state"], metrics = compiled(holder["state"], batch, {})
        jax.block_until_ready(metrics)

    def decoder(rows):
        prompts = np.full((rows, 16), 257, np.int32)
        tokens = 16 if FLAGS.quick else 128

        def decode():  # the train step donates the state, so merge the current parameters
            model = nnx.merge(exp.graphdef, holder["state"].params)
            out = generate(model, prompts, max_new_tokens=tokens, stop_tokens=())
            jax.block_until_ready(out.tokens)

        return decode

    train()
    tasks = {"train step": train, "decode b=1": decoder(1), "decode b=16": decoder(16)}
    for task in tasks.values():
        task()  # compile
    parameters = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    return tasks, temp_mib, parameters


def main(argv):
    del argv
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    config = base_config()
    built = {name: build(config, name) for name in VARIANTS}
    times: dict[str, dict[str, list[float]]] = {n: {} for n in VARIANTS}
    names = list(VARIANTS)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for task, fn in built[name][0].items():
                timing = time_calls(fn, repeats=1, warmup=0)
                times[name].setdefault(task, []).append(timing.median)
    rows = {
        name: {task: statistics.median(t) * 1e3 for task, t in tasks.items()}
        for name, tasks in times.items()
    }
    base = rows["Transformer"]
    print(
        f"depth {config.model.num_layers}, median of {repeats} rounds, ms (ratio to "
        f"the Transformer); goal <= 1.05x"
    )
    print("| model | train step | decode b=1 | decode b=16 | train temp MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        cells = [f"{row[t]:.1f} ({row[t] / base[t]:.2f}x)" for t in row]
        temp = built[name][1]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {'n/a' if temp is None else f'{temp:.0f}'} |"
        )
    write_json(
        FLAGS.out,
        dict(
            rows_ms=rows,
            temp_mib={n: built[n][1] for n in VARIANTS},
            parameters={n: built[n][2] for n in VARIANTS},
            num_layers=config.model.num_layers,
            batch=[config.batch_size, config.seq_len],
            repeats=repeats,
            environment=environment(),
        ),
    )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
