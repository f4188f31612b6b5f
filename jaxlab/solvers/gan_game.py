"""A constrained GAN as a VI: the game of the PI-ACVI paper's MNIST experiment, at 2-D scale.

The generator ``G(z)`` and the discriminator ``D(x)`` are small tanh MLPs; their parameters form
one vector ``x = (theta, phi)``. With the non-saturating losses on a fixed sample of data and noise,

  L_G(theta, phi) = mean softplus(-D(G(z)))
  L_D(theta, phi) = mean softplus(-D(x_data)) + mean softplus(D(G(z)))

the operator is ``F(x) = (grad_theta L_G, grad_phi L_D)``. The sample is drawn once, so ``F`` is a
deterministic function and every solver sees the same game (the authors train on minibatches).

Constraints: ``num_constraints`` half-spaces ``<a_i, x - x0> <= r_i`` around the initial parameters,
``a_i ~ N(0, I)`` drawn explicitly and ``r_i ~ U[radius_range]``. (The authors' notebook meant to
draw random ``a_i`` too, but its loop rebinds a variable instead of writing the parameters, so all
its ``a_i`` equal the initial weights; brief section 2.3.) ``x0`` is strictly inside, so both the
barrier and the projection y-steps apply.

Data: a ring of Gaussian modes (``mixture_of_gaussians``) by default; any ``[n, d]`` array works,
e.g. flattened MNIST images from local files (``jaxlab.data.images.load_mnist``) scaled to
``[-1, 1]`` with ``output="tanh"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxlab.solvers.problems import Polyhedron, VIProblem


class GANGame(NamedTuple):
    """The VI, its feasible start, ``generate(x, noise) -> samples`` for evaluation and
    ``losses(x) -> (L_G, L_D)`` on the game's fixed sample."""

    problem: VIProblem
    x0: jax.Array
    generate: Callable[[jax.Array, jax.Array], jax.Array]
    losses: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    noise_dim: int
    generator_size: int  # x[:generator_size] are the generator's parameters


def mixture_of_gaussians(
    num_samples: int, *, modes: int = 8, radius: float = 2.0, std: float = 0.05, seed: int = 0
):
    """``num_samples`` points from ``modes`` equal-weight Gaussians on a circle; returns
    ``(samples [n, 2], centers [modes, 2])``."""
    if modes < 1 or num_samples < 1 or not std > 0:
        raise ValueError(
            f"mixture_of_gaussians: need modes >= 1, num_samples >= 1 and std > 0, "
            f"got {modes}, {num_samples}, {std}"
        )
    angles = 2 * np.pi * np.arange(modes) / modes
    centers = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, modes, num_samples)
    return centers[which] + std * rng.standard_normal((num_samples, 2)), centers


def _init_mlp(rng: np.random.Generator, sizes):
    """Glorot-uniform weights, zero biases."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        layers.append((rng.uniform(-bound, bound, (fan_in, fan_out)), np.zeros(fan_out)))
    return layers


def _mlp(layers, h, output: str = "linear"):
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return jnp.tanh(h) if output == "tanh" else h


def gan_game(
    data,
    *,
    noise_dim: int = 2,
    hidden: tuple[int, ...] = (32, 32),
    num_constraints: int = 100,
    radius_range: tuple[float, float] = (3.0, 10.0),
    sample_size: int = 512,
    output: str = "linear",
    seed: int = 0,
    name: str = "gan",
) -> GANGame:
    """The constrained GAN game on ``data`` ``[n, d]`` (see the module doc)."""
    data = np.asarray(data, np.float64)
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"gan_game: data must be [n, d] with n >= 1, got shape {data.shape}")
    if output not in ("linear", "tanh"):
        raise ValueError(f"gan_game: output must be 'linear' or 'tanh', got {output!r}")
    lo, hi = radius_range
    if not 0 < lo <= hi:
        raise ValueError(f"gan_game: radius_range must satisfy 0 < lo <= hi, got {radius_range}")
    if num_constraints < 1 or sample_size < 1 or noise_dim < 1:
        raise ValueError(
            f"gan_game: num_constraints, sample_size and noise_dim must be >= 1, "
            f"got {num_constraints}, {sample_size}, {noise_dim}"
        )
    rng = np.random.default_rng(seed)
    d = data.shape[1]
    params = (_init_mlp(rng, (noise_dim, *hidden, d)), _init_mlp(rng, (d, *hidden, 1)))
    x0, unravel = ravel_pytree(params)
    generator_size = ravel_pytree(params[0])[0].shape[0]
    real = data[rng.integers(0, data.shape[0], sample_size)]
    noise = rng.standard_normal((sample_size, noise_dim))

    def losses(generator, discriminator, dtype):
        fake = _mlp(generator, jnp.asarray(noise, dtype), output)
        fake_logits = _mlp(discriminator, fake)
        real_logits = _mlp(discriminator, jnp.asarray(real, dtype))
        loss_g = jnp.mean(jax.nn.softplus(-fake_logits))
        loss_d = jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
        return loss_g, loss_d

    def operator(x):
        generator, discriminator = unravel(x)
        grad_g = jax.grad(lambda g: losses(g, discriminator, x.dtype)[0])(generator)
        grad_d = jax.grad(lambda h: losses(generator, h, x.dtype)[1])(discriminator)
        return ravel_pytree((grad_g, grad_d))[0]

    def generate(x, z):
        return _mlp(unravel(x)[0], z, output)

    def player_losses(x):
        return losses(*unravel(x), x.dtype)

    x0 = np.asarray(x0, np.float64)
    G = rng.standard_normal((num_constraints, x0.shape[0]))
    h = rng.uniform(lo, hi, num_constraints) + G @ x0
    problem = VIProblem(operator, x0.shape[0], Polyhedron(G, h), name=name)
    return GANGame(problem, jnp.asarray(x0), generate, player_losses, noise_dim, generator_size)


def constraint_violation(problem: VIProblem, x):
    """``max(0, max_i <g_i, x> - h_i)`` for a polyhedral problem."""
    G, h = (jnp.asarray(v, x.dtype) for v in (problem.inequality.G, problem.inequality.h))
    return jnp.maximum(jnp.max(G @ x - h), 0.0)


def mmd(a, b, bandwidths=(0.05, 0.2, 1.0)):
    """Squared maximum mean discrepancy between samples ``a [n, d]`` and ``b [m, d]`` with a sum of
    Gaussian kernels (the biased V-statistic: 0 iff the empirical distributions are equal)."""

    # At least float32, and centred on the pooled mean (distances do not change; the expansion
    # below cancels less).
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    center = jnp.mean(jnp.concatenate([a, b]), axis=0)
    a, b = a - center, b - center

    def kernel(u, v):
        # |u - v|^2 = |u|^2 + |v|^2 - 2 u.v: a matmul, where the difference would be an
        # [n, m, d] tensor (MNIST: 1000 x 1000 x 784 elements per call). Clipped at 0 against
        # rounding; HIGHEST keeps TPUs from rounding the dot to bfloat16.
        dot = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.sum(u * u, axis=-1)[:, None] + jnp.sum(v * v, axis=-1)[None, :] - 2 * dot
        sq = jnp.maximum(sq, 0.0)
        return sum(jnp.exp(-sq / (2 * s**2)) for s in bandwidths)

    return jnp.mean(kernel(a, a)) + jnp.mean(kernel(b, b)) - 2 * jnp.mean(kernel(a, b))


def mode_metrics(samples, centers, std: float):
    """``(modes covered, high-quality fraction)``: a sample is high quality when it lies within
    ``3 std`` of its nearest center; a mode is covered when at least 1% of the samples are
    high-quality samples of it (the usual ring-of-Gaussians GAN metrics)."""
    samples, centers = np.asarray(samples), np.asarray(centers)
    dist = np.linalg.norm(samples[:, None, :] - centers[None, :, :], axis=-1)
    nearest, close = dist.argmin(1), dist.min(1) < 3 * std
    counts = np.bincount(nearest[close], minlength=centers.shape[0])
    return int(np.sum(counts >= 0.01 * samples.shape[0])), float(close.mean())
