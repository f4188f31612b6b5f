"""Sparse causal attention on the CPU: XLA sparse paths against dense XLA attention.

For sequence lengths 1k..8k (batch 1, 4 heads, head_dim 64, float32) and the paper's sparsity
sweep (hash buckets drawn uniformly at random; queries and keys dropped independently at random),
times the forward and the forward+backward of ``jaxlab.ops.hash_sparse_attention`` /
``qk_sparse_attention`` (``impl='xla'``, sort/gather/scatter included; and ``impl='auto'``, rows
``... auto``, which runs the XLA path or the dense masked one by the static rule of
``jaxlab.ops.sparse_attention.XLA_MAX_WORK``) and of ``jax.nn.dot_product_attention``, as ratios
to jaxlab's dense causal attention timed in the same run (median of ``--repeats``, round-robin).
``ideal`` is the ratio of allowed (query, key) pairs, dense over sparse: the speedup of a kernel
whose work is exactly the allowed pairs. A last table gives each ``auto`` row's static work
fraction, what it ran, and its forward+backward speedup (issue 25's acceptance: never below 1x).

The XLA paths have static shapes: the QK path gets the batch's largest kept count as its capacity
(known here because the masks are concrete), the hash path a window of key tiles from
``hash_window``; both stay exact when the hint is too small. The Pallas kernels' timings need a
GPU: ``make bench-gpu``.

  python -m experiments.bench.attention [--out=bench_results/bench_attention.json] [--quick]
      [--seqs=1024,2048,4096,8192]
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
from jaxlab.ops import sparse_attention as sparse_ops

flags.DEFINE_string("out", "bench_results/bench_attention.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: one short sequence, one repeat.")
flags.DEFINE_list("seqs", ["1024", "2048", "4096", "8192"], "Sequence lengths (not with --quick).")
FLAGS = flags.FLAGS


def sparse_hints(kind: str, a, b, seq: int, level) -> dict:
    """The static size hints of the XLA paths (which ``impl='auto'`` also reads)."""
    if kind == "hash":
        block = min(128, seq)
        return dict(block=block, window=ops.hash_window(seq, level, block))
    return dict(capacity=(int(a.sum(axis=1).max()), int(b.sum(axis=1).max())))


def xla_work_and_auto_pick(kind: str, seq: int, hints: dict) -> tuple[float, str]:
    """The XLA path's fraction of dense work under ``hints``, and what ``impl='auto'`` runs."""
    if kind == "hash":
        return sparse_ops.hash_xla_work(seq, **hints), sparse_ops.hash_auto_impl(seq, **hints)
    return sparse_ops.qk_xla_work(seq, **hints), sparse_ops.qk_auto_impl(seq, **hints)


def sparse_fn(kind: str, a, b, seq: int, level, impl: str = "xla"):
    """``fn(q, k, v, a, b)``: the sparse attention under test with its static size hints.

    The masks/buckets are arguments, not closed-over constants: XLA would otherwise constant-fold
    the gathers they index, which takes minutes to compile.
    """
    fn = ops.hash_sparse_attention if kind == "hash" else ops.qk_sparse_attention
    hints = sparse_hints(kind, a, b, seq, level) if impl in ("xla", "auto") else {}
    return functools.partial(fn, impl=impl, **hints)


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
    seqs = (256,) if FLAGS.quick else tuple(int(s) for s in FLAGS.seqs)
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
        picks = {}  # auto row -> (the XLA path's work fraction, what auto runs)
        for label, kind, level in sparsity_sweep():
            a, b = sparse_inputs(kind, level, batch, seq, heads, heads, seed=seq)
            masks, pairs = (jnp.asarray(a), jnp.asarray(b)), allowed_pairs(kind, a, b)
            for impl, name in (("xla", label), ("auto", f"{label} auto")):
                impls[name] = (sparse_fn(kind, a, b, seq, level, impl), masks, pairs)
            hints = sparse_hints(kind, a, b, seq, level)
            picks[f"{label} auto"] = xla_work_and_auto_pick(kind, seq, hints)
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
            if name in picks:
                rows[-1].update(xla_work=picks[name][0], auto_runs=picks[name][1])
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
    auto = [r for r in rows if "auto_runs" in r]
    print("\n`auto` against dense xla, forward+backward (the issue's acceptance: never below 1x)")
    print("| seq | setting | XLA path's work | auto runs | fwd+bwd speedup |")
    print("|---:|---|---:|---|---:|")
    for r in auto:
        print(
            f"| {r['seq']} | {r['impl']} | {r['xla_work']:.2f} | {r['auto_runs']} | "
            f"{r['fwd_bwd_speedup']:.2f}x |"
        )
    worst = min(auto, key=lambda r: r["fwd_bwd_speedup"])
    print(f"slowest auto: {worst['impl']} at seq {worst['seq']}, {worst['fwd_bwd_speedup']:.2f}x")
    shape = dict(batch=batch, heads=heads, head_dim=dim)
    write_json(FLAGS.out, dict(environment=env, shape=shape, repeats=repeats, rows=rows))
    png = os.path.splitext(FLAGS.out)[0] + ".png"
    plot(rows, png)
    print(f"wrote {FLAGS.out} and {png}")


if __name__ == "__main__":
    app.run(main)
