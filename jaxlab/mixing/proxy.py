"""One proxy-model training step with a mixer: the model and the domain weights move together.

``domain_losses(params, batch) -> [k]`` gives the mean loss of each domain in a batch (domains
absent from it must give 0 with zero gradient, e.g. a masked mean with a guarded denominator).

* DoGE: per-domain gradients (one forward, vmapped backward passes), target-domain gradients for
  the OOD objective, the mixer update, then the optimizer steps on ``sum_i a_i g_i`` with the
  new weights (gradient reweighting, as the authors' trainer does).
* DoReMi: the proxy's and the reference model's per-example losses give the clipped excess and
  the weights; the optimizer steps on the gradient of ``sum_i a_i loss_i`` (loss reweighting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.mixing.doge import Mixer, domain_gradients, weighted_sum


class ProxyState(NamedTuple):
    params: Any
    opt_state: Any
    mixer: Any


def make_doge_step(domain_losses: Callable, optimizer: optax.GradientTransformation,
                   mixer: Mixer, *, target_losses: Callable | None = None):  # fmt: skip
    """``step(state, batch) -> (state, metrics)``; ``target_losses(params, batch) -> [m]`` for
    the OOD objective (the target domains' losses, which the model does not train on)."""

    def step(state: ProxyState, batch):
        losses, grads = domain_gradients(lambda p: domain_losses(p, batch), state.params)
        grads = mixer.prepare(grads)  # per-domain clipping: the scores and the update both see it
        target = None
        if target_losses is not None:
            _, target = domain_gradients(lambda p: target_losses(p, batch), state.params)
        weights, mixer_state = mixer.update(grads, state.mixer, target)
        update = weighted_sum(weights, grads)
        updates, opt_state = optimizer.update(update, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"domain_losses": losses, "weights": weights, "loss": jnp.dot(weights, losses),
                   "grad_norm": optax.tree.norm(update)}  # fmt: skip
        return ProxyState(params, opt_state, mixer_state), metrics

    return step


def make_doremi_step(example_losses: Callable, optimizer: optax.GradientTransformation,
                     mixer: Mixer, reference_params):  # fmt: skip
    """``step(state, batch) -> (state, metrics)``. ``example_losses(params, batch) -> [k, n]``:
    the per-example losses of each domain's rows (every row present); the frozen reference model
    shares it with ``reference_params``. The excess is clipped per example."""

    def step(state: ProxyState, batch):
        reference = jax.lax.stop_gradient(example_losses(reference_params, batch))
        # One forward pass: the losses set the weights, then the VJP with cotangent w_i / n
        # gives the gradient of sum_i w_i mean(losses_i).
        losses, vjp = jax.vjp(lambda p: example_losses(p, batch), state.params)
        excess = jnp.mean(jnp.maximum(losses - reference, 0.0), axis=1)  # every row present
        weights, mixer_state = mixer.update(excess, state.mixer)
        (grads,) = vjp(jnp.broadcast_to(weights[:, None] / losses.shape[1], losses.shape))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        domain_means = jnp.mean(losses, axis=1)
        metrics = {"domain_losses": domain_means, "weights": weights,
                   "loss": jnp.dot(weights, domain_means),
                   "grad_norm": optax.tree.norm(grads)}  # fmt: skip
        return ProxyState(params, opt_state, mixer_state), metrics

    return step
