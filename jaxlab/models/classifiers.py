"""Small Flax NNX classifiers for the robustness experiments: linear, MLP and a LeNet-style CNN.

Each maps inputs ``[batch, ...features]`` to logits ``[batch, num_classes]``. ``functional``
splits a module into a pure ``apply_fn(params, x)`` and its parameter dict, the form that
``jaxlab.robust`` and optax work with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class LinearClassifier(nnx.Module):
    """``logits = x W + b`` on flattened inputs; zero-initialised (convex training from w = 0)."""

    def __init__(self, in_features: int, num_classes: int = 2, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(
            in_features, num_classes, kernel_init=nnx.initializers.zeros, rngs=rngs
        )

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


class MLPClassifier(nnx.Module):
    """ReLU MLP on flattened inputs."""

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int = 2, *, rngs: nnx.Rngs
    ):
        sizes = (in_features, *hidden)
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])
        self.out = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        for layer in self.hidden:
            h = jax.nn.relu(layer(h))
        return self.out(h)


class SmallCNN(nnx.Module):
    """LeNet-5 style: conv 5x5 (6) - pool - conv 5x5 (16) - pool - 120 - 84 - classes, on
    ``[batch, H, W, C]`` images (28x28 MNIST or 32x32 CIFAR)."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int = 10, *, rngs: nnx.Rngs):
        height, width, channels = image_shape
        self.conv1 = nnx.Conv(channels, 6, (5, 5), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        flat = 16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2)
        self.fc1 = nnx.Linear(flat, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.out = nnx.Linear(84, num_classes, rngs=rngs)

    def __call__(self, x):
        def pool(h):
            return nnx.avg_pool(h, (2, 2), strides=(2, 2))

        h = pool(jax.nn.relu(self.conv1(x)))
        h = pool(jax.nn.relu(self.conv2(h)))
        h = h.reshape(h.shape[0], -1)
        return self.out(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(h)))))


def functional(model: nnx.Module) -> tuple[Callable[[dict, jax.Array], jax.Array], dict]:
    """``(apply_fn, params)``: ``apply_fn(params, x)`` runs ``model``'s graph with ``params``."""
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)

    def apply_fn(params, x):
        return nnx.merge(graphdef, params)(jnp.asarray(x))

    return apply_fn, params
