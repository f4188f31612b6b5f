"""Mixer steps: the model and the domain weights move together.

The two cores, shared by the proxy steps below (small models with one batch per domain) and by
the training engine's mixer objectives (:mod:`jaxlab.mixing.objectives`):

* :func:`doge_gradients`: per-domain gradients (one forward, vmapped backward passes; only
  of the parameters the mixer reads, ``Mixer.reads``, when it says), target-domain gradients
  for the OOD objective, then the mixer update and ``sum_i a_i g_i`` with the new weights
  (gradient reweighting, as the authors' trainer does; :func:`doge_update` on gradients taken
  elsewhere).
* :func:`doremi_gradients`: the model's and the reference model's per-token (or per-example)
  losses give the clipped excess and the weights; one VJP gives the gradient of
  ``sum_i a_i loss_i`` (loss reweighting).

Proxy steps follow jaxlab's one step convention (:mod:`jaxlab.objectives`): the proxy
objectives below turn user loss functions over user-defined batches into an
:class:`jaxlab.objectives.Objective` whose state is the mixer's, and the step is
:func:`jaxlab.objectives.make_train_step` over a ``TrainState`` (``state.objective`` holds the
mixer state; start from ``init_train_state(params, optimizer, mixer.init())``), jitted by the
caller. ``domain_losses(params, batch) -> [k]`` gives the mean loss of each domain in a batch
(domains absent from it must give 0 with zero gradient, e.g. a masked mean with a guarded
denominator). DoReMi's reference parameters arrive as the step's ``frozen["reference"]``, like
every frozen model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from jaxlab.mixing._doge import domain_gradients, weighted_sum
from jaxlab.mixing._doremi import domain_excess, domain_means
from jaxlab.mixing._mixer import Mixer, Observation, _identity
from jaxlab.objectives import Objective, make_train_step


def doge_gradients(
    domain_losses: Callable,
    params,
    mixer: Mixer,
    mixer_state,
    target_losses: Callable | None = None,
):
    """``(update, weights, mixer_state, losses [k], aux)`` of one DoGE step.

    Args:
      domain_losses: ``params -> ([k] mean loss per domain, aux)``.
      params: the model's parameters.
      mixer: a :func:`jaxlab.mixing.doge` mixer; ``mixer_state`` its state.
      target_losses: ``params -> [m]`` target-domain losses (the OOD objective), or None.
    """
    if mixer.reads is None:
        losses, grads, aux = domain_gradients(domain_losses, params, has_aux=True)
        target = None
        if target_losses is not None:
            _, target = domain_gradients(target_losses, params)
        return (*doge_update(grads, mixer, mixer_state, target), losses, aux)
    if mixer.prepare is not _identity:
        # prepare (DoGE's clipping) needs every leaf's gradient; doge() sets reads only
        # without it.
        raise ValueError(
            "doge_gradients: a mixer with Mixer.reads set must have no prepare step (it would "
            "need the gradients of the leaves reads leaves out)"
        )
    # The mixer reads only some leaves (DoGE's param_filter without clipping): the k backward
    # passes give only those (XLA drops the other weight-gradient products), and the update
    # sum_i a_i g_i is one more backward pass with cotangent a.
    losses, vjp, aux = jax.vjp(domain_losses, params, has_aux=True)
    grads = _read_only(jax.vmap(vjp)(jnp.eye(losses.shape[0], dtype=losses.dtype))[0], mixer)
    target = None
    if target_losses is not None:
        target_values, target_vjp = jax.vjp(target_losses, params)
        eye = jnp.eye(target_values.shape[0], dtype=target_values.dtype)
        target = _read_only(jax.vmap(target_vjp)(eye)[0], mixer)
    weights, mixer_state = mixer.update(Observation(grads, target_grads=target), mixer_state)
    (update,) = vjp(weights.astype(losses.dtype))
    return update, weights, mixer_state, losses, aux


def _read_only(grads, mixer: Mixer):
    """Zeros on the leaves the mixer does not read (their backward products are then dead)."""
    return jax.tree.map(lambda g, read: g if read else jnp.zeros_like(g), grads, mixer.reads)


def doge_update(domain_grads, mixer: Mixer, mixer_state, target_grads=None):
    """``(update, weights, mixer_state)`` from per-domain gradients (leading axis ``k``, however
    they were computed): the mixer update, then ``sum_i a_i g_i`` with the new weights."""
    grads = mixer.prepare(domain_grads)  # per-domain clipping: the scores and the update see it
    weights, mixer_state = mixer.update(Observation(grads, target_grads=target_grads), mixer_state)
    return weighted_sum(weights, grads), weights, mixer_state


def doremi_gradients(
    losses_fn: Callable, params, reference_losses, masks, mixer: Mixer, mixer_state
):
    """``(grads, weights, mixer_state, domain mean losses [k], counts [k])`` of one DoReMi step.

    Args:
      losses_fn: ``params -> losses`` per token or per example (any shape ``S``).
      params: the model's parameters.
      reference_losses: the frozen reference model's losses, shape ``S``.
      masks: ``[k, *S]`` 1 where a loss belongs to domain ``i`` (and counts).
      mixer: a :func:`jaxlab.mixing.doremi` mixer; ``mixer_state`` its state.
    """
    # One forward pass: the losses set the weights, then the VJP with cotangent
    # sum_i w_i mask_i / count_i gives the gradient of sum_i w_i mean_loss_i.
    losses, vjp = jax.vjp(losses_fn, params)
    excess, present = domain_excess(losses, jax.lax.stop_gradient(reference_losses), masks)
    means, counts = domain_means(losses, masks)
    weights, mixer_state = mixer.update(Observation(excess=excess, present=present), mixer_state)
    per_token = weights / jnp.maximum(counts, 1.0)
    (grads,) = vjp(jnp.tensordot(per_token, masks, axes=1).astype(losses.dtype))
    return grads, weights, mixer_state, means, counts


def doge_proxy_objective(
    domain_losses: Callable, mixer: Mixer, *, target_losses: Callable | None = None
) -> Objective:
    """DoGE on ``domain_losses(params, batch) -> [k]``; ``target_losses(params, batch) -> [m]``
    for the OOD objective (the target domains' losses, which the model does not train on).
    Metrics: ``domain_losses``, ``weights`` and ``loss`` (their dot product)."""

    def gradients(params, batch, frozen, mixer_state, rng):
        del frozen, rng
        target = None if target_losses is None else (lambda p: target_losses(p, batch))
        update, weights, mixer_state, losses, _ = doge_gradients(
            lambda p: (domain_losses(p, batch), ()), params, mixer, mixer_state, target
        )
        metrics = {"domain_losses": losses, "weights": weights, "loss": jnp.dot(weights, losses)}
        return update, mixer_state, metrics

    return Objective(gradients, init=mixer.init, model_inputs=None)


def doremi_proxy_objective(example_losses: Callable, mixer: Mixer) -> Objective:
    """DoReMi on ``example_losses(params, batch) -> [k, n]``, the per-example losses of each
    domain's rows (every row present); the frozen reference model (``frozen["reference"]``, its
    parameters) shares the function. The excess is clipped per example. Metrics as
    :func:`doge_proxy_objective`."""

    def gradients(params, batch, frozen, mixer_state, rng):
        del rng
        reference = example_losses(frozen["reference"], batch)
        k, n = reference.shape
        masks = jnp.broadcast_to(jnp.eye(k, dtype=reference.dtype)[:, :, None], (k, k, n))
        grads, weights, mixer_state, means, _ = doremi_gradients(
            lambda p: example_losses(p, batch), params, reference, masks, mixer, mixer_state
        )
        metrics = {"domain_losses": means, "weights": weights, "loss": jnp.dot(weights, means)}
        return grads, mixer_state, metrics

    return Objective(gradients, init=mixer.init, model_inputs=None)


def make_doge_step(
    domain_losses: Callable,
    optimizer: optax.GradientTransformation,
    mixer: Mixer,
    *,
    target_losses: Callable | None = None,
):
    """``step(state, batch) -> (state, metrics)``: the shared step on
    :func:`doge_proxy_objective` (metrics also ``grad_norm`` of the update and ``param_norm``)."""
    objective = doge_proxy_objective(domain_losses, mixer, target_losses=target_losses)
    return make_train_step(None, optimizer, objective=objective)


def make_doremi_step(
    example_losses: Callable, optimizer: optax.GradientTransformation, mixer: Mixer
):
    """``step(state, batch, {"reference": reference_params}) -> (state, metrics)``: the shared
    step on :func:`doremi_proxy_objective`."""
    return make_train_step(None, optimizer, objective=doremi_proxy_objective(example_losses, mixer))
