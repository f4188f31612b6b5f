"""Training cost of UDP against ERM, PGD-AT and TRADES, as ratios to ERM timed in the same run.

Two classifiers: an MLP on LMS-7 slab data (batch 128) and the LeNet-style CNN on 28x28x1 images
(random pixels: the cost does not depend on the values; batch 64). Every perturbation takes
``--steps`` ascent steps per batch. Reported: median ms per training step over ``--repeats``
timed epochs of ``--batches`` batches (compiled first), and the ratio to ERM.

  python -m experiments.bench.udp [--out=bench_results/bench_udp.json] [--quick]
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments.bench.common import environment, time_calls, write_json
from jaxlab import robust as R
from jaxlab.data import synthetic
from jaxlab.models.classifiers import MLPClassifier, SmallCNN, functional
from jaxlab.objectives import init_train_state, make_train_step

flags.DEFINE_string("out", "bench_results/bench_udp.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed epochs (median reported).")
flags.DEFINE_integer("batches", 20, "Batches per timed epoch.")
flags.DEFINE_integer("steps", 10, "Ascent steps per perturbation.")
flags.DEFINE_bool("quick", False, "Smoke run: few batches, one repeat.")
FLAGS = flags.FLAGS


def setups():
    x, y = synthetic.slab_data(4096, seed=0)
    images = np.random.default_rng(0).uniform(0, 1, (2048, 28, 28, 1)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 2048)
    return {
        "mlp_slab": (
            MLPClassifier(2, (100, 100), 2, rngs=nnx.Rngs(0)),
            x.astype(np.float32),
            y,
            128,
            0.3,
        ),
        "lenet_28x28": (SmallCNN((28, 28, 1), 10, rngs=nnx.Rngs(0)), images, labels, 64, 0.1),
    }


def main(argv):
    del argv
    repeats, num_batches = (1, 3) if FLAGS.quick else (FLAGS.repeats, FLAGS.batches)
    rows = []
    for name, (model, x, y, batch_size, eps) in setups().items():
        apply_fn, params = functional(model)
        optimizer = optax.adam(1e-3)
        ball = dict(epsilon=eps, step_size=eps / FLAGS.steps, num_steps=FLAGS.steps)
        methods = {
            "erm": (None, "clean"),
            "udp": (R.perturbation("udp", apply_fn, **ball), "perturbed"),
            "pgd": (R.perturbation("pgd", apply_fn, **ball), "perturbed"),
            "trades": (R.perturbation("trades", apply_fn, **ball), "trades"),
        }
        base = None
        for method, (transform, mode) in methods.items():
            objective = R.classifier_objective(apply_fn, transform=transform, mode=mode)
            step = jax.jit(make_train_step(None, optimizer, objective=objective))
            data = R.batches(x, y, batch_size, 0)
            batches = [next(data) for _ in range(num_batches)]
            state = [init_train_state(params, optimizer, objective.init())]

            def epoch(step=step, batches=batches, state=state):
                for batch in batches:
                    state[0], metrics = step(state[0], batch)
                jax.block_until_ready(metrics["loss"])

            ms = time_calls(epoch, repeats=repeats).median / num_batches * 1e3
            base = ms if method == "erm" else base
            rows.append(
                dict(
                    model=name,
                    method=method,
                    ms_per_step=ms,
                    ratio_to_erm=ms / base,
                    ascent_steps=0 if transform is None else FLAGS.steps,
                )
            )
            print(f"{name:12s} {method:7s} {ms:8.2f} ms/step  x{ms / base:5.2f} vs ERM", flush=True)
    write_json(FLAGS.out, dict(environment=environment(), rows=rows))


if __name__ == "__main__":
    app.run(main)
