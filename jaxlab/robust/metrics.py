"""Margins, the certified max margin, and accuracy metrics for robustness experiments.

Labels are ints; for binary problems the signed label is ``s = 2 y - 1`` and a two-logit linear
classifier ``x W + b`` is the linear function ``w . x + c`` with ``w = W[:, 1] - W[:, 0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.robust.pgd import pgd_perturb
from jaxlab.solvers.problems import project_simplex


def binary_linear(params) -> tuple[np.ndarray, float]:
    """``(w, c)`` of a two-class ``LinearClassifier``'s parameters (``functional`` form)."""
    kernel, bias = np.asarray(params["linear"]["kernel"]), np.asarray(params["linear"]["bias"])
    if kernel.shape[1] != 2:
        raise ValueError(f"binary_linear: expected 2 classes, got kernel shape {kernel.shape}")
    return kernel[:, 1] - kernel[:, 0], float(bias[1] - bias[0])


def linear_margin(w, c, x, y) -> float:
    """Geometric margin ``min_i s_i (w . x_i + c) / ||w||`` (negative when a point is
    misclassified)."""
    w, x, s = np.asarray(w, np.float64), np.asarray(x, np.float64), 2 * np.asarray(y) - 1
    return float(np.min(s * (x @ w + c)) / np.linalg.norm(w))


class MaxMargin(NamedTuple):
    """The hard-margin SVM: unit ``w``, bias ``c``, margin, and the certified bound ``gap``:
    the true max margin lies in ``[margin, margin + gap]``."""

    w: np.ndarray
    c: float
    margin: float
    gap: float


def hard_margin_svm(x, y, *, tol: float = 1e-9, max_iterations: int = 200_000) -> MaxMargin:
    """The max-margin separator of separable data, as half the distance between the classes'
    convex hulls: ``min ||X1^T p - X0^T q||`` over two probability simplices, by accelerated
    projected gradient (``jaxlab.solvers.problems.project_simplex``) in float64. Stops when the
    margin of the current direction is within ``tol`` of the dual bound
    ``||X1^T p - X0^T q|| / 2``."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    pos, neg = x[y == 1], x[y == 0]
    if not len(pos) or not len(neg):
        raise ValueError("hard_margin_svm: need samples of both classes 0 and 1")
    stacked = np.concatenate([pos, -neg])
    with jax.enable_x64(True):
        u = np.asarray(
            _hull_distance(
                jnp.asarray(stacked), len(pos), max_iterations, np.linalg.norm(stacked, 2) ** 2, tol
            )
        )
    w = stacked.T @ u
    norm = np.linalg.norm(w)
    if norm == 0:
        raise ValueError("hard_margin_svm: the classes' convex hulls intersect")
    low, high = np.min(pos @ w), np.max(neg @ w)
    margin = (low - high) / (2 * norm)
    if margin <= 0:
        raise ValueError(f"hard_margin_svm: data not linearly separable (margin {margin:g})")
    return MaxMargin(
        w / norm, float(-(low + high) / (2 * norm)), float(margin), float(norm / 2 - margin)
    )


@jax.jit(static_argnums=(1, 2))
def _hull_distance(stacked, split, max_iterations, lipschitz, tol):
    """FISTA on ``1/2 ||stacked^T u||^2`` over the product of two simplices (rows ``:split`` and
    ``split:``), until the duality gap is below ``tol``; returns ``u``."""

    def project(z):
        return jnp.concatenate([project_simplex(z[:split]), project_simplex(z[split:])])

    def gap(u):
        w = stacked.T @ u
        norm = jnp.linalg.norm(w)
        margin = (jnp.min(stacked[:split] @ w) + jnp.min(stacked[split:] @ w)) / (2 * norm)
        return norm / 2 - margin  # rows split: are -x, so min(-x . w) = -max(x . w)

    def unfinished(carry):
        u, _, _, k = carry
        return (k < max_iterations) & ~(gap(u) < tol)

    def step(carry):
        u, v, t, k = carry
        u_next = project(v - stacked @ (stacked.T @ v) / lipschitz)
        t_next = 0.5 * (1 + jnp.sqrt(1 + 4 * t * t))
        return u_next, u_next + (t - 1) / t_next * (u_next - u), t_next, k + 1

    n = stacked.shape[0]
    start = jnp.concatenate([jnp.full(split, 1.0 / split), jnp.full(n - split, 1.0 / (n - split))])
    u, _, _, _ = jax.lax.while_loop(unfinished, step, (start, start, jnp.float64(1.0), 0))
    return u


def accuracy(apply_fn: Callable, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(apply_fn(params, jnp.asarray(x)), -1) == jnp.asarray(y)))


def robust_accuracy(
    apply_fn: Callable,
    params,
    x,
    y,
    rng,
    *,
    epsilons: Sequence[float],
    norm: str = "linf",
    num_steps: int = 20,
    clip: tuple[float, float] | None = None,
) -> dict[float, float]:
    """Accuracy under a PGD attack (random start, ``num_steps`` steps of ``2.5 epsilon /
    num_steps``) at each epsilon."""
    out = {}
    for epsilon in epsilons:
        if epsilon == 0:
            out[epsilon] = accuracy(apply_fn, params, x, y)
            continue
        adv = pgd_perturb(
            apply_fn,
            params,
            jnp.asarray(x),
            jnp.asarray(y),
            rng,
            epsilon=epsilon,
            step_size=2.5 * epsilon / num_steps,
            num_steps=num_steps,
            norm=norm,
            clip=clip,
        )
        out[epsilon] = accuracy(apply_fn, params, adv, y)
    return out


def randomized_feature_accuracy(
    apply_fn: Callable, params, x, y, columns: Sequence[int], seed: int = 0
) -> float:
    """Accuracy after shuffling ``columns`` of ``x`` across samples (Shah et al.'s test of which
    features a model relies on: shuffling a relied-on feature drops accuracy to chance)."""
    x = np.array(x, copy=True)
    rng = np.random.default_rng(seed)
    x[:, list(columns)] = x[rng.permutation(len(x))][:, list(columns)]
    return accuracy(apply_fn, params, x, y)


def flip_fraction(apply_fn: Callable, params, x, x_perturbed) -> float:
    """Fraction of samples whose predicted class changes under the perturbation."""
    clean = jnp.argmax(apply_fn(params, jnp.asarray(x)), -1)
    moved = jnp.argmax(apply_fn(params, jnp.asarray(x_perturbed)), -1)
    return float(jnp.mean(clean != moved))
