"""Cost of distillation (issue 20): the distill_kl train step against a plain next-token step of
the same student, and greedy decoding of teacher vs students over a batch x length grid.

For ``--config``'s teacher (default ``configs/distill.py``: the reasoning task's Llama, random
weights, since speed does not depend on them) and its transferred students ``pure`` (every layer
``discrete_mamba2``) and ``hybrid50`` (``mamba2``, attention at every other layer): each
student's jitted train step with the ``distill_kl`` objective (the frozen teacher's forward pass
inside the step; the teacher read from a ``run:`` source written to a temporary directory) and
with ``next_token``, on the config's batch; and greedy decoding (KV cache / SSM state, no early
stop) over ``experiment.decode_batches`` x ``experiment.decode_lengths``. Everything is timed
round-robin in the same run (median). Ratios: step time distill / plain (> 1: distillation costs
more), decode tokens/s student / teacher (> 1: the student is faster).

  python -m experiments.bench.distill [--out=bench_results/bench_distill.json] [--quick]

``--quick`` shrinks the config (2 layers of width 32, a [2, 32] batch, grid batch 1, 4 x length
16, 2 rounds) except for the fields ``--config.`` sets explicitly.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile

import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from experiments import run_config
from experiments.bench.common import environment, write_json
from experiments.bench.decoding import greedy_decoder, round_robin_medians
from jaxlab import models
from jaxlab.distill import hybrid_layers, student_config, transfer
from jaxlab.train import loop, pretrained, sharding
from jaxlab.train.build import load_frozen
from jaxlab.train.step import MODEL_INPUTS

flags.DEFINE_string("out", "bench_results/bench_distill.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 5, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: 2 layers of width 32, small batch and grid.")
config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "distill.py"),
    "The teacher's run configuration; experiment's decode grid.",
    lock_config=True,
)
FLAGS = flags.FLAGS

QUICK = {
    "model.num_layers": 2,
    "model.hidden_size": 32,
    "model.intermediate_size": 64,
    "model.num_heads": 2,
    "model.num_kv_heads": 1,
    "batch_size": 2,
    "seq_len": 32,
    "experiment.decode_batches": (1, 4),
    "experiment.decode_lengths": (16,),
    "experiment.prompt_len": 8,
}
# name: (mixer, attention fraction)
STUDENTS = {"pure": ("discrete_mamba2", 0.0), "hybrid50": ("mamba2", 0.5)}
TEACHER = "teacher"


def base_config() -> ml_collections.ConfigDict:
    """``--config`` shrunk by ``--quick`` where ``--config.`` sets nothing."""
    return run_config.from_flag(FLAGS["config"], defaults=QUICK if FLAGS.quick else None)


def run_part(base) -> ml_collections.ConfigDict:
    config = copy.deepcopy(base)
    with config.unlocked():
        del config["experiment"]
    return config


def built_models(base, max_len: int) -> dict[str, nnx.Module]:
    """``{name: model}``: the teacher (random weights, ``base.seed``) and its transferred students,
    each with room for ``max_len`` positions."""
    model_config = loop.build_experiment(run_part(base)).model_config
    teacher = models.build(
        dataclasses.replace(model_config, max_seq_len=max_len), nnx.Rngs(base.seed)
    )
    out = {TEACHER: teacher}
    L = model_config.num_layers
    for name, (mixer, fraction) in STUDENTS.items():
        attention = hybrid_layers(L, fraction) if fraction else ()  # pure: no attention
        config = student_config(teacher.config, mixer, attention)
        out[name] = transfer(teacher, config, rngs=nnx.Rngs(base.seed))
    return out


def train_step(base, model: nnx.Module, objective: dict):
    """The jitted train step of ``model``'s architecture with ``objective`` (config.objective
    fields), its state, frozen models and a batch placed, as a call."""
    config = run_part(base)
    config.model = ml_collections.ConfigDict(
        dataclasses.replace(model.config, max_seq_len=base.model.max_seq_len).to_dict()
    )
    config.objective.update(**objective)
    exp = loop.build_experiment(config)
    state = loop.init_state(exp)
    frozen = load_frozen(exp)
    step, _ = loop.compile_steps(exp)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.seq_len)
    batch = {k: np.ones(shape, np.int32) for k in MODEL_INPUTS}
    batch["inputs"] = rng.integers(0, exp.model_config.vocab_size, shape).astype(np.int32)
    batch["targets"] = rng.integers(0, exp.model_config.vocab_size, shape).astype(np.int32)
    batch["positions"] = np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    batch = sharding.global_batch_to_devices(batch, exp.mesh)
    compiled = step.lower(state, batch, frozen).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, frozen)
        return metrics

    return run


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = base_config()
    e = config.experiment
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    batches, lengths = tuple(e.decode_batches), tuple(e.decode_lengths)
    prompt_len = int(e.prompt_len)
    # Room for the longest decode and for the train step's sequences.
    built = built_models(config, max(prompt_len + max(lengths), config.model.max_seq_len))
    token_id = 1

    step_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_source = pretrained.save_model_source(tmp, built[TEACHER])
        calls = {}
        for name in STUDENTS:
            calls[f"{name} distill_kl"] = train_step(
                config,
                built[name],
                dict(name="distill_kl", teacher=teacher_source, temperature=1.0),
            )
            calls[f"{name} next_token"] = train_step(config, built[name], dict(name="next_token"))
        step_s = round_robin_medians(calls, repeats)
    step_ratio = {n: step_s[f"{n} distill_kl"] / step_s[f"{n} next_token"] for n in STUDENTS}

    speeds: dict[str, dict[str, float]] = {n: {} for n in built}
    for rows in batches:
        for length in lengths:
            calls = {
                n: greedy_decoder(m, rows, prompt_len, length, token_id) for n, m in built.items()
            }
            for n, s in round_robin_medians(calls, repeats).items():
                speeds[n][f"b={rows},T={length}"] = rows * length / s
    decode_ratio = {n: {c: speeds[n][c] / speeds[TEACHER][c] for c in speeds[n]} for n in STUDENTS}

    print(f"median of {repeats} rounds; train step [{config.batch_size}, {config.seq_len}]")
    print("| student | distill_kl ms | next_token ms | distill / plain |")
    print("|---|---:|---:|---:|")
    for n in STUDENTS:
        print(
            f"| {n} | {step_s[f'{n} distill_kl'] * 1e3:.1f} | "
            f"{step_s[f'{n} next_token'] * 1e3:.1f} | {step_ratio[n]:.3f}x |"
        )
    cells = list(speeds[TEACHER])
    print(f"decode tokens/s after a {prompt_len}-token prompt; ratios student / teacher")
    print("| model | " + " | ".join(cells) + " |")
    print("|---|" + "---:|" * len(cells))
    for n in built:
        print(f"| {n} | " + " | ".join(f"{speeds[n][c]:,.0f}" for c in cells) + " |")
    for n in STUDENTS:
        print(
            f"| {n} / teacher | " + " | ".join(f"{decode_ratio[n][c]:.3f}x" for c in cells) + " |"
        )
    write_json(
        FLAGS.out,
        dict(
            step_ms={k: v * 1e3 for k, v in step_s.items()},
            step_ratio=step_ratio,
            decode_tokens_per_s=speeds,
            decode_ratio=decode_ratio,
            attention_layers={n: list(built[n].config.attention_layers) for n in STUDENTS},
            num_layers=built[TEACHER].config.num_layers,
            hidden_size=built[TEACHER].config.hidden_size,
            batch=[config.batch_size, config.seq_len],
            decode_batches=list(batches),
            decode_lengths=list(lengths),
            prompt_len=prompt_len,
            repeats=repeats,
            environment=environment(),
        ),
    )
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
