"""Optimizer update time and state size: jaxlab AdEMAMix against optax's AdamW and AdEMAMix.

One jitted step ``(params, state, grads) -> (params, state)`` (the update plus
``optax.apply_updates``, params and state donated) on a ~50M-parameter float32 pytree shaped like
a transformer's, median of ``--repeats`` steps. The step is memory-bound: AdamW reads and writes 7
arrays per parameter (g, m, v, p in; m, v, p out), AdEMAMix 9 (plus the slow EMA), AdEMAMix with
``b1 = 0`` 7 again; so about 1.29x AdamW is the floor for the default and 1.0x for ``b1 = 0``
when every leaf's update is one loop.

XLA:CPU does not build multi-output loops (jaxlib 0.10.2 has no option for them), so each stored
moment is its own loop that reads the gradient again, and the parameter loop reads the new moments
back: 4 writes and 10 reads per parameter for AdEMAMix, 3 and 8 for ``b1 = 0`` (its parameter
loop reads the gradient once more), 3 and 7 for AdamW; so 1.4x and 1.1x AdamW, the floor for
moments kept in arrays of their own on this backend. The ``HLO passes`` column reports this
from the compiled step itself (XLA's cost analysis: bytes read and written over the parameters'
bytes), which, unlike the timings, does not depend on the machine's load.

  python -m experiments.bench.optim [--out=bench_results/bench_optim.json] [--quick]
"""

from __future__ import annotations

import functools
import os
import statistics

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from experiments.bench.common import environment, time_calls, write_json
from jaxlab.optim import ademamix

flags.DEFINE_string("out", "bench_results/bench_optim.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 30, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: a ~2M-parameter tree, 2 repeats.")
FLAGS = flags.FLAGS

HYPER = dict(b1=0.9, b2=0.999, b3=0.9999, alpha=5.0, weight_decay=0.1)


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "optax.adamw": optax.adamw(1e-3, b1=0.9, b2=0.999, weight_decay=0.1),
        "jaxlab ademamix": ademamix(1e-3, **HYPER),
        "jaxlab ademamix b1=0": ademamix(1e-3, **{**HYPER, "b1": 0.0}),
        "optax.contrib.ademamix": optax.contrib.ademamix(1e-3, **HYPER),
    }


def make_params(width: int, layers: int, vocab: int) -> dict:
    """A transformer-shaped tree: embedding plus per layer 4 attention and 3 MLP matrices."""
    key = jax.random.PRNGKey(0)
    shapes = {"embed": (vocab, width)}
    for i in range(layers):
        shapes.update({f"l{i}.{n}": (width, width) for n in ("q", "k", "v", "o")})
        shapes.update({f"l{i}.{n}": (width, 4 * width) for n in ("gate", "up")})
        shapes[f"l{i}.down"] = (4 * width, width)
        shapes[f"l{i}.norm"] = (width,)
    keys = jax.random.split(key, len(shapes))
    return {
        n: jax.random.normal(k, s) * 0.02 for (n, s), k in zip(shapes.items(), keys, strict=True)
    }


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def hlo_passes(step, params, state, grads) -> float:
    """Bytes the compiled ``step`` reads and writes (XLA's cost analysis), in parameter passes:
    over the bytes of ``params``."""
    cost = step.lower(params, state, grads).compile().cost_analysis()
    return cost["bytes accessed"] / state_bytes(params)


def time_optimizers(txs: dict, params, grads, repeats: int) -> dict[str, dict[str, float]]:
    """Median step time, state bytes and :func:`hlo_passes` per optimizer.

    Steps of the optimizers are interleaved round by round (in a rotating order), so a slow
    spell of the machine hits all of them alike.
    """

    def make_step(tx):
        def step(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        return jax.jit(step, donate_argnums=(0, 1))

    runs = {}
    for name, tx in txs.items():
        p = jax.tree.map(jnp.copy, params)
        s = tx.init(p)
        step = make_step(tx)
        passes = hlo_passes(step, p, s, grads)
        runs[name] = [step, *jax.block_until_ready(step(p, s, grads)), state_bytes(s), [], passes]
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step, p, s, _, times, _ = runs[name]
            timing = time_calls(functools.partial(step, p, s, grads), repeats=1, warmup=0)
            p, s = timing.output
            times.append(timing.median)
            runs[name][1:3] = [p, s]
    return {
        name: dict(ms=statistics.median(run[4]) * 1e3, state_mib=run[3] / 2**20, hlo_passes=run[5])
        for name, run in runs.items()
    }


def main(argv):
    del argv
    width, layers, vocab = (256, 2, 2048) if FLAGS.quick else (768, 4, 16000)
    repeats = 2 if FLAGS.quick else FLAGS.repeats
    params = make_params(width, layers, vocab)
    n = sum(x.size for x in jax.tree.leaves(params))
    grads = jax.tree.map(lambda x: jnp.sin(x * 1000.0), params)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{n / 1e6:.1f}M float32 parameters in {len(params)} arrays; median of {repeats} "
        f"steps (update + apply_updates, donated); {jax.default_backend()}; load average {load}"
    )
    rows = time_optimizers(optimizers(), params, grads, repeats)
    base = rows["optax.adamw"]
    goals = {"jaxlab ademamix": 1.3, "jaxlab ademamix b1=0": 1.05}
    print()
    print(
        "| optimizer | update ms | time / AdamW | HLO passes | passes / AdamW | state MiB "
        "| state / AdamW | goal | met |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, row in rows.items():
        row["time_ratio"] = row["ms"] / base["ms"]
        row["passes_ratio"] = row["hlo_passes"] / base["hlo_passes"]
        row["state_ratio"] = row["state_mib"] / base["state_mib"]
        goal = goals.get(name)
        met = "" if goal is None else ("yes" if row["time_ratio"] <= goal else "no")
        goal_text = "" if goal is None else f"<= {goal}x"
        print(
            f"| {name} | {row['ms']:.1f} | {row['time_ratio']:.2f}x | {row['hlo_passes']:.2f} "
            f"| {row['passes_ratio']:.2f}x | {row['state_mib']:,.0f} | {row['state_ratio']:.2f}x "
            f"| {goal_text} | {met} |"
        )
    ours, contrib = rows["jaxlab ademamix"]["ms"], rows["optax.contrib.ademamix"]["ms"]
    print(
        f"\njaxlab ademamix faster than optax.contrib.ademamix: "
        f"{'yes' if ours < contrib else 'no'} ({ours:.1f} vs {contrib:.1f} ms)"
    )
    write_json(FLAGS.out, dict(parameters=n, repeats=repeats, rows=rows, environment=environment()))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
