"""Running the repository's entrypoints (experiments, benchmarks) as programs from tests."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# XLA flags tests/conftest.py adds to XLA_FLAGS: they make XLA:CPU compile faster (the suite is
# mostly compiling) and change how it compiles, not the math it compiles.
TEST_XLA_FLAGS = {
    "xla_backend_optimization_level": "0",
    "xla_cpu_use_fusion_emitters": "false",
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}

# XLA's defaults for the flags among those that change the compiled HLO (fusion), as
# ``compiler_options`` of an in-process compile (the LLVM level only changes machine code).
XLA_DEFAULT_HLO_OPTIONS = {
    "xla_cpu_use_fusion_emitters": True,
    "xla_cpu_enable_concurrency_optimized_scheduler": True,
}


def without_test_xla_flags(env: dict, *also: str) -> dict:
    """``env`` with XLA_FLAGS stripped of :data:`TEST_XLA_FLAGS`' names (and the flags named in
    ``also``): XLA's default compilation, for tests about what users' compiled programs do."""
    drop = {*TEST_XLA_FLAGS, *also}
    flags = env.get("XLA_FLAGS", "").split()
    kept = [f for f in flags if f.lstrip("-").split("=")[0] not in drop]
    return dict(env, XLA_FLAGS=" ".join(kept))


def run_module(
    module: str, *args: str, timeout: float = 900, default_compiler: bool = False
) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root, capturing its output. The
    environment, with the test setup's compilation settings, is inherited; ``default_compiler``
    drops :data:`TEST_XLA_FLAGS`."""
    env = without_test_xla_flags(os.environ) if default_compiler else None
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
