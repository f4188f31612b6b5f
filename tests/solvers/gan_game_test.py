"""The constrained GAN game: its operator against finite differences of each player's loss, the
mixture metrics on known samples, and PI-ACVI against projected GDA on a small instance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab import solvers as S
from jaxlab.solvers import gan_game as GG


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def small_game(**kw):
    data, centers = GG.mixture_of_gaussians(2048, seed=3)
    kw = {"hidden": (8,), "num_constraints": 20, "sample_size": 128, "seed": 1} | kw
    return GG.gan_game(data, **kw), centers


def test_operator_is_each_players_own_gradient():
    game, _ = small_game()
    x = game.x0 + 0.1 * jnp.asarray(np.random.default_rng(0).standard_normal(game.problem.dim))
    f = np.asarray(game.problem.operator(x))
    rng = np.random.default_rng(1)
    h = 1e-6
    for i in rng.choice(game.problem.dim, 12, replace=False):
        player = 0 if i < game.generator_size else 1  # generator coordinates, then discriminator
        e = jnp.zeros(game.problem.dim).at[i].set(h)
        fd = (game.losses(x + e)[player] - game.losses(x - e)[player]) / (2 * h)
        np.testing.assert_allclose(f[i], float(fd), rtol=1e-5, atol=1e-8)


def test_constraints_hold_at_the_start_and_bad_arguments_are_named():
    game, _ = small_game()
    assert bool(game.problem.inequality.interior(game.x0))
    G, h = game.problem.inequality.G, game.problem.inequality.h
    slack = h - G @ np.asarray(game.x0)
    assert np.all((slack >= 3.0) & (slack <= 10.0))  # r_i ~ U[3, 10] around x0
    with pytest.raises(ValueError, match="data must be"):
        GG.gan_game(np.zeros(5))
    with pytest.raises(ValueError, match="radius_range"):
        GG.gan_game(np.zeros((5, 2)), radius_range=(4.0, 1.0))


def test_mixture_metrics_on_known_samples():
    samples, centers = GG.mixture_of_gaussians(4000, seed=0)
    covered, quality = GG.mode_metrics(samples, centers, 0.05)
    assert covered == 8 and quality > 0.98  # 3 std holds 98.9% of a 2-D Gaussian
    collapsed = centers[2] + 0.01 * np.random.default_rng(0).standard_normal((500, 2))
    assert GG.mode_metrics(collapsed, centers, 0.05) == (1, 1.0)
    other = GG.mixture_of_gaussians(4000, seed=1)[0]
    a, b = jnp.asarray(samples[:1000]), jnp.asarray(other[:1000])
    assert float(GG.mmd(a, a)) == pytest.approx(0.0, abs=1e-12)
    assert float(GG.mmd(a, b)) < 0.02 < float(GG.mmd(a, jnp.asarray(collapsed)))
    # The biased MMD^2 equals the float64 NumPy double sum.
    u, v = samples[:50], collapsed[:40]

    def gaussian_kernels(p, q):
        """The sum of Gaussian kernels of bandwidths 0.05, 0.2 and 1 between rows of p and q."""
        return sum(
            np.exp(-np.sum((p[:, None] - q[None]) ** 2, -1) / (2 * s * s)) for s in (0.05, 0.2, 1.0)
        )

    expected = (
        gaussian_kernels(u, u).mean()
        + gaussian_kernels(v, v).mean()
        - 2 * gaussian_kernels(u, v).mean()
    )
    assert float(GG.mmd(jnp.asarray(u), jnp.asarray(v))) == pytest.approx(expected, rel=1e-10)


def test_pi_acvi_learns_the_mixture_and_stays_feasible():
    game, centers = small_game(radius_range=(0.5, 2.0))  # tight enough to bind
    problem = game.problem
    z = jax.random.normal(jax.random.PRNGKey(0), (1000, game.noise_dim))
    target = jnp.asarray(GG.mixture_of_gaussians(1000, seed=9)[0])

    def score(x):
        return float(GG.mmd(game.generate(x, z), target))

    config = S.ACVIConfig(
        beta=0.5,
        outer_steps=1,
        last_inner_steps=120,
        x_step="inexact",
        y_step="projection",
        subproblem_steps=5,
        subproblem_optimizer=optax.adam(3e-3, b1=0.05),
    )
    trajectory = S.acvi(problem, game.x0, config)
    assert int(trajectory.evaluations[-1]) == 600
    assert score(trajectory.y[-1]) < 0.5 * score(game.x0)
    assert float(GG.constraint_violation(problem, trajectory.y[-1])) < 1e-8
    G, h = problem.inequality.G, problem.inequality.h
    assert np.sum(G @ np.asarray(trajectory.y[-1]) > h - 1e-6) >= 1  # some constraint is active
    assert float(jnp.linalg.norm(trajectory.x[-1] - trajectory.y[-1])) < 0.05
