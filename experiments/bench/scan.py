"""Selective scans and SSD on the CPU, and recurrent against KV-cache decoding.

1. Mamba-1 selective scan (batch 2, dim 256, state 16) and Mamba-2 SSD (batch 2, 8 heads of 32,
   state 64), seq 512..4096: forward and forward+backward of the XLA implementations of
   :mod:`jaxlab.ops.scan` (``associative``, ``chunked``) as ratios to ``sequential`` (``lax.scan``)
   timed in the same run (median of ``--repeats``, round-robin). Interpret-mode Pallas timings say
   nothing about the kernels, so they are left to ``make bench-gpu``.
2. Generation: a Mamba-1 LM against a Transformer of the same width and depth (lm_tiny's shape),
   greedy, 64 new tokens after prompts of 128..2048 tokens, batch 8: tokens/s as a ratio. The
   claim under test: a fixed-size recurrent state makes each step's cost independent of the
   context, where attention reads a KV cache that grows with it.

  python -m experiments.bench.scan [--out=bench_results/bench_scan.json] [--quick]
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments.bench.common import environment, time_calls, write_json
from jaxlab import models
from jaxlab.infer import generate
from jaxlab.ops import scan

flags.DEFINE_string("out", "bench_results/bench_scan.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 3, "Timed rounds (median reported).")
flags.DEFINE_bool("quick", False, "Smoke run: short sequences, one repeat.")
FLAGS = flags.FLAGS


def scan_inputs(kind, seq, key):
    ks = jax.random.split(key, 6)
    if kind == "selective_scan":
        batch, dim, groups, state = 2, 256, 1, 16
        args = (
            jax.random.normal(ks[0], (batch, seq, dim)),
            0.1 * jax.random.normal(ks[1], (batch, seq, dim)),
            -jnp.exp(jax.random.normal(ks[2], (dim, state))),
            jax.random.normal(ks[3], (batch, seq, groups, state)),
            jax.random.normal(ks[4], (batch, seq, groups, state)),
        )
        return args, jax.random.normal(ks[5], (batch, seq, dim))
    batch, heads, head_dim, groups, state = 2, 8, 32, 1, 64
    args = (
        jax.random.normal(ks[0], (batch, seq, heads, head_dim)),
        0.1 * jax.random.normal(ks[1], (batch, seq, heads)),
        -jnp.exp(jax.random.normal(ks[2], (heads,))),
        jax.random.normal(ks[3], (batch, seq, groups, state)),
        jax.random.normal(ks[4], (batch, seq, groups, state)),
    )
    return args, jax.random.normal(ks[5], (batch, seq, heads, head_dim))


def scan_part(seqs, repeats):
    rows = []
    for kind in ("selective_scan", "ssd"):
        for seq in seqs:
            args, ct = scan_inputs(kind, seq, jax.random.key(seq))
            fns = {}
            for impl in ("sequential", "associative", "chunked"):
                if kind == "selective_scan":

                    def fn(*a, impl=impl):
                        return scan.selective_scan(
                            *a, delta_softplus=True, impl=impl, chunk_size=64
                        )[0]
                else:

                    def fn(*a, impl=impl):
                        return scan.ssd(*a, dt_softplus=True, impl=impl, chunk_size=64)[0]

                def loss(*a, fn=fn, ct=ct):
                    return jnp.sum(fn(*a) * ct)

                fns[impl] = (jax.jit(fn), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))))
            for fwd, bwd in fns.values():
                jax.block_until_ready((fwd(*args), bwd(*args)))
            times = {impl: ([], []) for impl in fns}
            for _ in range(repeats):
                for impl, (fwd, bwd) in fns.items():
                    for i, fn in enumerate((fwd, bwd)):
                        timing = time_calls(functools.partial(fn, *args), repeats=1, warmup=0)
                        times[impl][i].append(timing.median * 1e3)
            base = [statistics.median(t) for t in times["sequential"]]
            for impl, (f, b) in times.items():
                f, b = statistics.median(f), statistics.median(b)
                rows.append(
                    dict(
                        kind=kind,
                        seq=seq,
                        impl=impl,
                        forward_ms=f,
                        fwd_bwd_ms=b,
                        forward_speedup=base[0] / f,
                        fwd_bwd_speedup=base[1] / b,
                    )
                )
                print(
                    f"{kind:15s} seq {seq:5d} {impl:12s} fwd {f:9.2f} ms "
                    f"({base[0] / f:5.2f}x)  fwd+bwd {b:9.2f} ms ({base[1] / b:5.2f}x)",
                    flush=True,
                )
    return rows


def generation_part(prompts, batch, new_tokens, repeats, small):
    width = dict(hidden_size=64 if small else 256, num_layers=2 if small else 4)
    transformer = models.TransformerConfig(
        vocab_size=259,
        intermediate_size=4 * width["hidden_size"],
        num_heads=8,
        num_kv_heads=4,
        max_seq_len=max(prompts) + new_tokens,
        tie_embeddings=True,
        **width,
    )
    mamba = models.MambaConfig(
        vocab_size=259,
        mixer="mamba1",
        expand=2,
        state_size=16,
        tie_embeddings=True,
        max_seq_len=max(prompts) + new_tokens,
        **width,
    )
    built = {
        name: models.build(c, nnx.Rngs(0))
        for name, c in (("Transformer", transformer), ("Mamba-1", mamba))
    }
    rows = []
    for prompt in prompts:
        tokens = np.random.default_rng(prompt).integers(0, 259, (batch, prompt)).astype(np.int32)
        run = {
            name: (
                lambda m=m, tokens=tokens: jax.block_until_ready(
                    generate(m, tokens, max_new_tokens=new_tokens, stop_tokens=()).tokens
                )
            )
            for name, m in built.items()
        }
        for fn in run.values():
            fn()
        times = {name: [] for name in run}
        for _ in range(repeats):
            for name, fn in run.items():
                times[name].append(time_calls(fn, repeats=1, warmup=0).median)
        rate = {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}
        rows.append(
            dict(
                prompt=prompt,
                batch=batch,
                new_tokens=new_tokens,
                tokens_per_s=rate,
                mamba_over_transformer=rate["Mamba-1"] / rate["Transformer"],
            )
        )
        print(
            f"prompt {prompt:5d}: Transformer {rate['Transformer']:8.1f} tok/s, Mamba-1 "
            f"{rate['Mamba-1']:8.1f} tok/s ({rows[-1]['mamba_over_transformer']:.2f}x)",
            flush=True,
        )
    return rows


def main(argv):
    del argv
    env = environment()
    repeats = 1 if FLAGS.quick else FLAGS.repeats
    seqs = (128,) if FLAGS.quick else (512, 1024, 4096)
    scans = scan_part(seqs, repeats)
    prompts = (32,) if FLAGS.quick else (128, 512, 2048)
    gen = generation_part(
        prompts, 2 if FLAGS.quick else 8, 8 if FLAGS.quick else 64, repeats, FLAGS.quick
    )
    print(
        f"\nCPU ({env['cpu_count']} cores), float32, median of {repeats}; speedup = "
        "sequential time / time"
    )
    print("| scan | seq | implementation | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in scans:
        print(
            f"| {r['kind']} | {r['seq']} | {r['impl']} | {r['forward_ms']:.2f} | "
            f"{r['forward_speedup']:.2f}x | {r['fwd_bwd_ms']:.2f} | "
            f"{r['fwd_bwd_speedup']:.2f}x |"
        )
    print(
        "\n| prompt | batch | new tokens | Transformer tok/s | Mamba-1 tok/s | "
        "Mamba / Transformer |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in gen:
        t = r["tokens_per_s"]
        print(
            f"| {r['prompt']} | {r['batch']} | {r['new_tokens']} | {t['Transformer']:.1f} | "
            f"{t['Mamba-1']:.1f} | {r['mamba_over_transformer']:.2f}x |"
        )
    write_json(FLAGS.out, dict(environment=env, repeats=repeats, scans=scans, generation=gen))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
