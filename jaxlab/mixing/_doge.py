"""DoGE: domain reweighting with generalization estimation (Fan, Pagliardini, Jaggi, ICML 2024).

A mixer (:class:`jaxlab.mixing.Mixer`) is an ``init``/``update`` pair over a NamedTuple state, like
an optax transformation. ``doge(...).update(Observation(domain_grads, target_grads), state) ->
(weights, state)`` follows the authors' trainer (brief section 1.2), one step per optimizer step
(``target_grads`` only for the OOD objective; DoGE reads no other field):

1. every domain gradient ``g_i`` (a pytree with a leading domain axis) is clipped to global norm
   ``grad_clip`` (optional, as the code's ``max_grad_norm``), then restricted to the parameters
   selected by ``param_filter`` (a pytree of bools) and flattened;
2. scores ``W_i = lr_t * sum_{j != i} <g_i, g_j>`` (``objective="universal"``) or
   ``W_i = lr_t * sum_j <g_i, t_j>`` over the target gradients ``t_j`` (``"ood"``);
3. ``W <- W / (mean_i ||g_i|| + 1e-6)``, clipped to ``[lr_t lo, lr_t hi]`` (``score_clip``: the
   code's ``[0, 5]``, so a harmful domain only loses weight through the normalisation);
4. exponentiated-gradient step ``log a <- log a + W / mu``, softmax, then smoothing
   ``a <- (1 - s) a + s / k``;
5. the running sum of ``a`` gives the published weights, the average over all steps.

The model then steps on ``sum_i a_i g_i`` (``weighted_sum``), with the *new* weights. The scores
use inner products of gradients that were taken on the same parameters, so they estimate how one
SGD step on domain ``i`` changes the other (or the target) domains' loss: to first order
``L_j(theta - lr g_i) - L_j(theta) = -lr <g_i, g_j>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.mixing._mixer import MIXERS, Mixer, Observation, _identity, required

OBJECTIVES = ("universal", "ood")


class DoGEState(NamedTuple):
    """``log_weights [k]``, ``weight_sum [k]`` (for the average) and ``step`` (updates so far)."""

    log_weights: jax.Array
    weight_sum: jax.Array
    step: jax.Array


def check_initial_weights(initial_weights, num_domains: int) -> np.ndarray:
    if num_domains < 2:
        raise ValueError(f"num_domains must be >= 2, got {num_domains}")
    if initial_weights is None:
        return np.full(num_domains, 1.0 / num_domains)
    w = np.asarray(initial_weights, np.float64)
    if w.shape != (num_domains,) or np.any(w <= 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"initial_weights must be {num_domains} positive numbers summing to 1 "
            f"(a point inside the simplex), got {list(np.atleast_1d(w))}"
        )
    return w


def averaged_weights(state) -> jax.Array:
    """The published weights: the mean of the weights over all updates so far."""
    return state.weight_sum / jnp.maximum(state.step, 1).astype(state.weight_sum.dtype)


def current_weights(state) -> jax.Array:
    return jax.nn.softmax(state.log_weights)


def weighted_sum(weights, domain_grads):
    """``sum_i w_i g_i`` over the leading domain axis of every leaf."""
    return jax.tree.map(lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), domain_grads)


def clip_per_domain(domain_grads, max_norm: float):
    """Each domain's gradient (slice of the leading axis) clipped to global norm ``max_norm``."""
    norms = jnp.sqrt(
        sum(
            jnp.sum(g.reshape(g.shape[0], -1).astype(jnp.float32) ** 2, axis=1)
            for g in jax.tree.leaves(domain_grads)
        )
    )
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norms, 1e-12))
    return jax.tree.map(
        lambda g: g * scale.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), domain_grads
    )


def flatten_selected(domain_grads, param_filter=None) -> jax.Array:
    """``[k, P]``: each domain's gradient over the selected leaves (all when no filter)."""
    leaves = jax.tree.leaves(domain_grads)
    if param_filter is not None:
        mask = jax.tree.leaves(param_filter)
        if len(mask) != len(leaves):
            raise ValueError(f"param_filter has {len(mask)} leaves, the gradients {len(leaves)}")
        leaves = [g for g, keep in zip(leaves, mask, strict=True) if keep]
        if not leaves:
            raise ValueError("param_filter selects no parameters")
    return jnp.concatenate([g.reshape(g.shape[0], -1).astype(jnp.float32) for g in leaves], 1)


def doge(
    *,
    num_domains: int,
    mu: float,
    lr_schedule: optax.ScalarOrSchedule,
    score_clip: tuple[float, float] = (0.0, 5.0),
    objective: str = "universal",
    param_filter=None,
    smoothing: float = 0.0,
    grad_clip: float | None = None,
    initial_weights=None,
) -> Mixer:
    """The DoGE mixer (module doc). ``lr_schedule``: the proxy's learning rate (a float or an
    optax schedule of the update count), which scales the scores as in the authors' code."""
    if objective not in OBJECTIVES:
        raise ValueError(f"doge: objective must be one of {OBJECTIVES}, got {objective!r}")
    if not mu > 0:
        raise ValueError(f"doge: mu must be > 0, got {mu}")
    if not 0 <= smoothing < 1:
        raise ValueError(f"doge: smoothing must be in [0, 1), got {smoothing}")
    lo, hi = score_clip
    if not lo <= hi:
        raise ValueError(f"doge: score_clip must be (lo, hi) with lo <= hi, got {score_clip}")
    start = check_initial_weights(initial_weights, num_domains)
    schedule = lr_schedule if callable(lr_schedule) else (lambda _: lr_schedule)

    def init() -> DoGEState:
        return DoGEState(
            jnp.log(jnp.asarray(start, jnp.float32)),
            jnp.zeros(num_domains, jnp.float32),
            jnp.zeros((), jnp.int32),
        )

    def update(observation: Observation, state: DoGEState):
        domain_grads = required("doge", observation, "domain_grads")
        target_grads = observation.target_grads
        leading = {g.shape[0] for g in jax.tree.leaves(domain_grads)}
        if leading != {num_domains}:
            raise ValueError(
                f"doge: domain_grads must have a leading axis of num_domains="
                f"{num_domains} on every leaf, got {sorted(leading)}"
            )
        if (objective == "ood") != (target_grads is not None):
            raise ValueError(
                f"doge: objective {objective!r} "
                + ("needs" if objective == "ood" else "takes no")
                + " target_grads in its observation"
            )
        domain_grads = prepare(domain_grads)  # a no-op on already prepared gradients
        if target_grads is not None:
            target_grads = prepare(target_grads)
        flat = flatten_selected(domain_grads, param_filter)
        lr = jnp.asarray(schedule(state.step), jnp.float32)
        if objective == "universal":
            gram = flat @ flat.T
            scores = jnp.sum(gram, axis=1) - jnp.diagonal(gram)
        else:
            scores = jnp.sum(flat @ flatten_selected(target_grads, param_filter).T, axis=1)
        # The mean gradient norm over the domains present in the batch (an absent domain has a
        # zero gradient and would otherwise inflate every score).
        norms = jnp.linalg.norm(flat, axis=1)
        mean_norm = jnp.sum(norms) / jnp.maximum(jnp.sum(norms > 0), 1)
        scores = jnp.clip(lr * scores / (mean_norm + 1e-6), lr * lo, lr * hi)
        weights, log_weights = mirror_step(state.log_weights, scores / mu, smoothing)
        return weights, DoGEState(log_weights, state.weight_sum + weights, state.step + 1)

    def prepare(domain_grads):
        return domain_grads if grad_clip is None else clip_per_domain(domain_grads, grad_clip)

    # Clipping needs every leaf's norm; without it only the scored leaves are read.
    if grad_clip is None:
        return Mixer(init, update, _identity, reads=param_filter)
    return Mixer(init, update, prepare)


def mirror_step(log_weights, step, smoothing: float):
    """``(weights, log weights)`` after ``log a + step``, normalised and smoothed towards uniform.
    The log weights are kept in log space (``log_softmax``), so a weight that underflows to 0 in
    float32 can still recover."""
    log_new = jax.nn.log_softmax(log_weights + step)
    weights = jnp.exp(log_new)
    if smoothing:
        weights = (1.0 - smoothing) * weights + smoothing / weights.shape[0]
        log_new = jnp.log(weights)  # >= log(smoothing / k): finite
    return weights, log_new


def domain_gradients(domain_losses: Callable[[Any], Any], params, *, has_aux: bool = False):
    """``(losses [k], grads)`` where ``grads`` has a leading axis of ``k`` on every leaf:
    ``grads[i] = d losses[i] / d params``, from one forward pass and ``k`` backward passes
    batched by ``vmap`` over one-hot cotangents (not a Python loop over domains). With
    ``has_aux``, ``domain_losses`` returns ``(losses, aux)`` and ``aux`` is returned third."""
    if has_aux:
        losses, vjp, aux = jax.vjp(domain_losses, params, has_aux=True)
    else:
        losses, vjp = jax.vjp(domain_losses, params)
    (grads,) = jax.vmap(vjp)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    return (losses, grads, aux) if has_aux else (losses, grads)


def row_domain_gradients(
    row_loss: Callable[[Any, Any], Any], params, rows, members, *, rows_per_pass: int = 0
):
    """``(grads, aux)`` with ``grads[i] = sum_r members[i, r] * d row_loss(params, row_r)[0] /
    d params`` (a leading axis of ``k`` on every leaf), for batches whose rows each belong to one
    domain and do not interact (a language model's sequences).

    ``row_loss(params, row) -> (loss, aux)`` sees one row (every leaf of ``rows`` has a leading
    row axis ``B``); ``members`` is ``[k, B]``. The per-row gradients come from ``vmap`` over
    rows of ``grad`` (per-example gradients): one forward and one backward pass over the batch,
    where :func:`domain_gradients` runs ``k`` backward passes over the whole batch, each mostly
    on other domains' rows whose cotangents are zero. ``rows_per_pass`` bounds the memory: that
    many rows' gradients at a time (a ``lax.scan`` over groups of rows summing into the ``k``
    domain gradients; the last group padded with rows of no domain), 0 for all ``B`` at once."""
    per_row = jax.vmap(jax.grad(row_loss, has_aux=True), in_axes=(None, 0))
    num_rows = members.shape[1]
    if rows_per_pass < 0:
        raise ValueError(f"rows_per_pass must be >= 0, got {rows_per_pass}")
    if rows_per_pass == 0 or rows_per_pass >= num_rows:
        grads, aux = per_row(params, rows)
        return jax.tree.map(lambda g: jnp.tensordot(members.astype(g.dtype), g, axes=1), grads), aux
    groups = -(-num_rows // rows_per_pass)
    pad = groups * rows_per_pass - num_rows

    def grouped(x):  # [B, ...] -> [groups, rows_per_pass, ...], padded by repeating row 0
        x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)]) if pad else x
        return x.reshape(groups, rows_per_pass, *x.shape[1:])

    weights = jnp.pad(members, ((0, 0), (0, pad))).reshape(-1, groups, rows_per_pass)

    def body(total, group):
        row_group, w = group
        grads, aux = per_row(params, row_group)
        total = jax.tree.map(
            lambda t, g: t + jnp.tensordot(w.astype(g.dtype), g, axes=1), total, grads
        )
        return total, aux

    zeros = jax.tree.map(
        lambda p: jnp.zeros((members.shape[0], *jnp.shape(p)), jnp.result_type(p)), params
    )
    grads, aux = jax.lax.scan(
        body, zeros, (jax.tree.map(grouped, rows), jnp.moveaxis(weights, 1, 0))
    )
    aux = jax.tree.map(lambda a: a.reshape(groups * rows_per_pass, *a.shape[2:])[:num_rows], aux)
    return grads, aux


def cancellation_ratios(grads, old_params, new_params):
    """Per parameter tensor ``||grad|| / ||W_t - W_{t-1}||``: the authors' pre-run statistic for
    parameter selection (summed over its steps; large when updates cancel out)."""
    return jax.tree.map(
        lambda g, a, b: jnp.linalg.norm(g) / jnp.maximum(jnp.linalg.norm(b - a), 1e-12),
        grads,
        old_params,
        new_params,
    )


def select_parameters(ratio_sums, count: int):
    """A pytree of bools keeping ``count`` tensors with the smallest summed ratio (``count > 0``,
    the code's ``cc_ns`` default 10) or the ``-count`` largest (``count < 0``)."""
    leaves, treedef = jax.tree.flatten(ratio_sums)
    if count == 0 or abs(count) > len(leaves):
        raise ValueError(
            f"select_parameters: count must be nonzero with |count| <= "
            f"{len(leaves)} tensors, got {count}"
        )
    order = np.argsort([float(v) for v in leaves], kind="stable")
    keep = set((order[:count] if count > 0 else order[count:]).tolist())
    return jax.tree.unflatten(treedef, [i in keep for i in range(len(leaves))])


def cancellation_prerun(
    loss_fn: Callable[[Any, Any], jax.Array],
    params,
    optimizer: optax.GradientTransformation,
    batches,
) -> Any:
    """The authors' selection pre-run: plain training on ``batches`` (``loss_fn(params, batch)``
    a scalar), summing each tensor's :func:`cancellation_ratios` ``||g_t|| / ||W_t - W_{t-1}||``
    (the gradient at ``W_t`` over the update that led to ``W_t``; the first step has no previous
    update and is skipped). Feed the result to :func:`select_parameters` for DoGE's
    ``param_filter``."""

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    opt_state = optimizer.init(params)
    sums = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
    previous = None
    for batch in batches:
        new, opt_state, grads = step(params, opt_state, batch)
        if previous is not None:
            sums = jax.tree.map(jnp.add, sums, cancellation_ratios(grads, previous, params))
        previous, params = params, new
    return sums


MIXERS.register("doge", doge)
