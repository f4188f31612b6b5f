"""Attention on an accelerator: correctness on the device, then timings against jax's own kernels.

The prepared device check (``make bench-gpu``), in three parts, all causal, layout
``[batch, seq, heads, head_dim]``, bf16 inputs:

1. dense attention: ``jaxlab xla`` (:func:`jaxlab.ops.attention`), ``jax.nn.dot_product_attention``
   and jax's Pallas ``mha`` (Triton flash attention): outputs and gradients against
   ``mha_reference``, then forward and forward+backward times;
2. jaxlab's sparse Pallas kernels (hash buckets, QK-dropping) on the device against the dense masked
   reference in float32: GQA, a length that is not a multiple of the tiles, head_dim 64 and 128;
3. the paper's sweep: forward+backward time (sort/gather/scatter included) of the sparse kernels
   for seq 1k..16k against jax's Pallas ``mha`` and ``jax.nn.dot_product_attention``, with the
   speedup over Pallas ``mha``, the ideal speedup (dense pairs / allowed pairs) and the fraction
   of the bf16 tensor-core peak reached on the executed (non-empty) tiles.

4. the Mamba-1 selective scan and Mamba-2 SSD kernels against the sequential float32 reference
   on the device, then forward and forward+backward times against the XLA chunked path.

Each part prints a markdown table; all rows go to one JSON, written after every part so that a
run cut short by ``--budget_s`` or a timeout still leaves its measurements. Without an
accelerator it refuses to run unless ``--allow_cpu`` (a smoke test: tiny shapes, interpret mode).

  python -m experiments.bench.gpu [--out=bench_results/bench_gpu.json] [--budget_s=420]
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.bench.common import (
    allowed_pairs,
    sparse_inputs,
    sparsity_sweep,
    time_calls,
    write_json,
)
from jaxlab import ops
from kernels_pallas import sparse_attention as sa

flags.DEFINE_string("out", "bench_results/bench_gpu.json", "Where to write the JSON.")
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement (median reported).")
flags.DEFINE_float("budget_s", 420.0, "Stop starting new sweep rows after this many seconds.")
flags.DEFINE_bool("allow_cpu", False, "Run a tiny smoke version without an accelerator.")
FLAGS = flags.FLAGS

# Dense bf16 tensor-core peaks (spec sheets, no sparsity), for the roofline fraction.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def dense_implementations(interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    def pallas_mha(q, k, v):
        return pallas_attention.mha(
            q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True, interpret=interpret
        )

    impls = {
        "jaxlab xla": lambda q, k, v: ops.attention(q, k, v, causal=True),
        "jax.nn.dot_product_attention": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True
        ),
        "jax pallas mha": pallas_mha,
    }
    reference = functools.partial(
        pallas_attention.mha_reference, segment_ids=None, sm_scale=None, causal=True
    )
    return impls, lambda q, k, v: reference(q, k, v, sm_scale=q.shape[-1] ** -0.5)


def timed(fn, *args, repeats: int) -> float:
    """Median ms over ``repeats`` calls after one untimed call (compilation)."""
    return time_calls(lambda: fn(*args), repeats=repeats).median * 1e3


def loss_of(fn, cotangent):
    return lambda *qkv: jnp.sum(fn(*qkv).astype(jnp.float32) * cotangent)


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def random_qkv(shape, kv_heads, dtype, seed=0):
    batch, seq, heads, dim = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], shape, dtype)
    k, v = (jax.random.normal(key, (batch, seq, kv_heads, dim), dtype) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], shape, dtype)


def dense_part(shapes, dtype, interpret, repeats):
    impls, reference = dense_implementations(interpret)
    rows = []
    for shape in shapes:
        q, k, v, ct = random_qkv(shape, shape[2], dtype)
        ref_out = jax.jit(reference)(q, k, v)
        ref_grads = jax.jit(jax.grad(loss_of(reference, ct), argnums=(0, 1, 2)))(q, k, v)
        timings = {}
        for name, fn in impls.items():
            forward = jax.jit(fn)
            backward = jax.jit(jax.grad(loss_of(fn, ct), argnums=(0, 1, 2)))
            grads = backward(q, k, v)
            timings[name] = dict(
                forward_ms=timed(forward, q, k, v, repeats=repeats),
                fwd_bwd_ms=timed(backward, q, k, v, repeats=repeats),
                max_abs_err_out=max_err(forward(q, k, v), ref_out),
                max_abs_err_grad=max(max_err(a, b) for a, b in zip(grads, ref_grads, strict=True)),
            )
        base = timings["jax.nn.dot_product_attention"]
        for name, t in timings.items():
            rows.append(
                dict(
                    part="dense",
                    shape=list(shape),
                    impl=name,
                    **t,
                    forward_ratio=t["forward_ms"] / base["forward_ms"],
                    fwd_bwd_ratio=t["fwd_bwd_ms"] / base["fwd_bwd_ms"],
                )
            )
    print(
        f"\n## 1. dense causal attention, {jnp.dtype(dtype).name}, median of {repeats}; "
        "ratios to jax.nn.dot_product_attention (lower is faster)"
    )
    print(
        "| [b, s, h, d] | implementation | fwd ms | ratio | fwd+bwd ms | ratio | max err out | "
        "max err grad |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['impl']} | {r['forward_ms']:.3f} | {r['forward_ratio']:.2f}x | "
            f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_ratio']:.2f}x | {r['max_abs_err_out']:.2e} | "
            f"{r['max_abs_err_grad']:.2e} |"
        )
    return rows


# The sparse functions take their masks/buckets as arguments (q, k, v, a, b): closed over as
# constants, XLA would constant-fold the gathers they index, which compiles very slowly.


def sparse_kernel(kind, interpret):
    fn = sa.hash_sparse_attention if kind == "hash" else sa.qk_sparse_attention
    return functools.partial(fn, interpret=interpret)


def sparse_reference(kind):
    fn = sa.hash_sparse_attention_reference if kind == "hash" else sa.qk_sparse_attention_reference
    return lambda q, k, v, a, b: fn(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), a, b
    )


def correctness_part(cases, dtype, interpret):
    """Sparse kernels on the device against the float32 dense masked reference."""
    rows = []
    for shape, kv_heads, kind, level in cases:
        batch, seq, heads, _ = shape
        q, k, v, ct = random_qkv(shape, kv_heads, dtype, seed=seq)
        args = (
            q,
            k,
            v,
            *map(jnp.asarray, sparse_inputs(kind, level, batch, seq, heads, kv_heads, seed=seq)),
        )
        fn, ref = sparse_kernel(kind, interpret), sparse_reference(kind)
        grads = jax.jit(jax.grad(loss_of(fn, ct), argnums=(0, 1, 2)))(*args)
        ref_grads = jax.jit(jax.grad(loss_of(ref, ct), argnums=(0, 1, 2)))(*args)
        grad_scale = max(float(jnp.abs(g).max()) for g in ref_grads)
        grad_err = max(max_err(x, y) for x, y in zip(grads, ref_grads, strict=True))
        out_err = max_err(jax.jit(fn)(*args), jax.jit(ref)(*args))
        # bf16 inputs: outputs within 5e-2 (jax's own Pallas tests), gradients 5e-2 relative.
        ok = out_err < 5e-2 and grad_err < 5e-2 * max(1.0, grad_scale)
        rows.append(
            dict(
                part="sparse correctness",
                shape=list(shape),
                kv_heads=kv_heads,
                kind=kind,
                level=level,
                max_abs_err_out=out_err,
                max_abs_err_grad=grad_err,
                max_abs_grad=grad_scale,
                ok=ok,
            )
        )
    print(f"\n## 2. sparse kernels vs dense masked float32 reference ({jnp.dtype(dtype).name} in)")
    print("| [b, s, h, d] | kv heads | pattern | max err out | max err grad | max abs grad | ok |")
    print("|---|---:|---|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['kv_heads']} | {r['kind']} {r['level']} | "
            f"{r['max_abs_err_out']:.2e} | {r['max_abs_err_grad']:.2e} | "
            f"{r['max_abs_grad']:.2e} | {r['ok']} |"
        )
    return rows


def executed_flops(kind, a, b, seq, dim, block_sizes: sa.BlockSizes | None = None):
    """Matmul FLOPs the kernels issue on their live tiles, forward + both backward passes."""
    block_sizes = sa.BlockSizes() if block_sizes is None else block_sizes

    def fit_block(blk):
        """blk capped at seq's next power of two, at least 16, as the kernels fit it."""
        return max(16, min(blk, 1 << (seq - 1).bit_length()))

    if kind == "hash":
        (q_order, qb), (k_order, kb) = (
            sa.bucket_order(jnp.asarray(a)),
            sa.bucket_order(jnp.asarray(b)),
        )
        q_pos, k_pos = q_order, k_order
    else:
        (q_order, q_kept), (k_order, k_kept) = (sa.compact_order(jnp.asarray(x)) for x in (a, b))
        q_pos = jnp.where(q_kept, q_order, -1)
        k_pos = jnp.where(k_kept, k_order, 2**30)
        qb, kb = jnp.zeros_like(q_pos), jnp.zeros_like(k_pos)

    def rows(x):
        return x.transpose(0, 2, 1)

    total = 0.0
    # (tiles, matmuls per tile pair): forward 2 (QK^T, PV); dQ 3 (QK^T, dO V^T, dS K);
    # dK/dV 4 (QK^T, P^T dO, dO V^T, dS^T Q).
    for bq, bk, passes in (
        (fit_block(block_sizes.block_q), fit_block(block_sizes.block_k), ((0, 2),)),
        (fit_block(block_sizes.block_q_bwd), fit_block(block_sizes.block_k_bwd), ((0, 3), (1, 4))),
    ):
        extra = -(-seq // max(bq, bk)) * max(bq, bk) - seq
        padded = [
            jnp.pad(rows(x), ((0, 0), (0, 0), (0, extra)), constant_values=value)
            for x, value in ((q_pos, -1), (k_pos, 2**30), (qb, 0), (kb, 0))
        ]
        _, kv_count, _, q_count = sa.live_tiles(*padded, bq, bk)
        tiles = (float(jnp.sum(kv_count)), float(jnp.sum(q_count)))
        for which, matmuls in passes:
            total += tiles[which] * matmuls * 2 * bq * bk * dim
    return total


def sweep_part(seqs, full_sweep_seq, batch, heads, dim, dtype, interpret, repeats, deadline):
    impls, _ = dense_implementations(interpret)
    device = jax.devices()[0].device_kind
    peak = next((p for name, p in PEAK_BF16_FLOPS.items() if name in device), None)
    rows = []

    def of_peak(flops, ms):
        return None if peak is None else flops / (ms * 1e-3) / peak

    for seq in seqs:
        if time.perf_counter() > deadline:
            print(f"(budget reached: skipping seq {seq} and longer)")
            break
        q, k, v, ct = random_qkv((batch, seq, heads, dim), heads, dtype, seed=seq)
        dense_pairs = batch * heads * seq * (seq + 1) // 2
        # name -> (fn, masks, allowed pairs, executed FLOPs or None for dense)
        entries = {
            name: (impls[name], (), dense_pairs, None)
            for name in ("jax pallas mha", "jax.nn.dot_product_attention")
        }
        if seq == full_sweep_seq:  # the paper's sweep
            sweep = sparsity_sweep((2, 4, 8, 16, 32, 64), (0.2, 0.4, 0.5, 0.6, 0.8))
        else:
            sweep = sparsity_sweep((2, 8, 32), (0.2, 0.5, 0.8))
        for label, kind, level in sweep:
            a, b = sparse_inputs(kind, level, batch, seq, heads, heads, seed=seq)
            masks = (jnp.asarray(a), jnp.asarray(b))
            entries[label] = (
                sparse_kernel(kind, interpret),
                masks,
                allowed_pairs(kind, a, b),
                executed_flops(kind, a, b, seq, dim),
            )
        base_ms = None
        for name, (fn, masks, pairs, flops) in entries.items():
            if time.perf_counter() > deadline:
                print(f"(budget reached during seq {seq})")
                break
            ms = timed(
                jax.jit(jax.grad(loss_of(fn, ct), argnums=(0, 1, 2))),
                q,
                k,
                v,
                *masks,
                repeats=repeats,
            )
            base_ms = ms if name == "jax pallas mha" else base_ms
            useful = 3.5 * 4 * dim * pairs  # forward 4*d per pair; backward 2.5x the forward
            executed = useful if flops is None else flops
            rows.append(
                dict(
                    part="sweep",
                    seq=seq,
                    impl=name,
                    fwd_bwd_ms=ms,
                    speedup_vs_pallas_mha=base_ms / ms,
                    ideal=dense_pairs / max(pairs, 1),
                    executed_tflops=executed / ms / 1e9,
                    roofline_fraction=of_peak(executed, ms),
                    useful_fraction=of_peak(useful, ms),
                )
            )
            r = rows[-1]
            print(
                f"seq {seq:6d} {name:30s} {ms:9.3f} ms  {r['speedup_vs_pallas_mha']:5.2f}x",
                flush=True,
            )
    print(
        f"\n## 3. forward+backward, [b={batch}, s, h={heads}, d={dim}] "
        f"{jnp.dtype(dtype).name}, median of {repeats}, sort/gather/scatter included; "
        f"peak {peak} FLOP/s ({device})"
    )
    print(
        "| seq | implementation | fwd+bwd ms | speedup vs pallas mha | ideal | "
        "executed TFLOP/s | of peak (executed tiles) | of peak (useful pairs) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    for r in rows:
        print(
            f"| {r['seq']} | {r['impl']} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['speedup_vs_pallas_mha']:.2f}x | {r['ideal']:.2f}x | "
            f"{r['executed_tflops']:.1f} | {pct(r['roofline_fraction'])} | "
            f"{pct(r['useful_fraction'])} |"
        )
    return rows


def scan_fn(kind, impl, *, A, interpret):
    """``f(x, dt, B, C)``: the selective scan or SSD by ``impl`` (softplus on the step)."""
    from jaxlab.ops import scan

    if kind == "selective_scan":
        return lambda x, dt, B, C: scan.selective_scan(
            x, dt, A, B, C, delta_softplus=True, impl=impl, interpret=interpret
        )[0]
    return lambda x, dt, B, C: scan.ssd(
        x, dt, A, B, C, dt_softplus=True, impl=impl, chunk_size=64, interpret=interpret
    )[0]


def scan_part(shapes, dtype, interpret, repeats, deadline):
    """Selective scan and SSD kernels: correctness on the device against the sequential float32
    reference, then forward+backward time against the XLA chunked path, and HBM bandwidth."""
    rows = []
    for kind, (batch, seq, width, state) in shapes:
        if time.perf_counter() > deadline:
            print(f"(budget reached: skipping {kind} seq {seq})")
            break
        keys = jax.random.split(jax.random.key(seq), 6)
        if kind == "selective_scan":
            x = jax.random.normal(keys[0], (batch, seq, width), dtype)
            dt = (0.1 * jax.random.normal(keys[1], (batch, seq, width))).astype(dtype)
            A = -jnp.exp(jax.random.normal(keys[2], (width, state)))
        else:
            heads = width // 64
            x = jax.random.normal(keys[0], (batch, seq, heads, 64), dtype)
            dt = (0.1 * jax.random.normal(keys[1], (batch, seq, heads))).astype(dtype)
            A = -jnp.exp(jax.random.normal(keys[2], (heads,)))
        fn = functools.partial(scan_fn, kind, A=A, interpret=interpret)
        B = jax.random.normal(keys[3], (batch, seq, 1, state), dtype)
        C = jax.random.normal(keys[4], (batch, seq, 1, state), dtype)
        ct = jax.random.normal(keys[5], x.shape, jnp.float32)
        args = (x, dt, B, C)
        ref = jax.jit(fn("sequential"))(*[a.astype(jnp.float32) for a in args])
        scale = float(jnp.abs(ref).max())
        timings = {}
        for impl in ("pallas", "chunked"):
            f = fn(impl)
            err = max_err(jax.jit(f)(*args), ref) / scale
            grad = jax.jit(jax.grad(loss_of(f, ct), argnums=(0, 1, 2, 3)))
            timings[impl] = dict(
                fwd_ms=timed(jax.jit(f), *args, repeats=repeats),
                fwd_bwd_ms=timed(grad, *args, repeats=repeats),
                rel_err_out=err,
            )
        # Bytes the forward must move at least: inputs and output once (the states stay on chip).
        item = jnp.dtype(dtype).itemsize
        io = (x.size * 3 + dt.size + B.size * 2) * item
        for impl, t in timings.items():
            speedup = timings["chunked"]["fwd_bwd_ms"] / t["fwd_bwd_ms"]
            rows.append(
                dict(
                    part="scan",
                    kind=kind,
                    shape=[batch, seq, width, state],
                    impl=impl,
                    **t,
                    speedup_vs_chunked=speedup,
                    fwd_gb_per_s=io / (t["fwd_ms"] * 1e-3) / 1e9,
                )
            )
    print(
        f"\n## 4. selective scan and SSD, {jnp.dtype(dtype).name}, median of {repeats}; err "
        "relative to the output scale vs the sequential float32 reference"
    )
    print(
        "| scan | [b, L, width, state] | impl | fwd ms | fwd GB/s (in+out) | fwd+bwd ms | "
        "speedup vs chunked XLA | rel err |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['shape']} | {r['impl']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_gb_per_s']:.1f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['speedup_vs_chunked']:.2f}x | {r['rel_err_out']:.1e} |"
        )
    return rows


def main(argv):
    del argv
    start = time.perf_counter()
    deadline = start + FLAGS.budget_s
    backend = jax.default_backend()
    if backend == "cpu" and not FLAGS.allow_cpu:
        raise SystemExit(
            f"bench-gpu needs an accelerator; jax sees {jax.devices()} "
            "(pass --allow_cpu for a smoke run)"
        )
    interpret = backend == "cpu"
    dtype = jnp.float32 if interpret else jnp.bfloat16
    repeats = 2 if interpret else FLAGS.repeats
    result = dict(backend=backend, device=str(jax.devices()[0]), jax=jax.__version__, rows=[])

    def save(rows):
        result["rows"] += rows
        result["elapsed_s"] = time.perf_counter() - start
        write_json(FLAGS.out, result)

    save(
        dense_part(
            [(1, 128, 2, 32)] if interpret else [(4, 2048, 16, 64), (1, 8192, 16, 128)],
            dtype,
            interpret,
            repeats,
        )
    )
    if interpret:
        cases = [((1, 100, 4, 32), 2, "hash", 4), ((1, 100, 4, 32), 2, "qk", 0.5)]
    else:
        cases = [
            ((2, 1000, 8, 64), 2, "hash", 8),
            ((2, 1000, 8, 64), 2, "qk", 0.5),
            ((1, 2048, 4, 128), 4, "hash", 16),
            ((1, 2048, 4, 128), 4, "qk", 0.3),
        ]
    save(correctness_part(cases, dtype, interpret))
    if interpret:
        seqs, full_seq, shape = (256,), 0, (1, 2, 32)
    else:
        seqs, full_seq, shape = (1024, 4096, 8192, 16384), 8192, (4, 16, 64)
    save(sweep_part(seqs, full_seq, *shape, dtype, interpret, repeats, deadline))
    if interpret:
        scan_shapes = [("selective_scan", (1, 64, 32, 16)), ("ssd", (1, 64, 128, 32))]
    else:
        scan_shapes = [
            ("selective_scan", (8, 2048, 2048, 16)),
            ("ssd", (8, 2048, 2048, 128)),
            ("selective_scan", (2, 8192, 2048, 16)),
            ("ssd", (2, 8192, 2048, 128)),
        ]
    save(scan_part(scan_shapes, dtype, interpret, repeats, deadline + 120))
    print(f"wrote {FLAGS.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    app.run(main)
