"""jaxlab's import keeps reductions out of jaxlib 0.10's YNNPACK fusions on CPU, whose jitted
multiply-reduce can be wrong (jax-ml/jax#39103): a fresh process that imports jaxlab computes a
vmapped attention backward under jit equal to a float64 NumPy evaluation."""

import os
import subprocess
import sys

from tests.entrypoints import without_test_xla_flags

SCRIPT = r"""
import jaxlab  # before jax starts its backends
import os
import jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
p = rng.standard_normal((8, 2, 2, 32, 32))
p = np.exp(p - p.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
d_out, v, k = (rng.standard_normal(s) for s in ((3, 8, 32, 2, 2, 8), (8, 32, 2, 8), (8, 32, 2, 8)))
def bwd(d, xp, **kw):
    dp = xp.einsum("bqkgd,bskd->bkgqs", d, v, **kw)
    ds = p * (dp - xp.sum(p * dp, axis=-1, keepdims=True))
    return xp.einsum("bkgqs,bskd->bqkgd", ds, k, **kw)
f32 = lambda x: jnp.asarray(x, jnp.float32)
p, v, k = f32(p), f32(v), f32(k)
jitted = jax.jit(jax.vmap(lambda d: bwd(d, jnp, preferred_element_type=jnp.float32)))
got = np.asarray(jitted(f32(d_out)))
p, v, k = (np.asarray(x, np.float64) for x in (p, v, k))
want = np.stack([bwd(d, np) for d in d_out])
print("FLAGS", os.environ["XLA_FLAGS"])
print("ERR", float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
"""


def test_jitted_vmapped_multiply_reduce_matches_float64_after_importing_jaxlab():
    # XLA's default compilation (the miscompile is in its default pipeline), no YNN flag given.
    env = without_test_xla_flags(
        dict(os.environ, JAX_PLATFORMS="cpu"), "xla_cpu_experimental_ynn_fusion_type"
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert float(lines["ERR"]) < 1e-5, out.stdout
