"""Cost of Layer Parallelism: decode tokens/s and the train step on a tensor mesh, LP vs original.

For ``--config``'s Llama (default ``configs/layer_parallel.py``: 12 layers, width 256, random
weights, since speed does not depend on them) and its Layer Parallel models (folded) at each
Delta in ``experiment.deltas`` (the run of Delta layers centred in the model): greedy decoding
with a KV cache at batch 1 and 16 on one device, and the jitted train step (the config's batch)
on a 2-device tensor mesh (``data=1, tensor=2``; on a CPU host these are fake CPU devices sharing
its cores, so the mesh measures the sharded program here, not 2 accelerators). Everything is
timed round-robin in the same run (median); ratios are LP / original (decode: tokens/s, > 1
faster; train step: time, < 1 faster), beside the ideal L/(L - Delta/2).

  python -m experiments.bench.layer_parallel [--out=bench_results/bench_layer_parallel.json]
      [--quick] [--config.experiment.deltas=2,4]

``--quick`` shrinks the config (6 layers of width 64, a [4, 32] batch, Delta 2, 16 decoded
tokens, 2 rounds) except for the fields ``--config.`` sets explicitly.
"""

from __future__ import annotations

import copy
import os

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from experiments import run_config
from experiments.bench.common import environment, write_json
from experiments.bench.decoding import greedy_decoder, round_robin_medians
from jaxlab import models
from jaxlab.models import depth
from jaxlab.train import loop, sharding
from jaxlab.train.step import MODEL_INPUTS

flags.DEFINE_string("out", "bench_results/bench_layer_parallel.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 10, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: 6 layers of width 64, small batch, 2 repeats.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "layer_parallel.py"),
    "The original model's run configuration; experiment.deltas the LP models.",
    lock_config=True,
)
FLAGS = flags.FLAGS

QUICK = {
    "model.num_layers": 6,
    "model.hidden_size": 64,
    "model.intermediate_size": 128,
    "model.num_heads": 4,
    "model.num_kv_heads": 2,
    "batch_size": 4,
    "seq_len": 32,
    "experiment.deltas": (2,),
}
DECODE_ROWS = (1, 16)
TENSOR = 2


def base_config() -> ml_collections.ConfigDict:
    """``--config`` shrunk by ``--quick`` where ``--config.`` sets nothing."""
    return run_config.from_flag(FLAGS["config"], defaults=QUICK if FLAGS.quick else None)


def centred_start(num_layers: int, delta: int) -> int:
    """The start of a run of ``delta`` layers in the middle of ``num_layers``."""
    return (num_layers - delta) // 2


def lp_models(base) -> dict[str, nnx.Module]:
    """``{name: model}``: the original (random weights, ``base.seed``) and one LP model per
    Delta of ``base.experiment.deltas``."""
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["experiment"]
    model_config = loop.build_experiment(config).model_config
    original = models.build(model_config, nnx.Rngs(base.seed))
    L = model_config.num_layers
    out = {"original": original}
    for delta in base.experiment.deltas:
        start = centred_start(L, delta)
        out[f"LP delta={delta}"] = depth.layer_parallel(original, start, start + delta)
    return out


def tensor_train_step(base, model: nnx.Module):
    """The jitted train step of ``model``'s architecture on a ``data=1, tensor=2`` mesh, ready
    to time (its state and batch placed), as a call."""
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["experiment"]
        config.model = ml_collections.ConfigDict(model.config.to_dict())
    config.mesh.update(data=1, tensor=TENSOR, num_devices=TENSOR)
    exp = loop.build_experiment(config)
    state = loop.init_state(exp)
    train_step, _ = loop.compile_steps(exp)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.seq_len)
    batch = {k: np.ones(shape, np.int32) for k in MODEL_INPUTS}
    batch["inputs"] = batch["targets"] = rng.integers(0, 256, shape).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    batch = sharding.global_batch_to_devices(batch, exp.mesh)
    compiled = train_step.lower(state, batch, {}).compile()
    holder = {"state": state}

    def train():
        holder["state"], metrics = compiled(holder["state"], batch, {})
        return metrics

    return train


def main(argv):
    del argv
    jax.config.update("jax_num_cpu_devices", TENSOR)  # the mesh's fake CPU devices; before arrays
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    new_tokens = 16 if FLAGS.quick else 128
    prompt_len = 16
    config = base_config()
    built = lp_models(config)
    names = list(built)
    L = built["original"].config.num_layers
    if len(jax.devices()) < TENSOR:
        raise RuntimeError(f"the tensor mesh needs {TENSOR} devices, found {jax.devices()}")
    tasks: dict[str, dict] = {}
    for rows in DECODE_ROWS:
        calls = {n: greedy_decoder(m, rows, prompt_len, new_tokens, 1) for n, m in built.items()}
        tasks[f"decode b={rows}"] = round_robin_medians(calls, repeats)
    steps = {n: tensor_train_step(config, m) for n, m in built.items()}
    tasks[f"train step, tensor={TENSOR}"] = round_robin_medians(steps, repeats)
    rows_ms = {n: {t: seconds[n] * 1e3 for t, seconds in tasks.items()} for n in names}
    decode_tokens_per_s = {
        n: {f"decode b={r}": r * new_tokens / tasks[f"decode b={r}"][n] for r in DECODE_ROWS}
        for n in names
    }
    # LP / original: tokens/s for decoding (> 1: LP is faster), time for the step (< 1: faster).
    ratios = {}
    for n in names[1:]:
        ratios[n] = {
            t: decode_tokens_per_s[n][t] / decode_tokens_per_s["original"][t]
            for t in decode_tokens_per_s[n]
        }
        step = f"train step, tensor={TENSOR}"
        ratios[n][step] = rows_ms[n][step] / rows_ms["original"][step]
    ideal = {f"LP delta={d}": L / (L - d // 2) for d in config.experiment.deltas}
    print(f"median of {repeats} rounds, ms; {new_tokens} tokens decoded after {prompt_len}")
    print("| model | " + " | ".join(tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{rows_ms[n][t]:.1f}" for t in tasks) + " |")
    for n, row in ratios.items():
        cells = " | ".join(f"{row[t]:.3f}x" for t in row)
        print(f"| {n} / original (ideal {ideal[n]:.3f}x) | {cells} |")
    print("ratios: decode tokens/s (> 1: LP faster); train step time (< 1: LP faster)")
    write_json(
        FLAGS.out,
        dict(
            rows_ms=rows_ms,
            decode_tokens_per_s=decode_tokens_per_s,
            ratios=ratios,
            ideal_speedup=ideal,
            num_layers=L,
            starts={f"LP delta={d}": centred_start(L, d) for d in config.experiment.deltas},
            batch=[config.batch_size, config.seq_len],
            decode_tokens=new_tokens,
            prompt_len=prompt_len,
            tensor_mesh=dict(
                data=1,
                tensor=TENSOR,
                devices=[str(d) for d in jax.devices()[:TENSOR]],
                note="fake CPU devices sharing the host's cores"
                if jax.default_backend() == "cpu"
                else jax.default_backend(),
            ),
            repeats=repeats,
            environment=environment(),
        ),
    )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
