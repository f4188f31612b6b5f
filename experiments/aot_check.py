"""Ahead-of-time compilation of the Pallas kernels for GPUs, on a machine without one (issue 23).

XLA's GPU compiler runs on the CPU: ``jax.experimental.topologies.get_topology_desc`` describes
a card from a ``GpuTargetConfig`` text proto (:func:`gpu_target_config`, built from the card's
facts in :data:`GPUS`), and ``jax.jit(f).lower(<shapes placed on its devices>).compile()`` runs
the full compiler, Triton kernels included. A kernel whose tiles need more shared memory than
the card has fails there with ``RESOURCE_EXHAUSTED``, so a row that compiles is a kernel that
launches. Every row reports: compiled or the compiler's error, compile seconds, and the
compiled program's argument, output and temp bytes per device.

It needs jax's CUDA plugin (about 4.5 GB with its CUDA libraries), which stays out of
``make test``'s environment: ``make aot-check`` creates ``.venv-aot`` with
``jax-cuda12-plugin[with-cuda]`` at the jax version of ``.venv`` and runs

  JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-aot/bin/python -m \\
      experiments.aot_check --out=aot_results/aot_check.json [--targets=h100,h200] [--quick]

The kernel rows: both sparse-attention kernels (QK-dropping and hash buckets), forward and
forward+backward, bf16 and float32, head_dim 64 and 128, at 4k..32k tokens; the Mamba-1 selective
scan and the Mamba-2 SSD, forward and forward+backward, bf16 and float32, at 4k..16k tokens; and a
deliberately oversized sparse-attention tile that must be refused (a check of the checker).
Pod configurations (whole train steps on multi-card topologies) and TPU targets are not compiled
here yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; only when run as a program, so that tests can import
    this module beside others that define the same names."""
    flags.DEFINE_string("out", "aot_results/aot_check.json", "Where to write the JSON.")
    flags.DEFINE_list("targets", ["h100", "h200"], "Cards to compile for (keys of GPUS).")
    flags.DEFINE_bool("quick", False, "Short sequences and one dtype: a smoke run.")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """The facts of a card that XLA's GPU compiler reads (vendor datasheets and nvidia-smi)."""

    description: str
    memory_bytes: int
    sms: int
    clock_ghz: float
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    compute_capability: tuple[int, int] = (9, 0)
    shared_memory_per_sm: int = 228 * 1024
    shared_memory_per_block_optin: int = 227 * 1024


GPUS = {
    # H100 SXM: 81559 MiB as nvidia-smi shows it, 132 SMs, 1.98 GHz boost, 3.35 TB/s, 50 MB L2.
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559 * 2**20, 132, 1.98, 3.35e12, 50 * 2**20),
    # H200 SXM: 143771 MiB (nvidia-smi on this workplace's machines), 4.8 TB/s, 60 MB L2.
    "h200": Gpu("NVIDIA H200", 143771 * 2**20, 132, 1.98, 4.8e12, 60 * 2**20),
}


def gpu_target_config(gpu: Gpu) -> str:
    """The ``GpuTargetConfig`` text proto that ``get_topology_desc`` takes for ``gpu``."""
    major, minor = gpu.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.memory_bandwidth)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{gpu.description}"
"""


@dataclasses.dataclass
class Case:
    """One compilation: ``fn`` on arguments of ``shapes`` (name -> (shape, dtype))."""

    kernel: str
    detail: str
    fn: Callable
    shapes: tuple[tuple[tuple[int, ...], jnp.dtype], ...]
    expect_failure: bool = False


def _with_grad(fn, grad_argnums):
    """``fn``'s output and the gradient of a fixed projection of it (forward + backward)."""

    def both(*args):
        def loss(*diff):
            full = list(args)
            for i, d in zip(grad_argnums, diff, strict=True):
                full[i] = d
            out = fn(*full)
            return jnp.sum(out.astype(jnp.float32) * 1e-3)

        diff = [args[i] for i in grad_argnums]
        return jax.value_and_grad(loss, argnums=tuple(range(len(diff))))(*diff)

    return both


def kernel_cases(quick: bool) -> list[Case]:
    from kernels_pallas import selective_scan as ss
    from kernels_pallas import sparse_attention as sa
    from kernels_pallas import ssd as ssd_kernels

    dtypes = (jnp.bfloat16,) if quick else (jnp.bfloat16, jnp.float32)
    attention_lengths = (1024,) if quick else (4096, 16384, 32768)
    scan_lengths = (1024,) if quick else (4096, 16384)
    head_dims = (128,) if quick else (64, 128)
    cases = []
    batch, heads, kv_heads = 1, 16, 4
    for dtype in dtypes:
        name = jnp.dtype(dtype).name
        for head_dim in head_dims:
            for seq in attention_lengths:
                qkv = (
                    ((batch, seq, heads, head_dim), dtype),
                    ((batch, seq, kv_heads, head_dim), dtype),
                    ((batch, seq, kv_heads, head_dim), dtype),
                )

                def qk(q, k, v, qm, km):
                    return sa.qk_sparse_attention(q, k, v, qm, km, interpret=False)

                def hashed(q, k, v, qb, kb):
                    return sa.hash_sparse_attention(q, k, v, qb, kb, interpret=False)

                keep = (((batch, seq, heads), jnp.bool_), ((batch, seq, kv_heads), jnp.bool_))
                buckets = (((batch, seq, heads), jnp.int32), ((batch, seq, kv_heads), jnp.int32))
                detail = f"{name} head_dim={head_dim} seq={seq}"
                for kernel, fn, masks in (
                    ("qk_sparse", qk, keep),
                    ("hash_sparse", hashed, buckets),
                ):
                    cases.append(Case(f"{kernel} fwd", detail, fn, qkv + masks))
                    cases.append(
                        Case(f"{kernel} fwd+bwd", detail, _with_grad(fn, (0, 1, 2)), qkv + masks)
                    )
        for seq in scan_lengths:
            dim, groups, state = 2048, 1, 16
            scan_shapes = (
                ((batch, seq, dim), dtype),
                ((batch, seq, dim), dtype),
                ((dim, state), jnp.float32),
                ((batch, seq, groups, state), dtype),
                ((batch, seq, groups, state), dtype),
            )

            def scan(u, delta, A, B, C):
                return ss.selective_scan(u, delta, A, B, C, delta_softplus=True, interpret=False)

            detail = f"{name} dim={dim} state={state} seq={seq}"
            cases.append(Case("selective_scan fwd", detail, scan, scan_shapes))
            cases.append(
                Case("selective_scan fwd+bwd", detail, _with_grad(scan, (0, 1, 3, 4)), scan_shapes)
            )
            ssd_heads, ssd_head_dim, ssd_state = 32, 64, 128
            ssd_shapes = (
                ((batch, seq, ssd_heads, ssd_head_dim), dtype),
                ((batch, seq, ssd_heads), jnp.float32),
                ((ssd_heads,), jnp.float32),
                ((batch, seq, 1, ssd_state), dtype),
                ((batch, seq, 1, ssd_state), dtype),
            )

            def chunked(x, dt, A, B, C):
                return ssd_kernels.ssd(x, dt, A, B, C, dt_softplus=True, interpret=False)

            detail = f"{name} heads={ssd_heads} head_dim={ssd_head_dim} state={ssd_state} seq={seq}"
            cases.append(Case("ssd fwd", detail, chunked, ssd_shapes))
            cases.append(Case("ssd fwd+bwd", detail, _with_grad(chunked, (0, 3, 4)), ssd_shapes))
    # The checker's own check: tiles far beyond the card's shared memory must be refused.
    huge = sa.BlockSizes(block_q=1024, block_k=1024, block_q_bwd=1024, block_k_bwd=1024)

    def oversized(q, k, v, qm, km):
        return sa.qk_sparse_attention(q, k, v, qm, km, block_sizes=huge, interpret=False)

    seq, head_dim = 4096, 128
    cases.append(
        Case(
            "qk_sparse fwd (oversized tiles)",
            f"float32 head_dim={head_dim} seq={seq} block 1024x1024",
            oversized,
            (
                ((1, seq, heads, head_dim), jnp.float32),
                ((1, seq, kv_heads, head_dim), jnp.float32),
                ((1, seq, kv_heads, head_dim), jnp.float32),
                ((1, seq, heads), jnp.bool_),
                ((1, seq, kv_heads), jnp.bool_),
            ),
            expect_failure=True,
        )
    )
    return cases


def compile_case(case: Case, device) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(device)
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in case.shapes]
    row = dict(kernel=case.kernel, detail=case.detail, expect_failure=case.expect_failure)
    begin = time.perf_counter()
    try:
        compiled = jax.jit(case.fn).lower(*specs).compile()
    except Exception as e:  # the compiler's verdict is the result of this row
        message = str(e).strip().splitlines()
        row.update(compiled=False, error=(message[0] if message else type(e).__name__)[:300])
    else:
        memory = compiled.memory_analysis()
        row.update(
            compiled=True,
            argument_bytes=int(memory.argument_size_in_bytes),
            output_bytes=int(memory.output_size_in_bytes),
            temp_bytes=int(memory.temp_size_in_bytes),
        )
    row["seconds"] = round(time.perf_counter() - begin, 2)
    row["as_expected"] = row["compiled"] != case.expect_failure
    return row


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def main(argv):
    del argv
    from jax.experimental import topologies

    unknown = [t for t in FLAGS.targets if t not in GPUS]
    if unknown:
        raise ValueError(f"--targets must be among {sorted(GPUS)}, got {unknown}")
    results = dict(jax=jax.__version__, targets={})
    for target in FLAGS.targets:
        gpu = GPUS[target]
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(gpu), topology="1x1x1"
        )
        device = topology.devices[0]
        rows = []
        print(f"\n## {target}: {gpu.description}, {gpu.memory_bytes / 2**30:.1f} GiB\n")
        print("| kernel | shapes | compiled | temp MiB | args MiB | s | as expected |")
        print("|---|---|---|---:|---:|---:|---|")
        for case in kernel_cases(FLAGS.quick):
            row = compile_case(case, device)
            rows.append(row)
            status = "yes" if row["compiled"] else f"no: {row['error'][:80]}"
            print(
                f"| {row['kernel']} | {row['detail']} | {status} | "
                f"{_mib(row.get('temp_bytes'))} | {_mib(row.get('argument_bytes'))} | "
                f"{row['seconds']} | {'yes' if row['as_expected'] else 'NO'} |",
                flush=True,
            )
        results["targets"][target] = dict(gpu=dataclasses.asdict(gpu), rows=rows)
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)
    bad = [
        (t, r["kernel"], r["detail"])
        for t, entry in results["targets"].items()
        for r in entry["rows"]
        if not r["as_expected"]
    ]
    print(f"\n{len(bad)} unexpected result(s)" + "".join(f"\n  {b}" for b in bad))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
