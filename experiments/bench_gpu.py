"""Attention on an accelerator: correctness on the device, then timings against jax's own kernels.

The prepared device check (``make bench-gpu``). It compares, for causal multi-head attention in
the ``[batch, seq, heads, head_dim]`` layout:

* ``jaxlab xla``: :func:`jaxlab.ops.attention` (the dense XLA path models use today),
* ``jax.nn.dot_product_attention`` (XLA or cuDNN, jax's choice),
* ``jax pallas mha``: ``jax.experimental.pallas.ops.gpu.attention.mha`` (Triton flash attention),

first their outputs and gradients against ``mha_reference`` on random inputs, then the median
forward and forward+backward times, as ratios to ``jax.nn.dot_product_attention`` timed in the same
run. Jaxlab's own Pallas kernels join this table as they land. Without an accelerator it refuses to
run unless ``--allow_cpu`` (a smoke test: tiny shapes, Pallas in interpret mode).

  python -m experiments.bench_gpu [--out=bench_results/bench_gpu.json]
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.benchmarking import write_json
from jaxlab import ops

flags.DEFINE_string("out", "bench_results/bench_gpu.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement (median reported).")
flags.DEFINE_bool("allow_cpu", False, "Run a tiny smoke version without an accelerator.")
FLAGS = flags.FLAGS


def implementations(interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    def pallas_mha(q, k, v):
        return pallas_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True,
                                    interpret=interpret)  # fmt: skip

    impls = {
        "jaxlab xla": lambda q, k, v: ops.attention(q, k, v, causal=True),
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True
        ),
        "jax pallas mha": pallas_mha,
    }
    reference = functools.partial(pallas_attention.mha_reference, segment_ids=None,
                                  sm_scale=None, causal=True)  # fmt: skip
    return impls, lambda q, k, v: reference(q, k, v, sm_scale=q.shape[-1] ** -0.5)


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv):
    del argv
    backend = jax.default_backend()
    if backend == "cpu" and not FLAGS.allow_cpu:
        raise SystemExit(f"bench-gpu needs an accelerator; jax sees {jax.devices()} "
                         "(pass --allow_cpu for a smoke run)")  # fmt: skip
    interpret = backend == "cpu"
    dtype = jnp.float32 if interpret else jnp.bfloat16
    shapes = [(1, 128, 2, 32)] if interpret else [(4, 2048, 16, 64), (1, 8192, 16, 128)]
    repeats = 2 if interpret else FLAGS.repeats
    impls, reference = implementations(interpret)
    rows = []
    for batch, seq, heads, dim in shapes:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, cot = (jax.random.normal(key, (batch, seq, heads, dim), dtype) for key in keys)

        def loss_of(fn, cot=cot):
            return lambda *qkv: jnp.sum(fn(*qkv).astype(jnp.float32) * cot)

        ref_out = np.asarray(jax.jit(reference)(q, k, v), np.float32)
        ref_grads = jax.jit(jax.grad(loss_of(reference), argnums=(0, 1, 2)))(q, k, v)
        timings = {}
        for name, fn in impls.items():
            forward = jax.jit(fn)
            backward = jax.jit(jax.grad(loss_of(fn), argnums=(0, 1, 2)))
            out_err = float(np.abs(np.asarray(forward(q, k, v), np.float32) - ref_out).max())
            grad_err = max(
                float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
                for a, b in zip(backward(q, k, v), ref_grads, strict=True)
            )
            timings[name] = dict(
                forward_ms=timed(forward, q, k, v, repeats=repeats),
                fwd_bwd_ms=timed(backward, q, k, v, repeats=repeats),
                max_abs_err_out=out_err,
                max_abs_err_grad=grad_err,
            )
        base = timings["jax.nn.dot_product_attention"]
        for name, t in timings.items():
            rows.append(dict(shape=[batch, seq, heads, dim], impl=name, **t,
                             forward_ratio=t["forward_ms"] / base["forward_ms"],
                             fwd_bwd_ratio=t["fwd_bwd_ms"] / base["fwd_bwd_ms"]))  # fmt: skip
    device = jax.devices()[0].device_kind
    print(f"causal attention on {device} ({backend}), {jnp.dtype(dtype).name}, median of "
          f"{repeats}; ratios to jax.nn.dot_product_attention")  # fmt: skip
    print("| [b, s, h, d] | implementation | fwd ms | ratio | fwd+bwd ms | ratio | max err out | "
          "max err grad |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['impl']} | {r['forward_ms']:.3f} | {r['forward_ratio']:.2f}x | "
              f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_ratio']:.2f}x | {r['max_abs_err_out']:.2e} | "
              f"{r['max_abs_err_grad']:.2e} |")  # fmt: skip
    write_json(FLAGS.out, dict(backend=backend, device=str(jax.devices()[0]), rows=rows,
                               jax=jax.__version__))  # fmt: skip
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
