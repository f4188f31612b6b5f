"""Loss-driven baselines: PGD adversarial training (Madry et al.) and the TRADES perturbation."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlab.robust.ascent import ascend, ascent_direction


def pgd_perturb(
    apply_fn: Callable,
    params,
    x,
    y,
    rng,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    random_start: bool = True,
    clip: tuple[float, float] | None = None,
):
    """Inputs perturbed by cross-entropy ascent on the true labels ``y`` (ints)."""

    def loss(xa):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, xa), y)

    return ascend(
        loss,
        x,
        rng,
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        norm=norm,
        random_start=random_start,
        clip=clip,
    )


def trades_perturb(
    apply_fn: Callable,
    params,
    x,
    rng,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    clip: tuple[float, float] | None = None,
):
    """TRADES' inner maximisation: ``KL(p(x) || p(x + delta))`` ascent from a small random start
    (0.001 N(0, 1), as in Zhang et al.); label-free like UDP."""
    clean = jax.lax.stop_gradient(jax.nn.log_softmax(apply_fn(params, x), axis=-1))

    def divergence(xa):
        log_q = jax.nn.log_softmax(apply_fn(params, xa), axis=-1)
        return jnp.sum(jnp.exp(clean) * (clean - log_q), axis=-1)

    start_rng, rng = jax.random.split(rng)
    start = 0.001 * jax.random.normal(start_rng, x.shape, x.dtype)
    return ascend(
        divergence,
        x,
        rng,
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        norm=norm,
        clip=clip,
        initial_delta=start,
    )


def vat_perturb(apply_fn: Callable, params, x, rng, *, epsilon: float, power_iterations: int = 1):
    """Virtual adversarial training's perturbation (Miyato et al.): ``epsilon`` times the
    dominant eigenvector of the Hessian of ``KL(p(x) || p(x + r))`` at ``r = 0``, per sample in l2,
    by ``power_iterations`` power steps from a random direction. The Hessian-vector products are
    exact (forward-over-reverse), not the paper's finite difference ``xi``, which in float32
    falls below the input's rounding. Label-free."""
    if not epsilon > 0 or power_iterations < 1:
        raise ValueError(
            f"vat_perturb: need epsilon > 0 and power_iterations >= 1, got "
            f"{epsilon}, {power_iterations}"
        )
    clean = jax.lax.stop_gradient(jax.nn.log_softmax(apply_fn(params, x), axis=-1))

    def divergence(r):
        log_q = jax.nn.log_softmax(apply_fn(params, x + r), axis=-1)
        return jnp.sum(jnp.exp(clean) * (clean - log_q))

    def unit(v):  # per sample, in l2
        return ascent_direction(v, "l2")

    zero = jnp.zeros_like(x)
    d = unit(jax.random.normal(rng, x.shape, x.dtype))
    for _ in range(power_iterations):  # per-sample blocks: the KL sums independent samples
        d = unit(jax.jvp(jax.grad(divergence), (zero,), (d,))[1])
    return jax.lax.stop_gradient(x + epsilon * d)
