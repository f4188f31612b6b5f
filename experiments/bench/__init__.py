"""Benchmarks: timings (seconds, via :func:`experiments.bench.common.time_calls`) and machine state
written as JSON under ``bench_results/``; ``make bench`` runs the CPU ones, ``make bench-gpu`` the
accelerator one."""
