"""Training classifiers with perturbations as a batch transform.

A *transform* maps ``(params, batch, rng) -> batch`` and adds ``batch["x_perturbed"]``; the train
step applies it inside the jitted step, on the current parameters, then takes the loss of the
chosen ``mode``:

* ``"clean"``: ``CE(f(x), y)`` (ERM; the transform is ignored);
* ``"perturbed"``: ``CE(f(x + delta), y)``: perturbed points replace clean ones (UDP-PGD, Madry's
  PGD-AT);
* ``"clean+perturbed"``: ``CE(f(x), y) + weight CE(f(x + delta), y)`` (UDPR);
* ``"trades"``: ``CE(f(x), y) + weight KL(p(x) || p(x + delta))`` (TRADES: the gradient flows
  through both distributions);
* ``"vat"``: the same with ``p(x)`` held constant (virtual adversarial training).

Batches are dicts with ``x`` (inputs) and ``y`` (int labels). The transforms built by
``perturbation`` pass labels only to PGD; UDP, TRADES and VAT never see them.

Training follows jaxlab's one step convention (:mod:`jaxlab.objectives`): what a step minimises
is :func:`classifier_objective`, and the step is :func:`jaxlab.objectives.make_train_step` over a
``TrainState``, jitted by its caller (:func:`train` does). The objective's own state is the chain
of perturbation keys: step ``t`` splits it into the next chain key and the key of its transform
(from ``PRNGKey(seed)``), so training is the same function of the seed as before the shared step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.objectives import Objective, init_train_state, make_train_step
from jaxlab.registry import Registry
from jaxlab.robust.pgd import pgd_perturb, trades_perturb, vat_perturb
from jaxlab.robust.udp import udp_perturb

Transform = Callable[[Any, dict, jax.Array], dict]
# ``(apply_fn, params, batch, rng, **kwargs) -> perturbed inputs``
Perturb = Callable[..., jax.Array]
# ``(apply_fn, params, batch, weight) -> scalar loss``
ModeLoss = Callable[[Callable, Any, dict, float], jax.Array]

PERTURBATIONS: Registry[Perturb] = Registry("perturbation", field="perturbation: method")
MODES: Registry[ModeLoss] = Registry("training mode", field="mode")


def _udp(apply_fn, params, batch, rng, **kwargs):
    return udp_perturb(apply_fn, params, batch["x"], rng, **kwargs)


def _pgd(apply_fn, params, batch, rng, **kwargs):  # the only one that reads the labels
    return pgd_perturb(apply_fn, params, batch["x"], batch["y"], rng, **kwargs)


def _trades(apply_fn, params, batch, rng, **kwargs):
    return trades_perturb(apply_fn, params, batch["x"], rng, **kwargs)


def _vat(apply_fn, params, batch, rng, **kwargs):
    return vat_perturb(apply_fn, params, batch["x"], rng, **kwargs)


PERTURBATIONS.register("udp", _udp)
PERTURBATIONS.register("pgd", _pgd)
PERTURBATIONS.register("trades", _trades)
PERTURBATIONS.register("vat", _vat)


def perturbation(method: str, apply_fn: Callable, **kwargs) -> Transform:
    """The batch transform for ``method`` (``udp``, ``pgd``, ``trades`` or ``vat``, see
    :data:`PERTURBATIONS`) with the keyword arguments of its ``*_perturb`` function (epsilon,
    step_size, num_steps, norm, ...)."""
    perturb = PERTURBATIONS.get(method)

    def transform(params, batch, rng):
        return batch | {"x_perturbed": perturb(apply_fn, params, batch, rng, **kwargs)}

    return transform


def _cross_entropy(logits, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _clean(apply_fn, params, batch, weight):
    del weight
    return _cross_entropy(apply_fn(params, batch["x"]), batch["y"])


def _perturbed(apply_fn, params, batch, weight):
    del weight
    return _cross_entropy(apply_fn(params, batch["x_perturbed"]), batch["y"])


def _clean_plus_perturbed(apply_fn, params, batch, weight):
    perturbed = apply_fn(params, batch["x_perturbed"])
    clean = apply_fn(params, batch["x"])
    return _cross_entropy(clean, batch["y"]) + weight * _cross_entropy(perturbed, batch["y"])


def _kl_regularized(*, hold_clean: bool) -> ModeLoss:
    """``CE(f(x), y) + weight KL(p(x) || p(x + delta))``; ``hold_clean``: ``p(x)`` constant."""

    def loss(apply_fn, params, batch, weight):
        perturbed = apply_fn(params, batch["x_perturbed"])
        clean = apply_fn(params, batch["x"])
        log_p, log_q = jax.nn.log_softmax(clean), jax.nn.log_softmax(perturbed)
        if hold_clean:
            log_p = jax.lax.stop_gradient(log_p)
        return _cross_entropy(clean, batch["y"]) + weight * jnp.mean(
            jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
        )

    return loss


MODES.register("clean", _clean)
MODES.register("perturbed", _perturbed)
MODES.register("clean+perturbed", _clean_plus_perturbed)
MODES.register("trades", _kl_regularized(hold_clean=False))
MODES.register("vat", _kl_regularized(hold_clean=True))


def classification_loss(apply_fn: Callable, params, batch: dict, mode: str, weight: float = 1.0):
    """The loss of ``mode`` (see :data:`MODES`) on a batch (``x_perturbed`` needed except for
    ``clean``)."""
    return MODES.get(mode)(apply_fn, params, batch, weight)


def classifier_objective(
    apply_fn: Callable,
    *,
    transform: Transform | None = None,
    mode: str = "clean",
    weight: float = 1.0,
    seed: int = 0,
) -> Objective:
    """The loss of ``mode`` (see :data:`MODES`) on batches ``{x, y}`` moved by ``transform`` on
    the current parameters (not differentiated through), as an objective for
    :func:`jaxlab.objectives.make_train_step`. Its state is the key chain (module doc), starting
    at ``PRNGKey(seed)``; metrics: ``loss``."""
    loss_of_mode = MODES.get(mode)
    if (mode == "clean") != (transform is None):
        raise ValueError(
            f"classifier_objective: mode {mode!r} "
            + ("takes no transform" if mode == "clean" else "needs a transform")
        )

    def init():
        return jax.random.PRNGKey(seed)

    def gradients(params, batch, frozen, chain, rng):
        del frozen, rng  # the transform's keys come from the chain (module doc)
        chain, step_key = jax.random.split(chain)
        if transform is not None:
            batch = transform(params, batch, step_key)
        loss, grads = jax.value_and_grad(lambda p: loss_of_mode(apply_fn, p, batch, weight))(params)
        return grads, chain, {"loss": loss}

    return Objective(gradients, init=init, model_inputs=("x", "y"))


class TrainResult(NamedTuple):
    params: Any
    losses: np.ndarray  # [steps]
    history: list  # (step, callback(params)) every ``log_every`` steps


def batches(x, y, batch_size: int | None, seed: int) -> Iterator[dict]:
    """Endless shuffled minibatches (the full batch, unshuffled, when ``batch_size`` is None)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if batch_size is not None and not 1 <= batch_size <= len(x):
        raise ValueError(
            f"batches: batch_size must be in [1, {len(x)}] (the data size), got {batch_size}"
        )
    if batch_size is None:
        while True:
            yield {"x": x, "y": y}
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(x))
        for start in range(0, len(x) - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {"x": x[rows], "y": y[rows]}


def train(
    objective: Objective,
    params,
    optimizer: optax.GradientTransformation,
    data: Iterator[dict],
    *,
    num_steps: int,
    log_every: int = 0,
    callback: Callable[[Any], Any] | None = None,
    progress: str = "",
) -> TrainResult:
    """Runs the jitted shared step on ``objective`` (e.g. :func:`classifier_objective`) for
    ``num_steps`` batches of ``data``; records ``callback(params)`` every ``log_every`` steps
    (and at the end) and prints progress lines when ``progress`` names the run."""
    step = jax.jit(make_train_step(None, optimizer, objective=objective))
    state = init_train_state(params, optimizer, objective.init())
    losses, history = [], []
    for k in range(num_steps):
        state, metrics = step(state, next(data))
        losses.append(metrics["loss"])
        if callback is not None and log_every and (k + 1) % log_every == 0:
            history.append((k + 1, callback(state.params)))
        if progress and log_every and (k + 1) % log_every == 0:
            print(
                f"{progress}: step {k + 1}/{num_steps} loss {float(metrics['loss']):.4f}",
                flush=True,
            )
    if callback is not None and (not history or history[-1][0] != num_steps):
        history.append((num_steps, callback(state.params)))
    return TrainResult(state.params, np.asarray(jax.device_get(losses)), history)
