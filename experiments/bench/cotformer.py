"""Cost of a CoTFormer Lx3 against standard Transformers of depth 3L and of depth L.

For ``--config``'s CoTFormer (default ``configs/cotformer_lm.py``: L = ``model.n_layer_mid``
shared blocks repeated ``model.n_repeat`` times) and Llama models with the same block fields at
depth ``n_repeat * L`` (about the same MACs) and L (the same parameters): the jitted train step
(the config's batch) and greedy decoding (batch 1 and 16), timed round-robin in the same run
(median), as ratios to each Transformer, on one device.

  python -m experiments.bench.cotformer [--out=bench_results/bench_cotformer.json] [--quick]
      [--config.model.n_layer_mid=4]

``--quick`` shrinks the config (width 64, a [4, 32] batch, 16 decoded tokens, 2 rounds) except
for the fields ``--config.`` sets explicitly.
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

from configs.cotformer_lm import standard_model
from experiments import run_config
from experiments.bench.common import environment, time_calls, write_json
from jaxlab.infer import generate
from jaxlab.train import loop, sharding
from jaxlab.train.step import MODEL_INPUTS

flags.DEFINE_string("out", "bench_results/bench_cotformer.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 10, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: width 64, small batch, 2 repeats.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cotformer_lm.py"),
    "The CoTFormer's configuration; the Transformers copy its block fields.",
    lock_config=True,
)
FLAGS = flags.FLAGS

QUICK = {
    "model.hidden_size": 64,
    "model.intermediate_size": 128,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "batch_size": 4,
    "seq_len": 32,
}
TASKS = ("train step", "decode b=1", "decode b=16")
DECODE_ROWS = {"decode b=1": 1, "decode b=16": 16}


def base_config() -> ml_collections.ConfigDict:
    """``--config`` on one device, shrunk by ``--quick`` where ``--config.`` sets nothing."""
    config = run_config.from_flag(FLAGS["config"], defaults=QUICK if FLAGS.quick else None)
    config.mesh.update(data=1, num_devices=1)
    return config


def variants(base) -> dict[str, ml_collections.ConfigDict]:
    """``{name: run config}``: the CoTFormer as configured (fixed depth), Transformers 3L and L."""
    depth, repeats = base.model.n_layer_mid, base.model.n_repeat
    configs = {}
    for name, fields in (
        (f"CoTFormer {depth}x{repeats}", None),
        (f"Transformer L={repeats * depth}", standard_model(base.model, repeats * depth)),
        (f"Transformer L={depth}", standard_model(base.model, depth)),
    ):
        config = copy.deepcopy(base)
        with config.unlocked():
            del config["experiment"]
            if fields is None:
                config.model.update(adaptive=False, routing="threshold")
            else:
                config.model = ml_collections.ConfigDict(fields)
        configs[name] = config
    return configs


def decode_tokens() -> int:
    """Tokens generated per row in a decode measurement."""
    return 16 if FLAGS.quick else 128


def build(config):
    exp = loop.build_experiment(config)
    state = loop.init_state(exp)
    train_step, _ = loop.compile_steps(exp)
    rng = np.random.default_rng(0)
    shape = (exp.config.batch_size, exp.config.seq_len)
    batch = {k: np.ones(shape, np.int32) for k in MODEL_INPUTS}
    batch["inputs"] = batch["targets"] = rng.integers(0, 256, shape).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    batch = sharding.global_batch_to_devices(batch, exp.mesh)
    compiled = train_step.lower(state, batch, {}).compile()
    holder = {"state": state}

    def train():
        holder["state"], metrics = compiled(holder["state"], batch, {})
        jax.block_until_ready(metrics)

    def decoder(rows):
        prompts = np.full((rows, 16), exp.tokenizer.bos_id, np.int32)
        tokens = decode_tokens()

        def decode():  # the train step donates the state, so merge the current parameters
            model = nnx.merge(exp.graphdef, holder["state"].params)
            out = generate(model, prompts, max_new_tokens=tokens, stop_tokens=())
            jax.block_until_ready(out.tokens)

        return decode

    tasks = {"train step": train, **{t: decoder(rows) for t, rows in DECODE_ROWS.items()}}
    for task in tasks.values():
        task()  # compile
    parameters = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
    return tasks, int(parameters)


def main(argv):
    del argv
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    config = base_config()
    configs = variants(config)
    built = {name: build(c) for name, c in configs.items()}
    names = list(configs)
    times: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for task, fn in built[name][0].items():
                times[name].setdefault(task, []).append(time_calls(fn, repeats=1, warmup=0).median)
    rows_ms = {
        name: {task: statistics.median(t) * 1e3 for task, t in tasks.items()}
        for name, tasks in times.items()
    }
    cot, deep, shallow = names
    # Ratios of the CoTFormer's time to each Transformer's (> 1: the CoTFormer is slower).
    ratios = {ref: {t: rows_ms[cot][t] / rows_ms[ref][t] for t in TASKS} for ref in (deep, shallow)}
    new_tokens = decode_tokens()
    decode_tokens_per_s = {
        name: {t: rows * new_tokens / (rows_ms[name][t] / 1e3) for t, rows in DECODE_ROWS.items()}
        for name in names
    }
    print(f"median of {repeats} rounds, ms; ratio: {cot}'s time / the Transformer's")
    print("| model | " + " | ".join(TASKS) + " | parameters |")
    print("|---|" + "---:|" * (len(TASKS) + 1))
    for name in names:
        print(
            f"| {name} | "
            + " | ".join(f"{rows_ms[name][t]:.1f}" for t in TASKS)
            + f" | {built[name][1]:,} |"
        )
    for ref, row in ratios.items():
        print(f"| {cot} / {ref} | " + " | ".join(f"{row[t]:.2f}x" for t in TASKS) + " | |")
    for name in names:
        speeds = ", ".join(f"{t}: {v:,.0f}" for t, v in decode_tokens_per_s[name].items())
        print(f"{name} decode tokens/s: {speeds}")
    write_json(
        FLAGS.out,
        dict(
            rows_ms=rows_ms,
            ratios=ratios,
            decode_tokens_per_s=decode_tokens_per_s,
            parameters={n: built[n][1] for n in names},
            n_layer_mid=config.model.n_layer_mid,
            n_repeat=config.model.n_repeat,
            batch=[config.batch_size, config.seq_len],
            decode_tokens=new_tokens,
            repeats=repeats,
            environment=environment(),
        ),
    )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
