"""ACVI cost on the bilinear game on two simplices (eta 0.05), against projected baselines.

For each size (``dim`` per simplex, 100 to 10,000), each method runs a fixed number of steps from
the same random start; reported: operator evaluations and wall time (compiled, median of
``--repeats``) until the relative error first drops below 0.02, and the time per step, as ratios
to extragradient timed in the same run. Exact ACVI factorises a dense ``2 dim x 2 dim`` system,
so it is run up to ``--max_exact_dim``; I-ACVI, whose x-step is gradient steps, scales like the
baselines.

  python -m experiments.bench.acvi [--out=bench_results/bench_acvi.json] [--quick]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.bench.common import environment, time_calls, write_json
from jaxlab import solvers as S

flags.DEFINE_string("out", "bench_results/bench_acvi.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed runs (median reported).")
flags.DEFINE_integer("max_exact_dim", 2000, "Largest dim for exact ACVI (dense factorisation).")
flags.DEFINE_bool("quick", False, "Smoke run: small sizes, one repeat.")
FLAGS = flags.FLAGS

STEPS = 300
ACVI = dict(beta=0.5, mu0=1e-6, delta=0.5, outer_steps=10)


def methods(dim):
    runs = {
        "extragradient": lambda p, x: S.run_extragradient(p, x, step_size=0.5, num_steps=STEPS),
        "optimistic_gda": lambda p, x: S.run_optimistic_gda(p, x, step_size=0.5, num_steps=STEPS),
        "gda": lambda p, x: S.run_gda(p, x, step_size=0.5, num_steps=STEPS),
        "i-acvi": lambda p, x: S.acvi(
            p,
            x,
            S.ACVIConfig(
                **ACVI,
                last_inner_steps=STEPS - 9,
                x_step="inexact",
                subproblem_steps=5,
                subproblem_step_size=0.3,
            ),
        ),
    }
    if dim <= FLAGS.max_exact_dim:
        runs["acvi"] = lambda p, x: S.acvi(p, x, S.ACVIConfig(**ACVI, last_inner_steps=STEPS - 9))
    return runs


def iterates(trajectory):
    return trajectory.x if isinstance(trajectory, S.ACVITrajectory) else trajectory.iterates


def main(argv):
    del argv
    env = environment()
    dims = (20, 50) if FLAGS.quick else (100, 1000, 10000)
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    rows = []
    with jax.enable_x64(True):
        for dim in dims:
            problem = S.bilinear_simplex_game(dim, 0.05)
            rng = np.random.default_rng(dim)
            x0 = jnp.asarray(np.concatenate([rng.dirichlet(np.ones(dim)) for _ in range(2)]))
            timings = {}
            for name, run in methods(dim).items():
                trajectory = jax.block_until_ready(run(problem, x0))  # compiles
                total = time_calls(
                    functools.partial(run, problem, x0), repeats=repeats, warmup=0
                ).median
                steps = iterates(trajectory).shape[0]
                errors = jax.vmap(problem.relative_error)(iterates(trajectory))
                hit = S.first_reach(errors, trajectory.evaluations, 0.02)
                timings[name] = dict(
                    step_ms=1e3 * total / steps,
                    iterations=None if hit is None else hit[0],
                    evaluations=None if hit is None else hit[1],
                    time_to_target_ms=None if hit is None else 1e3 * total * hit[0] / steps,
                )
            base = timings["extragradient"]
            for name, t in timings.items():
                ratio = (
                    None
                    if t["time_to_target_ms"] is None or base["time_to_target_ms"] is None
                    else t["time_to_target_ms"] / base["time_to_target_ms"]
                )
                rows.append(
                    dict(
                        dim=dim,
                        method=name,
                        **t,
                        time_ratio_vs_eg=ratio,
                        step_ratio_vs_eg=t["step_ms"] / base["step_ms"],
                    )
                )
                print(
                    f"dim {dim:6d} {name:15s} step {t['step_ms']:8.3f} ms  to 0.02: "
                    f"{t['iterations']} it, {t['evaluations']} evals",
                    flush=True,
                )

    def show(v, f):
        return "not reached" if v is None else f.format(v)

    print(
        f"\nCPU ({env['cpu_count']} cores), float64, eta 0.05, median of {repeats}; ratios "
        "to extragradient in the same run (lower is faster)"
    )
    print(
        "| dim | method | ms / step | step ratio | iterations to 0.02 | evaluations | "
        "ms to 0.02 | time ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dim']} | {r['method']} | {r['step_ms']:.3f} | {r['step_ratio_vs_eg']:.2f}x | "
            f"{show(r['iterations'], '{}')} | {show(r['evaluations'], '{}')} | "
            f"{show(r['time_to_target_ms'], '{:.2f}')} | "
            f"{show(r['time_ratio_vs_eg'], '{:.2f}x')} |"
        )
    write_json(FLAGS.out, dict(environment=env, repeats=repeats, steps=STEPS, rows=rows))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
