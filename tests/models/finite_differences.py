"""Gradients checked against central finite differences of a float64 NumPy reference."""

import jax
import numpy as np
from flax import nnx


def check_gradients(module, loss, reference_loss, seed=0, eps=1e-6, rtol=1e-4):
    """``jax.grad`` of ``loss(module)`` (float32) against ``reference_loss(params)`` (float64
    NumPy, ``params`` the module's nested dict of parameters) differentiated by central
    differences along a random direction in each parameter array in turn.

    Each directional derivative ``sum(g * v)`` must agree to ``rtol * sum(|g * v|)`` (the float32
    rounding of its terms); a wrong array (transposed, missing a term) misses by about that sum.
    """
    grads = nnx.to_pure_dict(nnx.grad(loss)(module))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module)))
    rng = np.random.default_rng(seed)
    flat_grads = jax.tree_util.tree_flatten_with_path(grads)[0]
    assert flat_grads, "no parameters"
    for path, g in flat_grads:
        name = jax.tree_util.keystr(path)
        g = np.asarray(g, np.float64)
        v = rng.normal(size=g.shape)

        def moved(step, name=name, v=v):
            return jax.tree_util.tree_map_with_path(
                lambda p, a: a + step * v if jax.tree_util.keystr(p) == name else a, params
            )

        numeric = (reference_loss(moved(eps)) - reference_loss(moved(-eps))) / (2 * eps)
        analytic = np.sum(g * v)
        scale = np.sum(np.abs(g * v))
        assert abs(analytic - numeric) <= rtol * scale, (name, analytic, numeric, scale)
