"""Uncertainty-driven perturbations (Pagliardini et al., arXiv 2202.05737).

UDP moves each input uphill on the model's predictive entropy, ``H(softmax(f(x + delta)))``,
inside an epsilon ball. The labels are never read: the function takes none. Entropy peaks at the
decision boundary, so the perturbation walks points towards the boundary and not across it, which
is why larger radii than loss-driven PGD are usable.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlab.robust.ascent import ascend


def predictive_entropy(logits):
    """``-sum p log p`` of ``softmax(logits)`` per sample, from ``log_softmax`` (no NaN when a
    probability underflows, unlike ``p * log(p)``)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def udp_perturb(
    apply_fn: Callable,
    params,
    x,
    rng,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int,
    norm: str = "linf",
    random_stop: bool = True,
    random_start: bool = False,
    clip: tuple[float, float] | None = None,
):
    """Inputs perturbed by entropy ascent (``jaxlab.robust.ascent.ascend`` for the steps, the
    ball, per-sample random stopping and clipping)."""
    return ascend(
        lambda xa: predictive_entropy(apply_fn(params, xa)),
        x,
        rng,
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        norm=norm,
        random_start=random_start,
        random_stop=random_stop,
        clip=clip,
    )
