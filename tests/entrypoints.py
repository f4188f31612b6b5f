"""Running the repository's entrypoints (experiments, benchmarks) as programs from tests."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``python -m module args`` from the repository root, capturing its output (the
    environment, with the test setup's compilation settings, is inherited)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
