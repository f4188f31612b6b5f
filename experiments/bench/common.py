"""Helpers shared by the benchmarks: the one timer (:func:`time_calls`, seconds), machine state,
memory and sparse-attention inputs. Defines no flags."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times of the timed calls, in seconds, and the last call's output."""

    seconds: list[float]
    output: Any

    @property
    def median(self) -> float:
        """The median of :attr:`seconds`, in seconds."""
        return statistics.median(self.seconds)


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> Timing:
    """The one timer of the benchmarks: calls ``fn`` ``warmup`` times untimed (compilation), then
    ``repeats`` times timed, each until its output is ready (``jax.block_until_ready``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_calls needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds.append(time.perf_counter() - start)
    return Timing(seconds, out)


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """This machine's float32 matrix-product rate in FLOP/s, best of ``repeats``, of a
    ``[size, size] x [size, size]`` product: XLA's (a jitted ``jnp.matmul``) and, when it is
    imported, PyTorch's. A large square product is about the fastest shape a CPU matmul runs
    (the smaller and thinner products of a small model run slower), so the better rate is a
    generous bound for a computation made of matrix products on this machine."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    flops = 2.0 * size**3
    product = jax.jit(jnp.matmul)
    xa, xb = jax.device_put(a), jax.device_put(b)
    rates = {"xla": flops / min(time_calls(lambda: product(xa, xb), repeats=repeats).seconds)}
    if "torch" in sys.modules:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates["torch"] = flops / min(time_calls(lambda: ta @ tb, repeats=repeats).seconds)
    return rates


def cpu_busy_fraction(interval_s: float = 1.0) -> float | None:
    """Fraction of all CPUs' time spent busy over ``interval_s`` (Linux ``/proc/stat``), or None."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else 1.0 - (idle1 - idle0) / total


def _torch_environment() -> dict[str, Any]:
    if "torch" not in sys.modules:
        return {}
    import torch
    import transformers

    return dict(
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        torch_interop_threads=torch.get_num_interop_threads(),
        transformers=transformers.__version__,
    )


def environment() -> dict[str, Any]:
    return dict(
        python=sys.version.split()[0],
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        jax_backend=jax.default_backend(),
        jax_devices=[str(d) for d in jax.devices()],
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        jax_default_matmul_precision=str(jax.config.jax_default_matmul_precision),
        flax=getattr(sys.modules.get("flax"), "__version__", "?"),
        **_torch_environment(),
        load_average_at_start=os.getloadavg(),
        cpu_busy_before_run=cpu_busy_fraction(),
    )


def _proc_status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in MiB, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ru_maxrss_mib() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in MiB (Linux reports KiB).

    On Linux it survives ``execve``: a freshly spawned child starts at its parent's RSS at the
    fork, so it overstates the peak of a child smaller than its parent.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """This process's own peak resident set size so far, in MiB.

    ``VmHWM`` (the high-water mark of this process's address space, which starts afresh at
    ``execve``); ``ru_maxrss`` where ``/proc`` is missing.
    """
    hwm = _proc_status_mib("VmHWM")
    return ru_maxrss_mib() if hwm is None else hwm


def memory_snapshot() -> dict[str, float | None]:
    return dict(
        peak_mib=peak_rss_mib(),
        current_mib=_proc_status_mib("VmRSS"),
        ru_maxrss_mib=ru_maxrss_mib(),
    )


def write_json(path: str, result: dict[str, Any]) -> None:
    """Writes a benchmark's results, creating the directory."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def time_steps(step: Callable[[int], Any], num_first: int, repeats: int):
    """Runs ``step(i)`` for the first ``num_first`` indices one by one (their outputs and times
    are returned; the first includes any warm-up), then ``repeats`` timed steps.

    Returns:
      (outputs of the first steps, a dict of timings in s: ``first_step_s``, ``loss_step_s``,
      ``step_s``, ``step_median_s``, and ``memory``: snapshots after the first and timed steps).
    """
    first = [time_calls(lambda i=i: step(i), repeats=1, warmup=0) for i in range(num_first)]
    after_first = memory_snapshot()
    counter = iter(range(num_first, 10**9))
    timed = time_calls(lambda: step(next(counter)), repeats=repeats, warmup=0)
    return [t.output for t in first], dict(
        first_step_s=first[0].seconds[0],
        loss_step_s=[t.seconds[0] for t in first],
        step_s=timed.seconds,
        step_median_s=timed.median,
        memory=dict(after_first_steps=after_first, after_timed_steps=memory_snapshot()),
    )


# Sparse attention inputs, shared by bench_attention (CPU) and bench_gpu (device).

HASH_BUCKETS = (2, 8, 32)
QK_DROP_RATES = (0.2, 0.5, 0.8)


def sparsity_sweep(hash_buckets=HASH_BUCKETS, drop_rates=QK_DROP_RATES):
    """[(label, kind, level)]: hash with ``level`` buckets, qk with drop rate ``level``."""
    return [(f"hash nb={n}", "hash", n) for n in hash_buckets] + [
        (f"qk drop={p:.1f}", "qk", p) for p in drop_rates
    ]


def sparse_inputs(kind: str, level, batch: int, seq: int, heads: int, kv_heads: int, seed=0):
    """Random bucket ids (uniform over ``level`` buckets) or keep masks (drop rate ``level``)."""
    rng = np.random.default_rng(seed)
    if kind == "hash":
        return (
            rng.integers(0, level, (batch, seq, heads), dtype=np.int32),
            rng.integers(0, level, (batch, seq, kv_heads), dtype=np.int32),
        )
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
