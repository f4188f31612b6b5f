"""jaxlab: ten research results as one JAX/Flax library with Pallas kernels."""

import importlib.metadata as _metadata
import os as _os

__version__ = "0.1.0"

# jaxlib 0.10's XLA:CPU offloads multiply-reduce patterns to YNNPACK fusions that can return wrong
# numbers under jit (jax-ml/jax#39103; here a vmapped attention backward, P * (dP - sum(P * dP)),
# came out 0.95 relative error off its eager value). Keeping reductions out of those fusions fixes
# it; XLA reads XLA_FLAGS when its first backend starts, so this must run before that.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _keep_reductions_out_of_ynn_fusions() -> None:
    try:
        jaxlib_version = _metadata.version("jaxlib")
    except _metadata.PackageNotFoundError:
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if not jaxlib_version.startswith("0.10.") or _YNN_FLAG in flags:
        return
    import jax._src.xla_bridge as xla_bridge

    if xla_bridge.backends_are_initialized():
        import warnings

        warnings.warn(
            f"jaxlab: jax's backends started before jaxlab was imported, so jaxlib "
            f"{jaxlib_version}'s CPU miscompile of multiply-reduce fusions (jax-ml/jax#39103) "
            f"is not worked around; set XLA_FLAGS='{_YNN_FLAG}=-reduce' before starting jax",
            stacklevel=2,
        )
        return
    _os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=-reduce".strip()


_keep_reductions_out_of_ynn_fusions()
