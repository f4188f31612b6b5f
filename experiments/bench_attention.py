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

  python -m experiments.bench_attention [--out=bench_results/bench_attention.json] [--quick]
"""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.benchmarking import environment, write_json
from jaxlab import ops

flags.DEFINE_string("out", "bench_results/bench_attention.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: one short sequence, one repeat.")
FLAGS = flags.FLAGS

HASH_BUCKETS = (2, 8, 32)
QK_DROP_RATES = (0.2, 0.5, 0.8)


def sparsity_sweep(hash_buckets=HASH_BUCKETS, drop_rates=QK_DROP_RATES):
    """[(label, kind, level)]: hash with ``level`` buckets, qk with drop rate ``level``."""
    return ([(f"hash nb={n}", "hash", n) for n in hash_buckets]
            + [(f"qk drop={p:.1f}", "qk", p) for p in drop_rates])  # fmt: skip


def sparse_inputs(kind: str, level, batch: int, seq: int, heads: int, kv_heads: int, seed=0):
    """Random bucket ids (uniform over ``level`` buckets) or keep masks (drop rate ``level``)."""
    rng = np.random.default_rng(seed)
    if kind == "hash":
        return (rng.integers(0, level, (batch, seq, heads), dtype=np.int32),
                rng.integers(0, level, (batch, seq, kv_heads), dtype=np.int32))  # fmt: skip
    return (rng.random((batch, seq, heads)) >= level, rng.random((batch, seq, kv_heads)) >= level)


def allowed_pairs(kind: str, a: np.ndarray, b: np.ndarray) -> int:
    """Number of allowed causal (query, key) pairs over all rows and heads."""
    batch, seq, heads = a.shape
    groups = heads // b.shape[2]
    total = 0
    for bi in range(batch):
        for h in range(heads):
            qa, kb = a[bi, :, h], b[bi, :, h // groups]
            if kind == "qk":
                total += int(np.sum(qa * np.cumsum(kb)))
            else:
                counts = np.zeros(max(qa.max(), kb.max()) + 1, np.int64)
                for i in range(seq):  # keys j <= i in query i's bucket
                    counts[kb[i]] += 1
                    total += counts[qa[i]]
    return total


def sparse_fn(kind: str, a, b, seq: int, level, impl: str = "xla"):
    """The sparse attention under test, closed over its masks/buckets and static hints."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if kind == "hash":
        block = min(128, seq)
        window = ops.hash_window(seq, level, block) if impl == "xla" else None
        return lambda q, k, v: ops.hash_sparse_attention(q, k, v, a, b, impl=impl, block=block,
                                                         window=window)  # fmt: skip
    capacity = (int(a.sum(axis=1).max()), int(b.sum(axis=1).max())) if impl == "xla" else None
    return lambda q, k, v: ops.qk_sparse_attention(q, k, v, a, b, impl=impl, capacity=capacity)


def forward_and_backward(fn, cotangent):
    forward = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent),
                            argnums=(0, 1, 2)))  # fmt: skip
    return forward, grad


def median_ms(fn, args, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in ((axes[0], "forward_speedup", "forward"),
                           (axes[1], "fwd_bwd_speedup", "forward + backward")):  # fmt: skip
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
        impls = {
            "dense xla": (
                lambda q, k, v: ops.attention(q, k, v, causal=True),
                seq * (seq + 1) // 2 * batch * heads,
            ),
            "jax.nn.dot_product_attention": (
                lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
                seq * (seq + 1) // 2 * batch * heads,
            ),
        }
        for label, kind, level in sparsity_sweep():
            a, b = sparse_inputs(kind, level, batch, seq, heads, heads, seed=seq)
            impls[label] = (sparse_fn(kind, a, b, seq, level), allowed_pairs(kind, a, b))
        compiled = {name: forward_and_backward(fn, ct) for name, (fn, _) in impls.items()}
        for fwd, bwd in compiled.values():  # compile and warm up outside the timed rounds
            jax.block_until_ready((fwd(q, k, v), bwd(q, k, v)))
        times = {name: ([], []) for name in impls}
        for _ in range(repeats):  # round-robin, so drift in machine load hits all alike
            for name, (fwd, bwd) in compiled.items():
                times[name][0].append(median_ms(fwd, (q, k, v), 1))
                times[name][1].append(median_ms(bwd, (q, k, v), 1))
        base_f, base_b = (statistics.median(t) for t in times["dense xla"])
        dense_pairs = impls["dense xla"][1]
        for name, (fwd_t, bwd_t) in times.items():
            f, b = statistics.median(fwd_t), statistics.median(bwd_t)
            rows.append(dict(seq=seq, impl=name, forward_ms=f, fwd_bwd_ms=b,
                             forward_speedup=base_f / f, fwd_bwd_speedup=base_b / b,
                             ideal=dense_pairs / max(impls[name][1], 1)))  # fmt: skip
            r = rows[-1]
            print(f"seq {seq:5d} {name:30s} fwd {f:9.2f} ms ({r['forward_speedup']:5.2f}x)  "
                  f"fwd+bwd {b:9.2f} ms ({r['fwd_bwd_speedup']:5.2f}x)  ideal {r['ideal']:5.2f}x",
                  flush=True)  # fmt: skip
    print(f"\nCPU ({env['cpu_count']} cores), float32, batch {batch}, heads {heads}, "
          f"head_dim {dim}; median of {repeats}; speedup = dense xla time / time")  # fmt: skip
    print("| seq | implementation | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup | ideal |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seq']} | {r['impl']} | {r['forward_ms']:.1f} | "
              f"{r['forward_speedup']:.2f}x | {r['fwd_bwd_ms']:.1f} | "
              f"{r['fwd_bwd_speedup']:.2f}x | {r['ideal']:.2f}x |")  # fmt: skip
    shape = dict(batch=batch, heads=heads, head_dim=dim)
    write_json(FLAGS.out, dict(environment=env, shape=shape, repeats=repeats, rows=rows))
    png = os.path.splitext(FLAGS.out)[0] + ".png"
    plot(rows, png)
    print(f"wrote {FLAGS.out} and {png}")


if __name__ == "__main__":
    app.run(main)
