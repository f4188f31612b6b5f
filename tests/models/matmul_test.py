"""jaxlab.models.layers.matmul: the 2-D form of a projection einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models.layers import matmul


@pytest.mark.parametrize(
    "x_shape, w_shape, in_dims, spec",
    [
        ((3, 5, 8), (8, 4, 6), 1, "bse,ehd->bshd"),
        ((3, 5, 4, 6), (4, 6, 8), 2, "bshd,hde->bse"),
        ((7, 8), (8, 9), 1, "ne,ef->nf"),
    ],
)
def test_value_and_gradients_match_float64_einsum(x_shape, w_shape, in_dims, spec):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    out_shape = np.einsum(spec, x, w).shape
    ct = rng.normal(size=out_shape)

    def loss(x, w):
        return jnp.sum(matmul(x, w, in_dims=in_dims) * ct)

    value, (dx, dw) = jax.value_and_grad(loss, argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    out = matmul(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), in_dims=in_dims)
    inputs, output = spec.split("->")
    xs, ws = inputs.split(",")
    np.testing.assert_allclose(out, np.einsum(spec, x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, np.einsum(f"{output},{ws}->{xs}", ct, w), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, np.einsum(f"{xs},{output}->{ws}", x, ct), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(value, np.sum(np.einsum(spec, x, w) * ct), rtol=1e-5)


def test_mismatched_inner_axes_are_named():
    with pytest.raises(ValueError, match=r"first 2 axes of w must be x's last 2 \(4, 6\)"):
        matmul(jnp.zeros((3, 4, 6)), jnp.zeros((4, 5, 8)), in_dims=2)
