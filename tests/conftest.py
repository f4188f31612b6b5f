"""Test setup: 8 fake CPU devices so every run exercises sharding, and cheaper compilation.

Most of the suite's time is XLA compiling small programs, many of them more than once (the same
tiny model in several tests, worker processes and experiment subprocesses). So the tests, and the
subprocesses they start (through the environment), share jax's persistent compilation cache in
``.jax_cache/``, and compile with ``tests.entrypoints.TEST_XLA_FLAGS``: LLVM's optimisation level
0, XLA:CPU's older loop emitters and no concurrency-optimised scheduler. They change how XLA
compiles (fusion and code generation: results can differ in the last bits), not the math; tests
about what users' compiled programs do (compiled passes, XLA workarounds, benchmarks' HLO counts)
compile with XLA's defaults. Measured: on tests/models/{depth,interface,hidden_states}_test.py the
cache and level 0 cut wall time from 155 s to 83 s; on the generate, loop and hidden-state tests
the emitters cut XLA's compile time from 143 s to 76 s (wall 119 -> 83 s) and the scheduler 72 ->
63 s (wall 78 -> 72 s); source lines instead of full tracebacks in MLIR locations, on
tests/models/transformer_test.py and tests/train/loop_test.py: wall 75-79 s -> 68-71 s. Your
own settings of these (in XLA_FLAGS or the environment) are kept. The cache has no size limit (a
limit would make every write scan the folder): ``make clean`` empties it. xdist workers end with
``os._exit`` once their results are sent (below).
"""

import os
import sys

import pytest

from tests.entrypoints import TEST_XLA_FLAGS

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

for _flag, _value in TEST_XLA_FLAGS.items():
    if f"--{_flag}" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# MLIR locations carry each operation's source line instead of its whole Python traceback (up
# to 100 frames): debugging metadata only, and lowering and XLA's compile both read less.
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "false")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # An xdist worker that has sent its results ("workerfinished", with the exit status, at
    # session finish) has only freeing left: pytest's last garbage collection and the atexit
    # handlers, among them jax's clean-up that drops every cached executable. At the end of
    # `make test` that held the controller's summary about 40 s; the operating system frees it
    # all at once instead. A worker that failed before finishing (or a pytest run inside a test,
    # which inherits the worker's environment) exits normally, with its error.
    if "exitstatus" in getattr(config, "workeroutput", {}):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
