"""Seeded generators for classification tasks with a known answer (NumPy, float64).

Labels are ints in ``{0, 1}``; the signed label is ``2 y - 1``.

* ``max_margin_data``: linearly separable data whose hard-margin SVM solution is known by
  construction: direction ``w*`` (a random unit vector when ``rotate``) and margin ``margin``.
  Pairs of support points sit at signed distance ``margin`` with spread-out positions along a
  second axis, so any tilted separator loses margin; large clusters far from the boundary are
  offset along that second axis, so the class-mean direction disagrees with ``w*``.
* ``slab_data``: Shah et al. (2020)'s LMS-k data: one *simple* coordinate (linear) and one
  *complex* coordinate (``num_slabs`` alternating slabs), each predictive on its own, plus
  optional noise coordinates.
* ``two_moons``: the interleaved half circles.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class MarginData(NamedTuple):
    """``w_star`` is a unit vector; the hard-margin separator is ``w_star . x = 0`` (no bias)
    with geometric margin ``margin``."""

    x: np.ndarray
    y: np.ndarray
    w_star: np.ndarray
    margin: float


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix


def max_margin_data(
    num_pairs: int = 8,
    num_bulk: int = 200,
    *,
    dim: int = 2,
    margin: float = 1.0,
    spread: float = 4.0,
    offset: tuple[float, float] = (3.0, 6.0),
    noise: float = 0.5,
    rotate: bool = True,
    seed: int = 0,
) -> MarginData:
    """Separable data with a certified max margin (module doc).

    In the unrotated frame the class +1 support points are ``(margin, t)`` and the class -1 ones
    ``(-margin, -t)`` for ``t`` evenly spaced in ``[-spread, spread]``: any unit ``w`` tilted by
    ``theta`` from ``e1`` has margin at most ``margin cos(theta) - spread |sin(theta)|``, so ``e1``
    is the unique max-margin direction. The bulk points are ``+-offset`` plus Gaussian noise,
    resampled until their first coordinate clears ``margin`` by 10%. Coordinates beyond the
    second are noise; ``rotate`` applies a random rotation to all ``dim`` coordinates."""
    if dim < 2 or num_pairs < 2 or margin <= 0 or num_bulk < 0:
        raise ValueError(
            f"max_margin_data: need dim >= 2, num_pairs >= 2, margin > 0 and "
            f"num_bulk >= 0, got {dim}, {num_pairs}, {margin}, "
            f"{num_bulk}"
        )
    if offset[0] <= 1.1 * margin:
        raise ValueError(f"max_margin_data: offset[0] must exceed 1.1 * margin, got {offset}")
    rng = np.random.default_rng(seed)
    t = np.linspace(-spread, spread, num_pairs)
    support = np.concatenate(
        [
            np.stack([np.full(num_pairs, margin), t], 1),
            np.stack([np.full(num_pairs, -margin), -t], 1),
        ]
    )
    labels = [np.ones(num_pairs, int), np.zeros(num_pairs, int)]
    bulk = []
    for sign in (1.0, -1.0):
        points = np.empty((0, 2))
        while len(points) < num_bulk // 2:
            draw = sign * np.asarray(offset) + noise * rng.standard_normal((num_bulk, 2))
            points = np.concatenate([points, draw[sign * draw[:, 0] > 1.1 * margin]])
        bulk.append(points[: num_bulk // 2])
    x2 = np.concatenate([support, *bulk])
    y = np.concatenate([*labels, np.ones(num_bulk // 2, int), np.zeros(num_bulk // 2, int)])
    x = np.concatenate([x2, noise * rng.standard_normal((len(x2), dim - 2))], axis=1)
    w_star = np.eye(dim)[0]
    if rotate:
        rotation = _random_rotation(rng, dim)
        x, w_star = x @ rotation.T, rotation @ w_star
    order = rng.permutation(len(x))
    return MarginData(x[order], y[order], w_star, float(margin))


def slab_data(
    num_samples: int,
    *,
    num_slabs: int = 7,
    linear_margin: float = 0.1,
    slab_gap: float = 0.1,
    noise_dims: int = 0,
    seed: int = 0,
):
    """LMS-k data (Shah et al. 2020): returns ``(x [n, 2 + noise_dims], y [n])``.

    Coordinate 0 (simple): ``s U[linear_margin, 1]`` with ``s = 2 y - 1``. Coordinate 1 (complex):
    ``[-1, 1]`` cut into ``num_slabs`` slabs whose labels alternate starting with class 1 at the
    left; a sample of class ``y`` lands uniformly inside one of its slabs, leaving ``slab_gap`` (a
    fraction of the slab width) empty at each slab edge. Both coordinates separate the classes
    alone; the rest are ``U[-1, 1]`` noise."""
    if num_slabs < 2 or not 0 <= slab_gap < 0.5 or not 0 <= linear_margin < 1:
        raise ValueError(
            f"slab_data: need num_slabs >= 2, 0 <= slab_gap < 0.5 and "
            f"0 <= linear_margin < 1, got {num_slabs}, {slab_gap}, "
            f"{linear_margin}"
        )
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num_samples)
    sign = 2 * y - 1
    simple = sign * rng.uniform(linear_margin, 1.0, num_samples)
    width = 2.0 / num_slabs
    slab_labels = (np.arange(num_slabs) + 1) % 2  # slab 0 is class 1, slab 1 class 0, ...
    complex_ = np.empty(num_samples)
    for label in (0, 1):
        rows = np.flatnonzero(y == label)
        slabs = rng.choice(np.flatnonzero(slab_labels == label), len(rows))
        inside = rng.uniform(slab_gap, 1.0 - slab_gap, len(rows))
        complex_[rows] = -1.0 + width * (slabs + inside)
    x = np.concatenate(
        [np.stack([simple, complex_], 1), rng.uniform(-1.0, 1.0, (num_samples, noise_dims))], axis=1
    )
    return x, y


def slab_label(coordinate, num_slabs: int = 7):
    """The class a complex-coordinate value belongs to under ``slab_data``'s slab layout."""
    slab = np.clip(np.floor((np.asarray(coordinate) + 1.0) * num_slabs / 2.0), 0, num_slabs - 1)
    return ((slab.astype(int) + 1) % 2).astype(int)


def two_moons(num_samples: int, *, noise: float = 0.1, seed: int = 0):
    """Two interleaved half circles with Gaussian noise: ``(x [n, 2], y [n])``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, num_samples)
    angle = rng.uniform(0.0, np.pi, num_samples)
    upper = np.stack([np.cos(angle), np.sin(angle)], 1)
    lower = np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], 1)
    x = np.where(y[:, None] == 0, upper, lower) + noise * rng.standard_normal((num_samples, 2))
    return x, y


DOMAIN_ROLES = ("related", "related", "noise", "unrelated", "duplicate")


class DomainTask(NamedTuple):
    """Classification domains ``y ~ softmax(x W_i)`` with known roles relative to a target.

    ``roles[i]`` is the role of domain ``i`` (a seeded permutation of ``DOMAIN_ROLES``);
    ``matrices[i]`` is ``None`` for the noise domain (uniform labels)."""

    matrices: tuple
    target: np.ndarray
    roles: tuple[str, ...]
    num_classes: int


def related_domains(
    *,
    dim: int = 32,
    num_classes: int = 8,
    relatedness: float = 0.2,
    duplicate: float = 0.02,
    scale: float = 3.0,
    seed: int = 0,
) -> DomainTask:
    """Five domains and a target (DoGE brief section 1.9): two *related* domains and the target
    are ``W_shared + relatedness U``, a *duplicate* is one related domain plus ``duplicate U``,
    *unrelated* has an independent ``W``, *noise* has uniform labels. Which index plays which
    role is a seeded random permutation, so nothing downstream can hard-code it."""
    rng = np.random.default_rng(seed)

    def matrix():
        return rng.standard_normal((dim, num_classes)) * scale / np.sqrt(dim)

    shared = matrix()
    related = [shared + relatedness * matrix() for _ in range(2)]
    target = shared + relatedness * matrix()
    by_role = {
        "related": related,
        "duplicate": related[0] + duplicate * matrix(),
        "unrelated": matrix(),
        "noise": None,
    }
    roles = tuple(DOMAIN_ROLES[i] for i in rng.permutation(len(DOMAIN_ROLES)))
    matrices, used = [], 0
    for role in roles:
        if role == "related":
            matrices.append(by_role["related"][used])
            used += 1
        else:
            matrices.append(by_role[role])
    return DomainTask(tuple(matrices), target, roles, num_classes)


def sample_domain(task: DomainTask, domain: int | str, num_samples: int, rng: np.random.Generator):
    """``(x [n, dim] float32, y [n] int)`` from domain ``domain`` (an index, or ``"target"``)."""
    matrix = task.target if domain == "target" else task.matrices[domain]
    dim = task.target.shape[0]
    x = rng.standard_normal((num_samples, dim))
    if matrix is None:
        y = rng.integers(0, task.num_classes, num_samples)
    else:
        logits = x @ matrix
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        y = (p.cumsum(1) > rng.uniform(size=(num_samples, 1))).argmax(1)
    return x.astype(np.float32), y
