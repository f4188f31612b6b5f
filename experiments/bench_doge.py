"""Cost of a DoGE proxy step against a plain training step, timed in the same run.

The byte-level Llama of configs/doge.py (2 layers, 128 wide) on batches of 16 x 128 tokens drawn
from ``--domains`` embedded-corpus domains. Steps compared (each jitted, compiled first, median
of ``--repeats`` timed runs of ``--steps`` steps):

* ``plain``: the engine's training step;
* ``doge``: per-domain gradients (vmapped backward passes) and the universal DoGE update over all
  parameters;
* ``doge_selected``: the same with a parameter filter keeping the 2 smallest tensors (the score
  matrix is then tiny; the backward passes are not);
* ``doge_ood``: one domain held out as the target (its gradient is computed too);
* ``doremi``: proxy and reference forward passes and one backward pass.

  python -m experiments.bench_doge [--out=bench_results/bench_doge.json] [--quick]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import doge as doge_config
from experiments.benchmarking import environment, timed_median, write_json
from jaxlab import mixing, models
from jaxlab.data import pipeline
from jaxlab.train import loop
from jaxlab.train.step import TrainState, make_mixer_train_step, make_train_step

flags.DEFINE_string("out", "bench_results/bench_doge.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed runs (median reported).")
flags.DEFINE_integer("steps", 10, "Steps per timed run.")
flags.DEFINE_integer("domains", 5, "Number of domains.")
flags.DEFINE_bool("quick", False, "Smoke run: 2 steps, one repeat.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    repeats, steps = (1, 2) if FLAGS.quick else (FLAGS.repeats, FLAGS.steps)
    config = doge_config.get_config().corpus.lm
    names = doge_config.get_config().corpus.domains[: FLAGS.domains]
    config.data.sources = tuple(f"embedded:{d}" for d in names)
    exp = loop.build_experiment(config)
    k = len(names)
    params = nnx.to_pure_dict(nnx.state(models.build(exp.model_config, nnx.Rngs(0)), nnx.Param))
    iterator = pipeline.train_iterator(config.data, exp.tokenizer, config.seq_len,
                                       config.batch_size, weights=[1.0] * k)  # fmt: skip
    keys = (*loop.MODEL_INPUTS, "domain")
    batches = [{key: jnp.asarray(b[key]) for key in keys}
               for b in (next(iterator) for _ in range(steps))]  # fmt: skip
    leaves = jax.tree.leaves(params)
    smallest = set(np.argsort([leaf.size for leaf in leaves])[:2].tolist())
    selected = jax.tree.unflatten(jax.tree.structure(params),
                                  [i in smallest for i in range(len(leaves))])  # fmt: skip
    common = dict(learning_rate=exp.schedule)

    def doge(num, **kw):
        return mixing.doge(num_domains=num, mu=0.01, lr_schedule=exp.schedule, **kw)

    names_t = tuple(names)
    variants = {
        "plain": (make_train_step(exp.graphdef, exp.optimizer, **common), ()),
        "doge": (make_mixer_train_step(exp.graphdef, exp.optimizer, doge(k), kind="doge",
                                       train_domains=tuple(range(k)), domain_names=names_t,
                                       **common), doge(k).init()),
        "doge_selected": (make_mixer_train_step(
            exp.graphdef, exp.optimizer, doge(k, param_filter=selected), kind="doge",
            train_domains=tuple(range(k)), domain_names=names_t, **common), doge(k).init()),
        "doge_ood": (make_mixer_train_step(
            exp.graphdef, exp.optimizer, doge(k - 1, objective="ood"), kind="doge",
            train_domains=tuple(range(k - 1)), target_domains=(k - 1,),
            domain_names=names_t[: k - 1], **common), doge(k - 1, objective="ood").init()),
        "doremi": (make_mixer_train_step(
            exp.graphdef, exp.optimizer, mixing.doremi(num_domains=k), kind="doremi",
            train_domains=tuple(range(k)), domain_names=names_t, reference_params=params,
            **common), mixing.doremi(num_domains=k).init()),
    }  # fmt: skip
    rows, base = [], None
    for name, (step, mixer_state) in variants.items():
        step = jax.jit(step)
        state = [TrainState(jnp.zeros((), jnp.int32), params, exp.optimizer.init(params),
                            mixer_state)]  # fmt: skip

        def run(step=step, state=state):
            s = state[0]
            for batch in batches:
                s, metrics = step(s, batch)
            jax.block_until_ready(metrics["loss"])
            state[0] = s

        ms = timed_median(run, repeats) / steps * 1e3
        base = ms if name == "plain" else base
        rows.append(dict(variant=name, ms_per_step=ms, ratio_to_plain=ms / base, domains=k))
        print(f"{name:14s} {ms:8.1f} ms/step  x{ms / base:5.2f}", flush=True)
    write_json(FLAGS.out, dict(environment=environment(), rows=rows, selected_tensors=2,
                               total_tensors=len(leaves)))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
