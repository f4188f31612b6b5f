"""DoReMi (Xie et al., 2023) as a mixer with DoGE's protocol, the baseline of the DoGE paper.

``update(Observation(excess=..., present=...), state) -> (weights, state)`` (the protocol of
:class:`jaxlab.mixing.Mixer`; DoReMi reads no other field) takes each domain's clipped excess
loss over a fixed reference model, ``e_i = mean_{tokens of i} max(loss - ref_loss, clip)``, as
:func:`domain_excess` computes it from per-token (or per-example) losses: the clip is per token,
as in the authors' trainer, not on the domain means. Then ``log a <- log a + step_size e``,
log-sum-exp normalised, and smoothed ``a <- (1 - s) a + s / k`` (the authors' code default
s = 1e-4). The proxy is trained on ``sum_i a_i loss_i`` (Group DRO: loss reweighting, not
gradient reweighting), and the published weights are the average over all updates. A domain
absent from the batch (``present`` False) gets no step this time.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxlab.mixing._doge import DoGEState, check_initial_weights, mirror_step
from jaxlab.mixing._mixer import MIXERS, Mixer, Observation, required

DoReMiState = DoGEState  # the same fields: log weights, their running sum, the update count


def domain_means(values, masks):
    """``([k] mean of values per domain, [k] counts)`` for per-token values (any shape ``S``) and
    domain masks ``[k, *S]`` (1 on a domain's tokens); an absent domain's mean is 0."""
    axes = tuple(range(1, masks.ndim))
    counts = jnp.sum(masks, axis=axes)
    return jnp.sum(masks * values[None], axis=axes) / jnp.maximum(counts, 1.0), counts


def domain_excess(losses, reference_losses, masks, clip: float = 0.0):
    """``([k] mean clipped excess per domain, [k] present)`` from per-token losses of the proxy
    and the reference and domain masks (see :func:`domain_means`)."""
    excess, counts = domain_means(jnp.maximum(losses - reference_losses, clip), masks)
    return excess, counts > 0


def doremi(
    *, num_domains: int, step_size: float = 1.0, smoothing: float = 1e-4, initial_weights=None
) -> Mixer:
    if not step_size > 0:
        raise ValueError(f"doremi: step_size must be > 0, got {step_size}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"doremi: smoothing must be in [0, 1), got {smoothing}")
    start = check_initial_weights(initial_weights, num_domains)

    def init() -> DoReMiState:
        log_weights = jnp.log(jnp.asarray(start, jnp.float32))
        return DoReMiState(log_weights, jnp.zeros_like(log_weights), jnp.zeros((), jnp.int32))

    def update(observation: Observation, state: DoReMiState):
        excess = jnp.asarray(required("doremi", observation, "excess"))
        present = observation.present
        if excess.shape != (num_domains,):
            raise ValueError(f"doremi: excess must have shape ({num_domains},), got {excess.shape}")
        if present is not None:
            excess = jnp.where(present, excess, 0.0)
        weights, log_weights = mirror_step(state.log_weights, step_size * excess, smoothing)
        return weights, DoReMiState(log_weights, state.weight_sum + weights, state.step + 1)

    return Mixer(init, update)


MIXERS.register("doremi", doremi)
