"""Test setup: 8 fake CPU devices so every run exercises sharding, and cheaper compilation.

Most of the suite's time is XLA compiling small programs, many of them more than once (the same
tiny model in several tests, worker processes and experiment subprocesses). So the tests, and the
subprocesses they start (through the environment), share jax's persistent compilation cache in
``.jax_cache/``, and compile with LLVM's optimisation level 0, XLA:CPU's older loop emitters
(``--xla_cpu_use_fusion_emitters=false``) and without its concurrency-optimised scheduler. None
of these changes what a program computes; on tests/models/{depth,interface,hidden_states}_test.py
the first two cut wall time from 155 s to 83 s; on the generate, loop and hidden-state tests the
emitters cut XLA's compile time from 143 s to 76 s (wall 119 -> 83 s) and the scheduler 72 ->
63 s (wall 78 -> 72 s). These flags in your XLA_FLAGS, or your own JAX_COMPILATION_CACHE_DIR,
are kept. The cache has no size limit (a limit would make every write scan the folder):
``make clean`` empties it.
"""

import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

for _flag, _value in (
    ("xla_backend_optimization_level", "0"),
    ("xla_cpu_use_fusion_emitters", "false"),
    ("xla_cpu_enable_concurrency_optimized_scheduler", "false"),
):
    if f"--{_flag}" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
