"""DoReMi (Xie et al., 2023) as a mixer with DoGE's protocol, the baseline of the DoGE paper.

``update(domain_losses, state, reference_losses) -> (weights, state)``: the per-domain mean losses
of the proxy and of a fixed reference model give the clipped excess loss
``e_i = max(loss_i - ref_i, 0)`` (``excess_clip``, the lower bound); then
``log a <- log a + step_size e``, log-sum-exp normalised, and smoothed
``a <- (1 - s) a + s / k`` (the authors' code default s = 1e-4). The proxy is trained on the
loss ``sum_i a_i loss_i`` (Group DRO: loss reweighting, not gradient reweighting), and the
published weights are the average over all updates. Domains absent from a batch (``present``
False) keep a zero excess.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.mixing.doge import DoGEState, Mixer, check_initial_weights

DoReMiState = DoGEState  # the same fields: log weights, their running sum, the update count


def doremi(*, num_domains: int, step_size: float = 1.0, smoothing: float = 1e-4,
           excess_clip: float = 0.0, initial_weights=None) -> Mixer:  # fmt: skip
    if not step_size > 0:
        raise ValueError(f"doremi: step_size must be > 0, got {step_size}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"doremi: smoothing must be in [0, 1), got {smoothing}")
    start = check_initial_weights(initial_weights, num_domains)

    def init() -> DoReMiState:
        log_weights = jnp.log(jnp.asarray(start, jnp.float32))
        return DoReMiState(log_weights, jnp.zeros_like(log_weights), jnp.zeros((), jnp.int32))

    def update(domain_losses, state: DoReMiState, reference_losses, present=None):
        domain_losses, reference_losses = jnp.asarray(domain_losses), jnp.asarray(reference_losses)
        if domain_losses.shape != (num_domains,) or reference_losses.shape != (num_domains,):
            raise ValueError(f"doremi: losses must have shape ({num_domains},), got "
                             f"{domain_losses.shape} and {reference_losses.shape}")  # fmt: skip
        excess = jnp.maximum(domain_losses - reference_losses, excess_clip)
        if present is not None:
            excess = jnp.where(present, excess, 0.0)
        logits = state.log_weights + step_size * excess
        weights = jax.nn.softmax(logits)
        weights = (1.0 - smoothing) * weights + smoothing / num_domains
        return weights, DoReMiState(jnp.log(weights), state.weight_sum + weights, state.step + 1)

    return Mixer(init, update)
