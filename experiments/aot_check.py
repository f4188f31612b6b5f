"""Ahead-of-time compilation for GPUs and TPUs on a machine without one (issue 23): every
Pallas kernel, and whole train steps of the shipped pod configurations on their topologies.

XLA's GPU compiler runs on the CPU: ``jax.experimental.topologies.get_topology_desc`` describes
a card from a ``GpuTargetConfig`` text proto (:func:`gpu_target_config`, built from the card's
facts in :data:`GPUS`) and a TPU slice from libtpu (:data:`TPUS`), and
``jax.jit(f).lower(<shapes placed on its devices>).compile()`` runs the full compiler, Triton
kernels included. A kernel whose tiles need more shared memory than the card has fails there
with ``RESOURCE_EXHAUSTED``, so a row that compiles is a kernel that launches.

Kernel rows: both sparse-attention kernels (QK-dropping and hash buckets), forward and
forward+backward, bf16 and float32, head_dim 64 and 128, at 4k..32k tokens; the Mamba-1 selective
scan and the Mamba-2 SSD, forward and forward+backward, bf16 and float32, at 4k..16k tokens; and a
deliberately oversized sparse-attention tile that must be refused (a check of the checker). On
TPU targets the same kernels' Mosaic (TPU Pallas) versions compile at the same shapes, traced for
the TPU (``target_platform``), each row with the scoped VMEM its Mosaic kernels reserve
(:func:`mosaic_vmem_bytes`), beside an oversized SSD state tile that must run out of VMEM.

Pod rows (:data:`PODS`): the engine's jitted train step of a shipped config, built from
ShapeDtypeStructs on the topology's devices (``build_experiment(config, devices=...)``; no
parameter is allocated) and compiled. Each row gives the per-device argument, output and temp
bytes of ``compiled.memory_analysis()``, what the step needs (arguments + outputs - donated
aliases + temp) against :data:`USABLE_FRACTION` of the device's memory, the compile seconds, and
a roofline bound (:func:`roofline`) from an analytic FLOP count (XLA's ``cost_analysis()``
returns nothing for these topology compiles).

It needs jax's CUDA plugin (about 4.5 GB with its CUDA libraries) and libtpu, which stay out of
``make test``'s environment: ``make aot-check`` creates ``.venv-aot`` with them at the jax version
of ``.venv`` and runs

  JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 .venv-aot/bin/python -m \\
      experiments.aot_check --workdir=aot_results [--targets=h100,v5p] [--quick]

which writes ``aot_results/REPORT.md`` and ``aot_results/results.json``. libtpu lets one process
at a time describe TPU topologies (a lockfile in /tmp); a second one fails with ABORTED unless
ALLOW_MULTIPLE_LIBTPU_LOAD=1. A user's own config: ``--config=configs/FILE.py[:ARG]
--topology=...`` (see README, "Will it fit?").
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxlab.eval import report
from kernels_pallas._common import target_platform

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command-line flags; only when run as a program, so that tests can import
    this module beside others that define the same names."""
    flags.DEFINE_string("workdir", "aot_results", "Where REPORT.md and results.json go.")
    flags.DEFINE_list("targets", ["h100", "h200", "v5p"], "Targets (keys of GPUS and TPUS).")
    flags.DEFINE_bool("quick", False, "Short sequences, one dtype, the small pods: a smoke run.")
    flags.DEFINE_bool("kernels", True, "Compile the kernels (GPU; TPU: those with a Mosaic one).")
    flags.DEFINE_list("pods", [], "Only these pods (names in PODS); empty: all.")
    flags.DEFINE_string(
        "config", None, "Check only this config (FILE.py or FILE.py:ARG) instead of PODS."
    )
    flags.DEFINE_string(
        "topology",
        "1x1x8",
        "--config's topology: SLICESxHOSTSxDEVICES for a GPU, e.g. 2x2x1 for TPU.",
    )


@dataclasses.dataclass(frozen=True)
class Gpu:
    """The facts of a card that XLA's GPU compiler reads (vendor datasheets and nvidia-smi)."""

    description: str
    memory_bytes: int
    sms: int
    clock_ghz: float
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    peak_flops: float = 989e12  # dense bf16 tensor-core FLOP/s (H100/H200 SXM datasheets)
    compute_capability: tuple[int, int] = (9, 0)
    shared_memory_per_sm: int = 228 * 1024
    shared_memory_per_block_optin: int = 227 * 1024


GPUS = {
    # H100 SXM: 81559 MiB as nvidia-smi shows it, 132 SMs, 1.98 GHz boost, 3.35 TB/s, 50 MB L2.
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559 * 2**20, 132, 1.98, 3.35e12, 50 * 2**20),
    # H200 SXM: 143771 MiB (nvidia-smi on this workplace's machines), 4.8 TB/s, 60 MB L2.
    "h200": Gpu("NVIDIA H200", 143771 * 2**20, 132, 1.98, 4.8e12, 60 * 2**20),
}


@dataclasses.dataclass(frozen=True)
class Tpu:
    """A TPU generation: its name in libtpu's topology strings and its per-chip facts (Google
    Cloud's TPU pages)."""

    description: str
    generation: str  # "v5e" as in get_topology_desc("v5e:2x2", "tpu")
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    peak_flops: float  # dense bf16 FLOP/s


TPUS = {
    "v5e": Tpu("TPU v5e (v5litepod)", "v5e", 16 * 2**30, 819e9, 197e12),
    "v5p": Tpu("TPU v5p", "v5p", 95 * 2**30, 2765e9, 459e12),
    "v6e": Tpu("TPU v6e (Trillium)", "v6e", 32 * 2**30, 1640e9, 918e12),
}

# The share of a card's memory a step may need: JAX preallocates 75% of a GPU
# (XLA_PYTHON_CLIENT_MEM_FRACTION, raise it to use more); on a TPU the compiler itself refuses a
# program larger than the chip's memory.
USABLE_FRACTION = {"gpu": 0.75, "tpu": 1.0}


def platform_of(target: str) -> str:
    if target in GPUS:
        return "gpu"
    if target in TPUS:
        return "tpu"
    raise ValueError(f"target must be one of {sorted(GPUS) + sorted(TPUS)}, got {target!r}")


def chip(target: str) -> Gpu | Tpu:
    return GPUS[target] if platform_of(target) == "gpu" else TPUS[target]


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


# What XLA's GPU compiler says when a kernel's tiles need more shared memory than the card has,
# and the TPU compiler when a Mosaic kernel's blocks and scratch need more VMEM than it has.
SHARED_MEMORY_ERROR = r"RESOURCE_EXHAUSTED.*[Ss]hared memory"
VMEM_ERROR = r"RESOURCE_EXHAUSTED.*[Vv]mem"


@dataclasses.dataclass
class Case:
    """One compilation: ``fn`` on arguments of ``shapes`` (name -> (shape, dtype)). A case with
    ``expect_error`` (a regular expression) must fail with an error it matches; any other
    failure, or compiling, is unexpected."""

    kernel: str
    detail: str
    fn: Callable
    shapes: tuple[tuple[tuple[int, ...], jnp.dtype], ...]
    expect_error: str = ""


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


def kernel_cases(quick: bool, platform: str = "gpu") -> list[Case]:
    """The kernel rows for a ``platform`` ("gpu" or "tpu"): every kernel that compiles for it
    and the oversized tile it must refuse."""
    from kernels_pallas import selective_scan as ss
    from kernels_pallas import sparse_attention as sa

    dtypes = (jnp.bfloat16,) if quick else (jnp.bfloat16, jnp.float32)
    attention_lengths = (1024,) if quick else (4096, 16384, 32768)
    scan_lengths = (1024,) if quick else (4096, 16384)
    head_dims = (128,) if quick else (64, 128)
    cases = []
    batch, heads, kv_heads = 1, 16, 4
    gpu = platform == "gpu"
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
            cases += _ssd_cases(f"{name} heads=32", dtype, (batch, seq, 32, 64, 128))
    if not gpu:
        # The checker's own check: a state tile of 2048 x 2048 (16 MiB in float32, in the
        # scratch and, double-buffered, in the initial, final and per-chunk state blocks) is
        # beyond every generation's scoped VMEM (v6e's takes the 23 MiB of a 1024 x 1024 tile).
        cases += _ssd_cases("float32", jnp.float32, (1, 256, 1, 2048, 2048), VMEM_ERROR)[:1]
        return cases
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
            expect_error=SHARED_MEMORY_ERROR,
        )
    )
    return cases


def _ssd_cases(name, dtype, shape, expect_error="") -> list[Case]:
    """SSD forward and forward+backward at ``shape = (batch, seq, heads, head_dim, state)``
    (one group of B and C), the kernel of the platform traced for."""
    from kernels_pallas import ssd as ssd_kernels

    batch, seq, heads, head_dim, state = shape
    shapes = (
        ((batch, seq, heads, head_dim), dtype),
        ((batch, seq, heads), jnp.float32),
        ((heads,), jnp.float32),
        ((batch, seq, 1, state), dtype),
        ((batch, seq, 1, state), dtype),
    )

    def chunked(x, dt, A, B, C):
        return ssd_kernels.ssd(x, dt, A, B, C, dt_softplus=True, interpret=False)

    detail = f"{name} head_dim={head_dim} state={state} seq={seq}"
    return [
        Case("ssd fwd", detail, chunked, shapes, expect_error),
        Case("ssd fwd+bwd", detail, _with_grad(chunked, (0, 3, 4)), shapes, expect_error),
    ]


def failed(error: Exception, limit: int) -> dict:
    """A row's fields for a compilation that raised: the first line of the error (or its type)."""
    lines = str(error).strip().splitlines()
    return dict(compiled=False, error=(lines[0] if lines else type(error).__name__)[:limit])


def tree_bytes(tree) -> int:
    """Bytes of a tree of arrays or shapes."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def mosaic_vmem_bytes(hlo: str) -> int | None:
    """The most scoped VMEM (memory space 1) that one Mosaic kernel call of a compiled TPU
    program reserves, from its ``used_scoped_memory_configs``; None without a Mosaic call."""
    sizes = []
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        used = re.search(r'"used_scoped_memory_configs":\[([^\]]*)\]', line)
        vmem = re.findall(
            r'"memory_space":"1","offset":"\d+","size":"(\d+)"', used[1] if used else ""
        )
        sizes.append(sum(int(n) for n in vmem))
    return max(sizes) if sizes else None


def compile_case(case: Case, device) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(device)
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in case.shapes]
    row = dict(kernel=case.kernel, detail=case.detail, expect_error=case.expect_error)
    begin = time.perf_counter()
    try:
        compiled = jax.jit(case.fn).lower(*specs).compile()
    except Exception as e:  # the compiler's verdict is the result of this row
        row.update(failed(e, 300))
    else:
        memory = compiled.memory_analysis()
        row.update(
            compiled=True,
            argument_bytes=int(memory.argument_size_in_bytes),
            output_bytes=int(memory.output_size_in_bytes),
            temp_bytes=int(memory.temp_size_in_bytes),
            vmem_bytes=mosaic_vmem_bytes(compiled.as_text()),
        )
    row["seconds"] = round(time.perf_counter() - begin, 2)
    if case.expect_error:
        row["as_expected"] = bool(re.search(case.expect_error, row.get("error", "")))
    else:
        row["as_expected"] = row["compiled"]
    return row


# Every kernel has a Triton (GPU) and a Mosaic (TPU) version.
KERNEL_FAMILIES = ("qk_sparse", "hash_sparse", "selective_scan", "ssd")
# One chip of each TPU generation's smallest slice holds a kernel or decode row.
ONE_CHIP_TOPOLOGY = {"gpu": "1x1x1", "v5e": "2x2", "v5p": "2x2x1", "v6e": "2x2"}


def one_device(target: str):
    """A device of ``target``'s smallest topology (TPU slices come in whole hosts)."""
    platform = platform_of(target)
    return topology_devices(target, ONE_CHIP_TOPOLOGY["gpu" if platform == "gpu" else target])[0]


@dataclasses.dataclass(frozen=True)
class Pod:
    """A shipped config and the topologies it is checked on.

    ``topologies`` maps "gpu" to a ``SLICESxHOSTSxDEVICES`` string and a TPU generation to its
    slice (``"2x2x2"``); ``changes`` are config fields the checker sets (dotted names), shown in
    the table; ``quick`` pods also run under ``--quick``."""

    name: str
    config: str  # FILE.py or FILE.py:ARG
    topologies: dict[str, str]
    changes: dict[str, object] = dataclasses.field(default_factory=dict)
    quick: bool = False


# scan_layers=True compiles one block looped over (the same numbers as the unrolled layers,
# tests/models/scan_layers_test.py) in seconds instead of minutes; the MEDITRON configs read a
# user's Llama directory and GAP-Replay folder, which only the tokenizer and the data need (the
# step's shapes come from the config), so the byte tokenizer and the embedded corpus stand in;
# their Hugging Face export at the end of a run (unrolled layers only) is not part of the step.
_SCAN = {"model.scan_layers": True}
_NO_USER_FILES = {
    "data.tokenizer": "byte",
    "data.sources": ("embedded",),
    "data.weights": (),
    "export_hf": "",
}
_MEDITRON_ARG = "LLAMA_DIR,GAP_REPLAY"
_SEVEN_B = {"gpu": "1x1x8", "v5e": "4x4", "v5p": "2x2x2", "v6e": "2x4"}
_SEVENTY_B = {"gpu": "1x8x8", "v5e": "8x16", "v5p": "4x4x4", "v6e": "8x8"}
# MEDITRON-70B trained on 128 A100 80GB (16 nodes of 8; Chen et al. 2023, §4.1).
_MEDITRON_70B = {"gpu": "1x16x8", "v5e": "8x16", "v5p": "4x4x8", "v6e": "8x16"}
_SMALL = {"gpu": "1x1x8", "v5e": "2x4", "v5p": "2x2x2", "v6e": "2x4"}

PODS = (
    Pod("llama2_7b", "configs/llama2_7b.py", _SEVEN_B, _SCAN),
    Pod("llama3_8b", "configs/llama3_8b.py", _SEVEN_B, _SCAN),
    Pod("llama2_70b", "configs/llama2_70b.py", _SEVENTY_B, _SCAN),
    Pod("meditron_7b", f"configs/meditron_7b.py:{_MEDITRON_ARG}", _SEVEN_B, _SCAN | _NO_USER_FILES),
    Pod(
        "meditron_70b",
        f"configs/meditron_70b.py:{_MEDITRON_ARG}",
        _MEDITRON_70B,
        _SCAN | _NO_USER_FILES,
    ),
    Pod(
        "sparse_lm hash 8k",
        "configs/sparse_lm.py:hash",
        _SMALL,
        {"seq_len": 8192, "model.max_seq_len": 8192, "batch_size": 8},
    ),
    Pod(
        "sparse_lm qk 16k",
        "configs/sparse_lm.py:qk",
        _SMALL,
        {"seq_len": 16384, "model.max_seq_len": 16384, "batch_size": 8},
    ),
    Pod(
        "mamba_lm hybrid 4k",
        "configs/mamba_lm.py:hybrid",
        _SMALL,
        {"seq_len": 4096, "model.max_seq_len": 4096, "batch_size": 8},
    ),
    Pod(
        "mamba_lm mamba2 1k",
        "configs/mamba_lm.py:mamba2",
        _SMALL,
        {"seq_len": 1024, "model.max_seq_len": 1024, "batch_size": 8},
        quick=True,
    ),
    # The unrolled layers once, beside the scanned row above: the memory the scan stands for.
    Pod("llama2_7b unrolled", "configs/llama2_7b.py", {"gpu": "1x1x8"}),
)


def load_config(spec: str):
    """``get_config(ARG)`` (or ``get_config()``) of the config file in ``FILE.py[:ARG]``."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ValueError(f"config must be FILE.py or FILE.py:ARG of an existing file, got {spec!r}")
    root = os.path.abspath(".")
    absolute = os.path.abspath(path)
    if absolute.startswith(os.path.join(root, "configs") + os.sep):  # configs import each other
        module = importlib.import_module("configs." + os.path.basename(path)[:-3])
    else:
        loader = importlib.util.spec_from_file_location("user_config", absolute)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


# The custom-call targets of a compiled Pallas kernel in lowered StableHLO: Triton on a GPU,
# Mosaic on a TPU.
KERNEL_CALL_TARGETS = ("__gpu$xla.gpu.triton", "tpu_custom_call")


def kernel_calls(stablehlo: str) -> int:
    """How many Pallas kernel calls a lowered program makes (not interpret-mode emulations)."""
    return sum(stablehlo.count(f"@{name}(") for name in KERNEL_CALL_TARGETS)


def apply_changes(config, changes: dict[str, object]):
    """``config`` with the dotted fields of ``changes`` set (``{"model.scan_layers": True}``)."""
    config.update_from_flattened_dict(changes)
    return config


def topology_devices(target: str, topology: str):
    """The devices of ``topology`` on ``target``'s hardware (no device is opened)."""
    from jax.experimental import topologies

    if platform_of(target) == "gpu":
        description = topologies.get_topology_desc(
            platform="cuda", target_config=gpu_target_config(GPUS[target]), topology=topology
        )
    else:
        description = topologies.get_topology_desc(f"{TPUS[target].generation}:{topology}", "tpu")
    return description.devices


def fit(memory, device_bytes: int, usable_fraction: float) -> dict:
    """What a step needs per device (arguments + outputs - the donated buffers they share +
    temp) against the usable share of the device's memory; ``memory`` has the fields of
    ``compiled.memory_analysis()``."""
    need = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    budget = int(device_bytes * usable_fraction)
    return dict(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        need_bytes=int(need),
        budget_bytes=budget,
        fits=bool(need <= budget),
        headroom_bytes=int(budget - need),
    )


def step_flops(
    *,
    matmul_params: int,
    attention_layers: int,
    attention_width: int,
    seq_len: int,
    tokens: int,
    remat: bool,
    causal: bool = False,
) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one train step on ``tokens`` tokens.

    Model FLOPs are PaLM's (Chowdhery et al. 2022, App. B): 6 per matmul parameter per token
    (forward 2, backward 4) plus 12 * layers * seq_len * attention width per token for the
    attention scores and their weighted sum (dense: no causal halving, as the XLA attention
    computes every score; sparse attention skips some). ``causal`` counts only the allowed
    query-key pairs, (seq_len + 1) / 2 per position on average: the least any exact causal
    attention computes. Remat recomputes the forward in the backward pass: the hardware does 8/6
    of the parameter work and 16/12 of the attention's."""
    attention = 6 * (seq_len + 1) if causal else 12 * seq_len
    per_token = 6 * matmul_params + attention * attention_layers * attention_width
    model = float(per_token) * tokens
    hardware = model * (8 / 6) if remat else model
    return model, hardware


def roofline(
    *,
    model_flops: float,
    hardware_flops: float,
    hbm_bytes_per_device: float,
    devices: int,
    peak_flops: float,
    memory_bandwidth: float,
) -> dict:
    """Lower bound on a step's seconds (the larger of its compute time at the peak FLOP rate
    and its memory traffic at the peak bandwidth; communication not counted) and the MFU that
    bound allows (model FLOPs over what the devices could do in that time)."""
    compute_s = hardware_flops / (devices * peak_flops)
    memory_s = hbm_bytes_per_device / memory_bandwidth
    step_s = max(compute_s, memory_s)
    return dict(
        compute_seconds=compute_s,
        memory_seconds=memory_s,
        step_seconds=step_s,
        bound="compute" if compute_s >= memory_s else "memory",
        mfu_bound=model_flops / (devices * peak_flops * step_s),
    )


def _param_counts(exp) -> tuple[int, int, int]:
    """(all parameters, those in matmuls, bytes of the parameters): the input embedding is a
    lookup, not a matmul, unless the head reuses it (tied)."""
    leaves = jax.tree.leaves(exp.abstract_state.params)
    total = sum(int(x.size) for x in leaves)
    embed = exp.abstract_state.params.get("embed")
    tied = exp.model_config.tie_embeddings
    matmul = total - (0 if tied or embed is None else int(embed.size))
    return total, matmul, tree_bytes(leaves)


def _attention_shape(model_config) -> tuple[int, int]:
    """(layers with attention, query heads x head_dim) of a Transformer or a hybrid Mamba."""
    heads = model_config.num_heads
    head_dim = getattr(model_config, "head_dim", None)
    if getattr(model_config, "mixer", None) is not None:  # Mamba: attention only where asked
        layers = len(model_config.attention_layers)
        width = model_config.hidden_size if layers else 0
        return layers, width
    width = heads * (head_dim or model_config.hidden_size // heads)
    return model_config.num_layers, width


def pod_row(target: str, name: str, config, topology: str, changes: dict, devices=None) -> dict:
    """Builds ``config``'s experiment on ``topology``'s devices of ``target`` (or ``devices``),
    compiles its train step and returns the row: the compiler's error, or memory, fit and
    roofline."""
    from jaxlab.train import loop
    from jaxlab.train.sharding import batch_sharding

    platform = platform_of(target)
    card = chip(target)
    apply_changes(config, changes)
    row = dict(
        target=target,
        pod=name,
        topology=topology,
        changes={k: str(v) for k, v in changes.items()},
        mesh={k: int(v) for k, v in config.mesh.to_dict().items()},
        batch_size=int(config.batch_size),
        seq_len=int(config.seq_len),
        accum_steps=int(config.accum_steps),
        remat=bool(config.model.get("remat", False)),
    )
    begin = time.perf_counter()
    try:
        devices = topology_devices(target, topology) if devices is None else devices
        row["devices"] = len(devices)
        # Traced for the target: 'auto' kernel choices and interpret mode follow its platform,
        # not this process's CPU backend.
        with target_platform(platform):
            exp = loop.build_experiment(config, devices=devices)
            train_step, _ = loop.compile_steps(exp)
            batch = {
                k: jax.ShapeDtypeStruct(
                    (config.batch_size, config.seq_len),
                    jnp.int32,
                    sharding=batch_sharding(exp.mesh),
                )
                for k in loop.MODEL_INPUTS
            }
            lowered = train_step.lower(exp.abstract_state, batch, {})
        row["lower_seconds"] = round(time.perf_counter() - begin, 2)
        row["kernel_calls"] = kernel_calls(lowered.as_text())
        compiled = lowered.compile()
    except Exception as e:  # the compiler's (or the engine's) verdict is the result of this row
        row.update(failed(e, 400))
        row["seconds"] = round(time.perf_counter() - begin, 2)
        return row
    row["seconds"] = round(time.perf_counter() - begin, 2)
    row["mesh"] = {k: int(v) for k, v in exp.mesh.shape.items()}
    row.update(
        compiled=True,
        **fit(compiled.memory_analysis(), card.memory_bytes, USABLE_FRACTION[platform]),
    )
    total, matmul, param_bytes = _param_counts(exp)
    layers, width = _attention_shape(exp.model_config)
    tokens = config.batch_size * config.seq_len
    model_flops, hardware_flops = step_flops(
        matmul_params=matmul,
        attention_layers=layers,
        attention_width=width,
        seq_len=config.seq_len,
        tokens=tokens,
        remat=row["remat"],
    )
    # HBM traffic: the state read and written once, and each micro-step's passes over the layer
    # weights (gathered by FSDP, split by the tensor axis) at their stored dtype; if XLA casts
    # before gathering, that part is half this.
    passes = 3 if row["remat"] else 2
    weights = param_bytes / exp.mesh.shape["tensor"]
    hbm = row["argument_bytes"] + row["output_bytes"] + passes * config.accum_steps * weights
    row.update(
        params=total,
        tokens=tokens,
        model_flops=model_flops,
        hardware_flops=hardware_flops,
        hbm_bytes_lower_bound=hbm,
        **roofline(
            model_flops=model_flops,
            hardware_flops=hardware_flops,
            hbm_bytes_per_device=hbm,
            devices=len(devices),
            peak_flops=card.peak_flops,
            memory_bandwidth=card.memory_bandwidth,
        ),
    )
    return row


@dataclasses.dataclass(frozen=True)
class Decode:
    """One decoding step (one new token for each of ``batch`` rows, a KV cache of ``max_len``
    slots) of a shipped config's model, its parameters in bfloat16 on one device."""

    name: str
    config: str
    batch: int
    max_len: int


DECODES = (Decode("llama2_7b decode", "configs/llama2_7b.py", batch=16, max_len=4096),)


def decode_row(target: str, decode: Decode, config, devices=None) -> dict:
    """Compiles ``jaxlab.infer.decode.decode_step`` of ``config.model`` (unrolled layers,
    bfloat16 parameters, the cache donated) on one device of ``target`` (or ``devices[0]``).
    The roofline of a decoding step is its memory traffic: every parameter and the whole cache
    are read once per token."""
    from flax import nnx

    from jaxlab import models
    from jaxlab.infer.decode import decode_step

    platform = platform_of(target)
    card = chip(target)
    values = config.model.to_dict() | dict(param_dtype="bfloat16", scan_layers=False, remat=False)
    if not values.get("vocab_size"):
        raise ValueError(f"{decode.config}: decode rows need config.model.vocab_size set")
    row = dict(target=target, pod=decode.name, batch=decode.batch, max_len=decode.max_len)
    begin = time.perf_counter()
    try:
        device = one_device(target) if devices is None else devices[0]
        model_config = models.make_config(values)
        place = jax.sharding.SingleDeviceSharding(device)

        def placed(tree):
            return jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=place), tree
            )

        with target_platform(platform):
            graphdef, params = nnx.split(
                nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0))), nnx.Param
            )
            cache = jax.eval_shape(
                lambda: models.make_cache(model_config, decode.batch, decode.max_len)
            )
            ids = jax.ShapeDtypeStruct((decode.batch,), jnp.int32, sharding=place)

            def step(params, cache, tokens, positions):
                return decode_step(nnx.merge(graphdef, params), tokens, positions, cache)

            lowered = jax.jit(step, donate_argnums=1).lower(placed(params), placed(cache), ids, ids)
        compiled = lowered.compile()
    except Exception as e:  # the compiler's verdict is the result of this row
        row.update(failed(e, 400))
        row["seconds"] = round(time.perf_counter() - begin, 2)
        return row
    row["seconds"] = round(time.perf_counter() - begin, 2)
    row.update(
        compiled=True,
        **fit(compiled.memory_analysis(), card.memory_bytes, USABLE_FRACTION[platform]),
    )
    nbytes = tree_bytes((params, cache))
    row["hbm_bytes"] = nbytes
    row["step_seconds"] = nbytes / card.memory_bandwidth
    row["tokens_per_second"] = decode.batch / row["step_seconds"]
    return row


DECODE_HEADER = (
    "decode",
    "batch x cache",
    "compiled",
    "args GB",
    "needs GB",
    "usable GB",
    "fits (headroom GB)",
    "ms/step bound (HBM)",
    "tokens/s bound",
    "compile s",
)


def decode_table_row(row: dict) -> tuple:
    common = (row["pod"], f"{row['batch']} x {row['max_len']}")
    if not row["compiled"]:
        return common + (f"no: {row['error'][:160]}", "", "", "", "", "", "", row["seconds"])
    return common + (
        "yes",
        _gb(row["argument_bytes"]),
        _gb(row["need_bytes"]),
        _gb(row["budget_bytes"]),
        f"{'yes' if row['fits'] else '**NO**'} ({_gb(row['headroom_bytes'])})",
        f"{1e3 * row['step_seconds']:.2f}",
        f"{row['tokens_per_second']:.0f}",
        row["seconds"],
    )


def _gb(n: int | float | None) -> str:
    return "" if n is None else f"{n / 1e9:.1f}"


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


POD_HEADER = (
    "pod",
    "topology",
    "mesh (data, fsdp, tensor)",
    "batch x seq (accum)",
    "compiled",
    "Pallas calls",
    "args GB",
    "temp GB",
    "needs GB",
    "usable GB",
    "fits (headroom GB)",
    "compile s",
)
ROOFLINE_HEADER = (
    "pod",
    "topology",
    "params (B)",
    "tokens/step",
    "model FLOP",
    "compute s",
    "HBM s (lower bound)",
    "step s bound",
    "MFU bound",
)


def pod_table_row(row: dict) -> tuple:
    mesh = row["mesh"]
    shape = f"{row['batch_size']} x {row['seq_len']} ({row['accum_steps']})"
    where = f"{row['topology']} ({row.get('devices', '?')} devices)"
    common = (row["pod"], where, f"{mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}", shape)
    if not row["compiled"]:
        return common + (f"no: {row['error'][:160]}", "", "", "", "", "", "", row["seconds"])
    verdict = "yes" if row["fits"] else "**NO**"
    return common + (
        "yes",
        row["kernel_calls"],
        _gb(row["argument_bytes"]),
        _gb(row["temp_bytes"]),
        _gb(row["need_bytes"]),
        _gb(row["budget_bytes"]),
        f"{verdict} ({_gb(row['headroom_bytes'])})",
        row["seconds"],
    )


def roofline_table_row(row: dict) -> tuple:
    return (
        row["pod"],
        f"{row['topology']} ({row['devices']} devices)",
        f"{row['params'] / 1e9:.2f}" if row["params"] >= 1e8 else f"{row['params'] / 1e9:.4f}",
        row["tokens"],
        f"{row['model_flops']:.3g}",
        f"{row['compute_seconds']:.3g}",
        f"{row['memory_seconds']:.3g}",
        f"{row['step_seconds']:.3g} ({row['bound']})",
        f"{100 * row['mfu_bound']:.0f}%",
    )


def kernel_table_row(row: dict) -> tuple:
    status = "yes" if row["compiled"] else f"no: {row['error'][:100]}"
    return (
        row["kernel"],
        row["detail"],
        status,
        _mib(row.get("temp_bytes")),
        _mib(row.get("argument_bytes")),
        _mib(row.get("vmem_bytes")),
        row["seconds"],
        "yes" if row["as_expected"] else "**NO**",
    )


KERNEL_HEADER = (
    "kernel",
    "shapes",
    "compiled",
    "temp MiB",
    "args MiB",
    "VMEM MiB",
    "s",
    "as expected",
)


def report_of(results: dict):
    """The Markdown report of ``results`` (what :func:`main` collected)."""
    doc = report.Report("Ahead-of-time compile check: kernels and pod train steps").add(
        f"jax {results['jax']}, compiled on this CPU machine for each target's topology "
        "(`jax.experimental.topologies`); nothing ran on an accelerator. A pod's step needs "
        "arguments + outputs - donated aliases + temp bytes per device (`memory_analysis()`); "
        f"it fits if that is at most the usable memory: {USABLE_FRACTION['gpu']:.0%} of a GPU "
        "(JAX's default preallocation; raise XLA_PYTHON_CLIENT_MEM_FRACTION to use more) and "
        "all of a TPU chip. GB are 10^9 bytes. Compile s: wall seconds to build, trace and "
        "compile on this (shared, 2-core) machine.",
    )
    for target, entry in results["targets"].items():
        card = entry["chip"]
        doc.section(
            f"{target}: {card['description']}, {card['memory_bytes'] / 1e9:.1f} GB, "
            f"{card['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
            f"{card['memory_bandwidth'] / 1e12:.2f} TB/s"
        )
        pods = entry["pods"]
        if pods:
            doc.add("Train steps of the pod configurations.")
            doc.table(POD_HEADER, [pod_table_row(r) for r in pods], "llllllrrrrlr")
            changes = sorted({f"{r['pod']}: {r['changes']}" for r in pods if r["changes"]})
            if changes:
                doc.add("Fields the checker set (on top of the shipped config):")
                doc.add(*[f"- {c}" for c in changes])
            compiled = [r for r in pods if r["compiled"]]
            if compiled:
                doc.add(
                    "Roofline bound per train step: model FLOPs 6 x matmul parameters + 12 x "
                    "layers x seq x attention width per token (PaLM App. B; attention counted "
                    "dense, also for the sparse LMs), remat adds a "
                    f"forward; peak {card['peak_flops'] / 1e12:.0f} TFLOP/s and "
                    f"{card['memory_bandwidth'] / 1e12:.2f} TB/s per device; communication not "
                    "counted, so real steps are slower. The SSM scans' own FLOPs are not counted "
                    "(the Mamba rows count matmuls and attention only), and HBM traffic counts "
                    "weight passes at the parameters' stored dtype (half that if XLA gathers "
                    "them in bfloat16). For comparison, MEDITRON-70B reported "
                    "42.3% MFU on 128 A100s (Chen et al. 2023)."
                )
                doc.table(ROOFLINE_HEADER, [roofline_table_row(r) for r in compiled], "llrrrrrrr")
        if entry.get("decodes"):
            doc.add(
                "Decoding steps on one device (bfloat16 parameters, unrolled layers): the bound "
                "reads every parameter and the whole cache once per step at the peak bandwidth."
            )
            doc.table(DECODE_HEADER, [decode_table_row(r) for r in entry["decodes"]], "lllrrrlrrr")
        if entry["kernels"]:
            doc.add(
                "Pallas kernels, each on one device; VMEM: the most scoped VMEM one Mosaic "
                "kernel call reserves (TPU)."
            )
            doc.table(KERNEL_HEADER, [kernel_table_row(r) for r in entry["kernels"]], "lllrrrrl")
    return doc


def unexpected(results: dict) -> list[tuple]:
    """(target, what, why) of every row that did not turn out as it must."""
    bad = []
    for target, entry in results["targets"].items():
        for r in entry["kernels"]:
            if not r["as_expected"]:
                bad.append((target, r["kernel"], r["detail"]))
        for r in entry["pods"] + entry.get("decodes", []):
            if not r["compiled"]:
                bad.append((target, r["pod"], r["error"][:200]))
            elif not r["fits"]:
                bad.append((target, r["pod"], f"needs {_gb(r['need_bytes'])} GB per device"))
    return bad


def check_target(
    target: str,
    pods: list[tuple[str, str, str, dict]],
    decodes: list[Decode],
    kernels: bool,
    quick: bool,
    entry: dict,
    save: Callable[[], None],
) -> None:
    """Fills ``entry`` with the pod rows and kernel rows of ``target``, calling ``save`` after
    each (a long run leaves its finished rows behind); ``pods`` holds (name, config, topology,
    changes)."""
    entry.update(chip=dataclasses.asdict(chip(target)), kernels=[], pods=[], decodes=[])
    for name, spec, topology, changes in pods:
        row = pod_row(target, name, load_config(spec), topology, changes)
        entry["pods"].append(row)
        print(pod_table_row(row), flush=True)
        save()
    for decode in decodes:
        entry["decodes"].append(decode_row(target, decode, load_config(decode.config)))
        print(decode_table_row(entry["decodes"][-1]), flush=True)
        save()
    if kernels:
        platform = platform_of(target)
        device = one_device(target)
        # Traced for the target: the kernels pick Triton or Mosaic by the platform traced for;
        # the one-device mesh tells Mosaic's scalar-prefetch lowering which chip it targets.
        mesh = jax.sharding.Mesh(np.array([device]), ("x",))
        with target_platform(platform), jax.set_mesh(mesh):
            for case in kernel_cases(quick, platform):
                entry["kernels"].append(compile_case(case, device))
                print(kernel_table_row(entry["kernels"][-1]), flush=True)
                save()


def main(argv):
    del argv
    for target in FLAGS.targets:
        platform_of(target)  # refuses an unknown target before anything compiles
    results = dict(jax=jax.__version__, targets={})
    for target in FLAGS.targets:
        key = "gpu" if platform_of(target) == "gpu" else target
        if FLAGS.config:
            pods = [(FLAGS.config, FLAGS.config, FLAGS.topology, {})]
        else:
            pods = [
                (p.name, p.config, p.topologies[key], p.changes)
                for p in PODS
                if (p.quick or not FLAGS.quick)
                and key in p.topologies
                and (not FLAGS.pods or p.name in FLAGS.pods)
            ]
        print(f"\n## {target}", flush=True)
        results["targets"][target] = {}
        check_target(
            target,
            pods,
            []
            if FLAGS.config or FLAGS.quick
            else [d for d in DECODES if not FLAGS.pods or d.name in FLAGS.pods],
            kernels=FLAGS.kernels and not FLAGS.config,
            quick=FLAGS.quick,
            entry=results["targets"][target],
            save=lambda: report.write(FLAGS.workdir, report_of(results), results),
        )
    bad = unexpected(results)
    print(report_of(results).markdown())
    print(f"\n{len(bad)} unexpected result(s)" + "".join(f"\n  {b}" for b in bad))
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
