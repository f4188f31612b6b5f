"""Margins, the certified max margin, and accuracy metrics for robustness experiments.

Labels are ints; for binary problems the signed label is ``s = 2 y - 1`` and a two-logit linear
classifier ``x W + b`` is the linear function ``w . x + c`` with ``w = W[:, 1] - W[:, 0]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxlab.robust.pgd import pgd_perturb


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
    projected gradient (exact sort-based simplex projections) in float64. Stops when the margin
    of the current direction is within ``tol`` of the dual bound ``||X1^T p - X0^T q|| / 2``."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    pos, neg = x[y == 1], x[y == 0]
    if not len(pos) or not len(neg):
        raise ValueError("hard_margin_svm: need samples of both classes 0 and 1")
    stacked = np.concatenate([pos, -neg])
    lipschitz = np.linalg.norm(stacked, 2) ** 2
    u = np.concatenate([np.full(len(pos), 1 / len(pos)), np.full(len(neg), 1 / len(neg))])
    v, t = u.copy(), 1.0
    split = len(pos)

    def project(z):
        return np.concatenate([_simplex(z[:split]), _simplex(z[split:])])

    for iteration in range(max_iterations):
        diff = stacked.T @ v
        u_next = project(v - stacked @ diff / lipschitz)
        t_next = 0.5 * (1 + np.sqrt(1 + 4 * t * t))
        v = u_next + (t - 1) / t_next * (u_next - u)
        u, t = u_next, t_next
        if iteration % 100 == 0:
            w = stacked.T @ u
            norm = np.linalg.norm(w)
            if norm == 0:
                raise ValueError("hard_margin_svm: the classes' convex hulls intersect")
            low, high = np.min(pos @ w), np.max(neg @ w)
            margin = (low - high) / (2 * norm)
            if norm / 2 - margin < tol:
                break
    if margin <= 0:
        raise ValueError(f"hard_margin_svm: data not linearly separable (margin {margin:g})")
    return MaxMargin(w / norm, float(-(low + high) / (2 * norm)), float(margin),
                     float(norm / 2 - margin))  # fmt: skip


def _simplex(v):
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.flatnonzero(u - css / np.arange(1, len(v) + 1) > 0)[-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def accuracy(apply_fn: Callable, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(apply_fn(params, jnp.asarray(x)), -1) == jnp.asarray(y)))


def robust_accuracy(apply_fn: Callable, params, x, y, rng, *, epsilons: Sequence[float],
                    norm: str = "linf", num_steps: int = 20,
                    clip: tuple[float, float] | None = None) -> dict[float, float]:  # fmt: skip
    """Accuracy under a PGD attack (random start, ``num_steps`` steps of ``2.5 epsilon /
    num_steps``) at each epsilon."""
    out = {}
    for epsilon in epsilons:
        if epsilon == 0:
            out[epsilon] = accuracy(apply_fn, params, x, y)
            continue
        adv = pgd_perturb(apply_fn, params, jnp.asarray(x), jnp.asarray(y), rng, epsilon=epsilon,
                          step_size=2.5 * epsilon / num_steps, num_steps=num_steps, norm=norm,
                          clip=clip)  # fmt: skip
        out[epsilon] = accuracy(apply_fn, params, adv, y)
    return out


def randomized_feature_accuracy(apply_fn: Callable, params, x, y, columns: Sequence[int],
                                seed: int = 0) -> float:  # fmt: skip
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
