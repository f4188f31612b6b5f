"""A TPU as jax describes one without opening it: Mosaic's lowering asks which chip it targets."""

import jax

V5E = jax.sharding.AbstractMesh(
    (1,), ("x",), abstract_device=jax.sharding.AbstractDevice("TPU v5 lite", 1, "tpu")
)
