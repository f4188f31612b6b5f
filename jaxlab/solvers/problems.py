"""Constrained variational inequalities and the built-in games.

A VI asks for ``x* in K`` with ``<F(x*), x - x*> >= 0`` for all ``x in K``, where
``K = {x : E x = e, x in S}`` and ``S`` is one of:

* ``Nonnegative()``: ``x >= 0``;
* ``Box(lo, hi)``: ``lo <= x <= hi``;
* ``Ball(radius)``: ``||x|| <= radius``.

Each set knows its Euclidean projection, its log barrier and the barrier's proximal step (closed
form or a vectorised 1-D root), which is all ACVI and the projected baselines need. A problem may
add the equality constraints ``E x = e`` (full row rank, checked); projections onto ``{E x = e}
intersected with S`` exist in closed form for the product-of-simplices case (``simplex_blocks``)
and are computed by sort-based projection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Nonnegative:
    """``x >= 0``."""

    def project(self, x):
        return jnp.maximum(x, 0.0)

    def interior(self, x):
        return jnp.all(x > 0)

    def barrier_prox(self, c, mu, beta):
        """argmin_y -mu sum log(y) + beta/2 ||y - c||^2, per coordinate in closed form."""
        return 0.5 * (c + jnp.sqrt(c * c + 4.0 * mu / beta))


@dataclasses.dataclass(frozen=True)
class Box:
    """``lo <= x <= hi`` (scalars or arrays)."""

    lo: float | np.ndarray
    hi: float | np.ndarray

    def project(self, x):
        return jnp.clip(x, self.lo, self.hi)

    def interior(self, x):
        return jnp.all((x > self.lo) & (x < self.hi))

    def barrier_prox(self, c, mu, beta):
        """argmin_y -mu sum [log(y - lo) + log(hi - y)] + beta/2 ||y - c||^2: the stationarity
        condition is monotone in each coordinate on (lo, hi), so bisection finds it."""
        lo = jnp.broadcast_to(jnp.asarray(self.lo, c.dtype), c.shape)
        hi = jnp.broadcast_to(jnp.asarray(self.hi, c.dtype), c.shape)

        def grad(y):
            return -mu / (y - lo) + mu / (hi - y) + beta * (y - c)

        def step(_, bounds):
            a, b = bounds
            m = 0.5 * (a + b)
            up = grad(m) < 0
            return jnp.where(up, m, a), jnp.where(up, b, m)

        a, b = jax.lax.fori_loop(0, 60, step, (lo, hi))
        return 0.5 * (a + b)


@dataclasses.dataclass(frozen=True)
class Ball:
    """``||x|| <= radius``."""

    radius: float

    def project(self, x):
        norm = jnp.linalg.norm(x)
        return jnp.where(norm > self.radius, x * (self.radius / jnp.maximum(norm, 1e-30)), x)

    def interior(self, x):
        return jnp.sum(x * x) < self.radius**2

    def barrier_prox(self, c, mu, beta):
        """argmin_y -mu log(r^2 - ||y||^2) + beta/2 ||y - c||^2. The minimiser is ``s c`` with
        ``s = beta / (beta + 2 mu / (r^2 - s^2 ||c||^2))``; bisection on s in (0, min(1, r/|c|))."""
        norm = jnp.linalg.norm(c)
        r2 = self.radius**2

        def residual(s):
            return s * (beta + 2 * mu / (r2 - (s * norm) ** 2)) - beta

        def step(_, bounds):
            a, b = bounds
            m = 0.5 * (a + b)
            low = residual(m) < 0
            return jnp.where(low, m, a), jnp.where(low, b, m)

        top = jnp.minimum(1.0, self.radius / jnp.maximum(norm, 1e-30))
        a, b = jax.lax.fori_loop(0, 80, step, (jnp.zeros_like(norm), top))
        return 0.5 * (a + b) * c


@dataclasses.dataclass(frozen=True, eq=False)
class Polyhedron:
    """``G x <= h`` (``G: [m, dim]``). The barrier prox runs damped Newton steps from a strictly
    feasible start (the previous y), keeping a fraction of the distance to the boundary; the
    projection runs Dykstra's algorithm over the half-spaces."""

    G: np.ndarray
    h: np.ndarray
    newton_steps: int = 30
    dykstra_steps: int = 500

    def __post_init__(self):
        G, h = np.asarray(self.G), np.asarray(self.h)
        if G.ndim != 2 or h.shape != (G.shape[0],):
            raise ValueError(
                f"Polyhedron: G must be [m, dim] and h [m], got shapes {G.shape} and {h.shape}"
            )

    def interior(self, x):
        return jnp.all(jnp.asarray(self.G, x.dtype) @ x < jnp.asarray(self.h, x.dtype))

    def project(self, x):
        G, h = jnp.asarray(self.G, x.dtype), jnp.asarray(self.h, x.dtype)
        norms = jnp.sum(G * G, axis=1)

        def half_space(i, carry):
            y, corrections = carry
            z = y + corrections[i]
            excess = jnp.maximum(G[i] @ z - h[i], 0.0) / norms[i]
            y_new = z - excess * G[i]
            return y_new, corrections.at[i].set(z - y_new)

        # Sweep until a whole sweep moves y by less than a few ulps (most sets with many
        # half-spaces have few active ones and stop after a handful), or dykstra_steps sweeps.
        tol = 16 * jnp.finfo(x.dtype).eps * (1.0 + jnp.max(jnp.abs(x)))

        def unfinished(carry):
            sweeps, moved, _ = carry
            return (sweeps < self.dykstra_steps) & (moved > tol)

        def sweep(carry):
            sweeps, _, (y, corrections) = carry
            new = jax.lax.fori_loop(0, G.shape[0], half_space, (y, corrections))
            return sweeps + 1, jnp.max(jnp.abs(new[0] - y)), new

        start = (0, jnp.asarray(jnp.inf, x.dtype), (x, jnp.zeros((G.shape[0],) + x.shape, x.dtype)))
        _, _, (y, _) = jax.lax.while_loop(unfinished, sweep, start)
        return y

    def barrier_prox(self, c, mu, beta, start=None):
        """argmin_y -mu sum log(h - G y) + beta/2 ||y - c||^2 by damped Newton from ``start``."""
        if start is None:
            raise ValueError("Polyhedron.barrier_prox needs a strictly feasible start")
        G, h = jnp.asarray(self.G, c.dtype), jnp.asarray(self.h, c.dtype)

        def newton(_, y):
            slack = h - G @ y
            grad = mu * G.T @ (1.0 / slack) + beta * (y - c)
            hess = mu * (G.T * (1.0 / slack**2)) @ G + beta * jnp.eye(c.shape[0], dtype=c.dtype)
            dy = -jnp.linalg.solve(hess, grad)
            rate = G @ dy
            limit = jnp.min(
                jnp.where(rate > 0, 0.99 * slack / jnp.where(rate > 0, rate, 1.0), jnp.inf)
            )
            return y + jnp.minimum(1.0, limit) * dy

        return jax.lax.fori_loop(0, self.newton_steps, newton, start)


@dataclasses.dataclass(frozen=True, eq=False)
class Inequalities:
    """General constraints ``phi(x) <= 0`` (``phi: [dim] -> [m]``, convex for the theory). The
    barrier prox runs damped Newton steps with autodiff derivatives from a strictly feasible start
    (the previous y), halving each step until every constraint stays strictly negative. There is
    no general projection: P-ACVI and the projected baselines need one of the other sets."""

    phi: Callable[[jax.Array], jax.Array]
    newton_steps: int = 30

    def interior(self, x):
        return jnp.all(self.phi(x) < 0)

    def project(self, x):
        raise NotImplementedError(
            "Inequalities(phi): no Euclidean projection onto a general set; "
            "use the barrier variants of ACVI"
        )

    def barrier_prox(self, c, mu, beta, start=None):
        """argmin_y -mu sum log(-phi(y)) + beta/2 ||y - c||^2 by damped Newton from ``start``."""
        if start is None:
            raise ValueError("Inequalities.barrier_prox needs a strictly feasible start")

        def objective(y):
            return -mu * jnp.sum(jnp.log(-self.phi(y))) + 0.5 * beta * jnp.sum((y - c) ** 2)

        def newton(_, y):
            g = jax.grad(objective)(y)
            dy = -jnp.linalg.solve(jax.hessian(objective)(y), g)

            def shrink(t):
                return t * 0.5

            def infeasible(t):
                return jnp.any(self.phi(y + t * dy) >= 0) & (t > 1e-12)

            t = jax.lax.while_loop(infeasible, shrink, jnp.ones((), y.dtype))
            return y + t * dy

        return jax.lax.fori_loop(0, self.newton_steps, newton, start)


Set = Nonnegative | Box | Ball | Polyhedron | Inequalities


@dataclasses.dataclass(frozen=True, eq=False)
class VIProblem:
    """A constrained VI.

    Attributes:
      operator: ``F(x) -> [dim]``; monotone for the convergence guarantees.
      dim: size of x.
      inequality: the simple set ``S``.
      equality: optional ``(E [m, dim], e [m])`` with full row rank.
      matrix: ``A`` when ``F(x) = A x + b`` (ACVI then solves its x-step exactly).
      offset: ``b`` for affine F.
      solution: a known solution (for the relative error), if any.
      simplex_blocks: block sizes when ``K`` is a product of probability simplices (enables the
        exact projection and the closed-form gap).
      name: for reports.
    """

    operator: Callable[[jax.Array], jax.Array]
    dim: int
    inequality: Set
    equality: tuple[np.ndarray, np.ndarray] | None = None
    matrix: np.ndarray | None = None
    offset: np.ndarray | None = None
    solution: np.ndarray | None = None
    simplex_blocks: tuple[int, ...] | None = None
    name: str = "vi"

    def __post_init__(self):
        if self.equality is not None:
            E, e = (np.asarray(v, np.float64) for v in self.equality)
            if E.ndim != 2 or E.shape[1] != self.dim or e.shape != (E.shape[0],):
                raise ValueError(
                    f"VIProblem.equality must be (E [m, {self.dim}], e [m]), got "
                    f"shapes {E.shape} and {e.shape}"
                )
            rank = np.linalg.matrix_rank(E)
            if rank < E.shape[0]:
                raise ValueError(
                    f"VIProblem.equality: E must have full row rank, got rank {rank} "
                    f"for {E.shape[0]} rows (dependent constraints)"
                )
        if self.simplex_blocks is not None and sum(self.simplex_blocks) != self.dim:
            raise ValueError(
                f"VIProblem.simplex_blocks {self.simplex_blocks} must sum to dim={self.dim}"
            )

    def project(self, x):
        """Euclidean projection onto ``K`` (exact for S alone or for products of simplices)."""
        if self.simplex_blocks is not None:
            parts, start = [], 0
            for size in self.simplex_blocks:
                parts.append(project_simplex(x[start : start + size]))
                start += size
            return jnp.concatenate(parts)
        if self.equality is not None:
            raise NotImplementedError(
                f"{self.name}: projection onto equality-constrained sets "
                "other than products of simplices"
            )
        return self.inequality.project(x)

    def relative_error(self, x):
        if self.solution is None:
            raise ValueError(f"{self.name}: no known solution")
        x_star = jnp.asarray(self.solution, x.dtype)
        return jnp.linalg.norm(x - x_star) / jnp.maximum(jnp.linalg.norm(x_star), 1e-30)

    def gap(self, x):
        """``max_{x' in K} <F(x), x - x'>``, closed form for simplex products, boxes and balls."""
        f = self.operator(x)
        if self.simplex_blocks is not None:
            mins, start = 0.0, 0
            for size in self.simplex_blocks:
                mins = mins + jnp.min(f[start : start + size])
                start += size
            return jnp.dot(f, x) - mins
        if isinstance(self.inequality, Box) and self.equality is None:
            lo, hi = self.inequality.lo, self.inequality.hi
            return jnp.dot(f, x) - jnp.sum(jnp.minimum(f * lo, f * hi))
        if isinstance(self.inequality, Ball) and self.equality is None:
            return jnp.dot(f, x) + self.inequality.radius * jnp.linalg.norm(f)
        raise NotImplementedError(f"{self.name}: no closed-form gap for this set")

    def equality_violation(self, x):
        if self.equality is None:
            return jnp.zeros((), x.dtype)
        E, e = (jnp.asarray(v, x.dtype) for v in self.equality)
        return jnp.linalg.norm(E @ x - e)


def project_simplex(v):
    """Euclidean projection onto ``{x >= 0, sum x = 1}`` by sorting (Held et al.; Duchi et al.)."""
    u = jnp.sort(v)[::-1]
    css = jnp.cumsum(u) - 1.0
    k = jnp.arange(1, v.shape[0] + 1, dtype=v.dtype)
    rho = jnp.max(jnp.where(u - css / k > 0, k, 0.0))
    theta = jnp.take(css, rho.astype(jnp.int32) - 1) / rho
    return jnp.maximum(v - theta, 0.0)


# ------------------------------------------------------------------------------ built-in games


def bilinear_2d():
    """F(x) = A x, A = [[0.1, 1], [-1, 0.1]], x >= 0; solution (0, 0); start (1, 1)."""
    A = np.array([[0.1, 1.0], [-1.0, 0.1]])
    return VIProblem(
        lambda x: jnp.asarray(A, x.dtype) @ x,
        2,
        Nonnegative(),
        matrix=A,
        offset=np.zeros(2),
        solution=np.zeros(2),
        name="bilinear_2d",
    )


def von_neumann_ratio_game():
    """The 2-D von Neumann ratio game of the authors' notebook: ``min_u max_v V(u, v)`` on
    ``[0, 1]^2`` with ``V = p^T R q / p^T S q``, ``p = (u, 1 - u)``, ``q = (v, 1 - v)``,
    ``R = [[-0.6, -0.3], [0.6, -0.3]]``, ``S = [[0.9, 0.5], [0.8, 0.4]]`` (Daskalakis et al.'s
    example), so ``V = (0.9 v - 1.2 u v - 0.3) / (0.1 u + 0.4 v + 0.4)``; ``F = (dV/du, -dV/dv)``.
    Not monotone. The solution is the interior stationary point (Newton on the closed-form
    derivatives in float64; the notebook prints (0.951941, 0.050485)). Start: (0.5, 0.5)."""
    R = np.array([[-0.6, -0.3], [0.6, -0.3]])
    S = np.array([[0.9, 0.5], [0.8, 0.4]])

    def value(u, v):
        p, q = jnp.stack([u, 1 - u]), jnp.stack([v, 1 - v])
        return (p @ jnp.asarray(R, u.dtype) @ q) / (p @ jnp.asarray(S, u.dtype) @ q)

    def operator(x):
        du, dv = jax.grad(value, argnums=(0, 1))(x[0], x[1])
        return jnp.stack([du, -dv])

    return VIProblem(
        operator,
        2,
        Box(0.0, 1.0),
        solution=np.array([0.95194102, 0.05048525]),
        name="von_neumann_ratio",
    )


def forsaken_game():
    """The "forsaken" game (Hsieh, Mertikopoulos, Cevher 2021) as in the authors' notebook:
    ``min_u max_v f = u (v - 0.45) + phi(u) - phi(v)``, ``phi(z) = z^2/4 - z^4/2 + z^6/6``, on the
    ball ``u^2 + v^2 <= 4``; ``F = (df/du, -df/dv)``. Not monotone; first-order methods are drawn
    to a limit cycle. The solution is the interior stationary point (float64 Newton; the notebook
    quotes (0.08, 0.4)). Start: (0.5, 0.5)."""

    def operator(x):
        u, v = x[0], x[1]
        return jnp.stack([u**5 - 2 * u**3 + 0.5 * u + v - 0.45, v**5 - 2 * v**3 + 0.5 * v - u])

    return VIProblem(
        operator, 2, Ball(2.0), solution=np.array([0.07802667, 0.41193385]), name="forsaken"
    )


def bilinear_simplex_game(dim: int = 100, eta: float = 0.05, dense_matrix: bool | None = None):
    """The high-dimensional bilinear game on two simplices of size ``dim`` (HBG):
    F(x) = A x with A = [[eta I, (1 - eta) I], [-(1 - eta) I, eta I]]; solution uniform.

    ``dense_matrix`` (default: ``dim <= 2048``) attaches the dense A for exact ACVI's linear
    solve; F itself is always matrix-free."""
    if dim < 2:
        raise ValueError(f"bilinear_simplex_game: dim must be >= 2, got {dim}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"bilinear_simplex_game: eta must be in [0, 1], got {eta}")
    if dense_matrix is None:
        dense_matrix = dim <= 2048
    A = None
    if dense_matrix:
        eye = np.eye(dim)
        A = np.block([[eta * eye, (1 - eta) * eye], [-(1 - eta) * eye, eta * eye]])
    E = np.zeros((2, 2 * dim))
    E[0, :dim] = 1.0
    E[1, dim:] = 1.0

    def operator(x):  # A x without a dense matmul
        x1, x2 = x[:dim], x[dim:]
        return jnp.concatenate([eta * x1 + (1 - eta) * x2, -(1 - eta) * x1 + eta * x2])

    return VIProblem(
        operator,
        2 * dim,
        Nonnegative(),
        equality=(E, np.ones(2)),
        matrix=A,
        offset=np.zeros(2 * dim),
        solution=np.full(2 * dim, 1.0 / dim),
        simplex_blocks=(dim, dim),
        name=f"bilinear_simplex_{dim}_eta{eta}",
    )


def matrix_game(M: np.ndarray):
    """min_p max_q p^T M q over two probability simplices: F(p, q) = (M q, -M^T p). Monotone but
    not strongly: projected GDA cycles. The solution is not computed here (use the gap)."""
    M = np.asarray(M, np.float64)
    m, n = M.shape
    A = np.block([[np.zeros((m, m)), M], [-M.T, np.zeros((n, n))]])
    E = np.zeros((2, m + n))
    E[0, :m] = 1.0
    E[1, m:] = 1.0

    def operator(x):
        Mx = jnp.asarray(M, x.dtype)
        return jnp.concatenate([Mx @ x[m:], -Mx.T @ x[:m]])

    return VIProblem(
        operator,
        m + n,
        Nonnegative(),
        equality=(E, np.ones(2)),
        matrix=A,
        offset=np.zeros(m + n),
        simplex_blocks=(m, n),
        name=f"matrix_game_{m}x{n}",
    )
