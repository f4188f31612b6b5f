"""Sparse causal attention on the CPU: XLA sparse paths against dense XLA attention.

For sequence lengths 1k..8k (batch 1, 4 heads, head_dim 64, float32) and the paper's sparsity
sweep (hash buckets drawn uniformly at random; queries and keys dropped independently at random),
times the forward and the forward+backward of ``jaxlab.ops.hash_sparse_attention`` /
``qk_sparse_attention`` (``impl='xla'``, sort/gather/scatter included) and of
``jax.nn.dot_product_attention``, as ratios to jaxlab's dense causal attention timed in the same
run (median of ``--repeats``, round-robin). ``ideal`` is the ratio of allowed (query, key) pairs,
dense over sparse: the speedup of a kernel whose work is exactly the allowed pairs.

The XLA paths have static shapes: the QK path gets the batch's largest kept count as its capacity
(known here because the masks are concrete), the hash path a window of key tiles from
``hash_window``; both stay exact when the hint is too small. The Pallas kernels' timings need a
GPU: ``make bench-gpu``.

  python -m experiments.bench.attention [--out=bench_results/bench_attention.json] [--quick]
"""

from __future__ import annotations

import functools
import os
import statistics

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench.common import (
    allowed_pairs,
    environment,
    sparse_inputs,
    sparsity_sweep,
    time_calls,
    write_json,
)
from jaxlab import ops

flags.DEFINE_string("out", "bench_results/bench_attention.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: one short sequence, one repeat.")
FLAGS = flags.FLAGS


def sparse_fn(kind: str, a, b, seq: int, level, impl: str = "xla"):
    """``fn(q, k, v, a, b)``: the sparse attention under test with its static size hints.

    The masks/buckets are arguments, not closed-over constants: XLA would otherwise constant-fold
    the gathers they index, which takes minutes to compile.
    """
    if kind == "hash":
        block = min(128, seq)
        window = ops.hash_window(seq, level, block) if impl == "xla" else None
        return functools.partial(ops.hash_sparse_attention, impl=impl, block=block, window=window)
    capacity = (int(a.sum(axis=1).max()), int(b.sum(axis=1).max())) if impl == "xla" else None
    return functools.partial(ops.qk_sparse_attention, impl=impl, capacity=capacity)


def forward_and_backward(fn, cotangent):
    """Jitted ``fn(q, k, v, *masks)`` and its gradient in q, k, v."""
    forward = jax.jit(fn)

    def loss(q, k, v, *masks):
        return jnp.sum(fn(q, k, v, *masks).astype(jnp.float32) * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return forward, grad


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "forward_speedup", "forward"),
        (axes[1], "fwd_bwd_speedup", "forward + backward"),
    ):
        for label in dict.fromkeys(r["impl"] for r in rows):
            pts = [(r["seq"], r[key]) for r in rows if r["impl"] == label]
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_title(f"{title}: speedup over dense XLA attention")
    axes[0].set_ylabel("dense time / time")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    env = environment()
    batch, heads, dim = 1, 4, 64
    seqs = (256,) if FLAGS.quick else (1024, 2048, 4096, 8192)
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    rows = []
    for seq in seqs:
        keys = jax.random.split(jax.random.key(seq), 4)
        q, k, v, ct = (jax.random.normal(key, (batch, seq, heads, dim)) for key in keys)
        dense_pairs = seq * (seq + 1) // 2 * batch * heads
        # name -> (fn(q, k, v, *masks), masks, allowed pairs)
        impls = {
            "dense xla": (lambda q, k, v: ops.attention(q, k, v, causal=True), (), dense_pairs),
            "jax.nn.dot_product_attention": (
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                (),
                dense_pairs,
            ),
        }
        for label, kind, level in sparsity_sweep():
            a, b = sparse_inputs(kind, level, batch, seq, heads, heads, seed=seq)
            impls[label] = (
                sparse_fn(kind, a, b, seq, level),
                (jnp.asarray(a), jnp.asarray(b)),
                allowed_pairs(kind, a, b),
            )
        compiled = {name: forward_and_backward(fn, ct) for name, (fn, _, _) in impls.items()}
        args = {name: (q, k, v, *masks) for name, (_, masks, _) in impls.items()}
        for name, (fwd, bwd) in compiled.items():  # compile and warm up outside the timed rounds
            jax.block_until_ready((fwd(*args[name]), bwd(*args[name])))
        times = {name: ([], []) for name in impls}
        for _ in range(repeats):  # round-robin, so drift in machine load hits all alike
            for name, (fwd, bwd) in compiled.items():
                for i, fn in enumerate((fwd, bwd)):
                    timing = time_calls(functools.partial(fn, *args[name]), repeats=1, warmup=0)
                    times[name][i].append(timing.median * 1e3)
        base_f, base_b = (statistics.median(t) for t in times["dense xla"])
        for name, (fwd_t, bwd_t) in times.items():
            f, b = statistics.median(fwd_t), statistics.median(bwd_t)
            rows.append(
                dict(
                    seq=seq,
                    impl=name,
                    forward_ms=f,
                    fwd_bwd_ms=b,
                    forward_speedup=base_f / f,
                    fwd_bwd_speedup=base_b / b,
                    ideal=dense_pairs / max(impls[name][2], 1),
                )
            )
            r = rows[-1]
            print(
                f"seq {seq:5d} {name:30s} fwd {f:9.2f} ms ({r['forward_speedup']:5.2f}x)  "
                f"fwd+bwd {b:9.2f} ms ({r['fwd_bwd_speedup']:5.2f}x)  ideal {r['ideal']:5.2f}x",
                flush=True,
            )
    print(
        f"\nCPU ({env['cpu_count']} cores), float32, batch {batch}, heads {heads}, "
        f"head_dim {dim}; median of {repeats}; speedup = dense xla time / time"
    )
    print("| seq | implementation | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup | ideal |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['seq']} | {r['impl']} | {r['forward_ms']:.1f} | "
            f"{r['forward_speedup']:.2f}x | {r['fwd_bwd_ms']:.1f} | "
            f"{r['fwd_bwd_speedup']:.2f}x | {r['ideal']:.2f}x |"
        )
    shape = dict(batch=batch, heads=heads, head_dim=dim)
    write_json(FLAGS.out, dict(environment=env, shape=shape, repeats=repeats, rows=rows))
    png = os.path.splitext(FLAGS.out)[0] + ".png"
    plot(rows, png)
    print(f"wrote {FLAGS.out} and {png}")


if __name__ == "__main__":
    app.run(main)
