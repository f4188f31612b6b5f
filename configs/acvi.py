"""ACVI against projected baselines on the papers' games (experiments/acvi.py).

Usage:
  python -m experiments.acvi --workdir=runs/acvi [--config.dim=500]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # High-dimensional bilinear game on two simplices: size of each simplex, the eta sweep, and
    # random Dirichlet starts (one per seed).
    config.dim = 100
    config.etas = (0.01, 0.255, 0.5, 0.745, 0.99)
    config.seeds = (0, 1, 2)
    config.target = 0.02
    config.max_steps = 500
    # Baselines: the best step size of this grid per method and eta (reported).
    config.step_sizes = (0.05, 0.1, 0.2, 0.3, 0.5)
    # ACVI (the authors' HBG settings) and I-ACVI (gradient steps on the x-subproblem).
    config.acvi = ml_collections.ConfigDict(
        dict(beta=0.5, mu0=1e-6, delta=0.5, outer_steps=10, inner_steps=1)
    )
    config.inexact_steps = 5
    config.inexact_step_size = 0.3
    # Last-iterate rate on a random matrix game (pure bilinear, simplices) at fixed mu.
    config.rate_dim = 20
    config.rate_steps = 2000
    # Constrained GAN game: PI-ACVI (Adam on the x-subproblem, projection y-step) against projected
    # GDA / extragradient with Adam, at equal operator evaluations (the authors' Adam b1 0.05).
    config.gan = ml_collections.ConfigDict(
        dict(
            seeds=(0, 1, 2),
            evaluations=3000,
            every=100,
            learning_rate=1e-3,
            b1=0.05,
            beta=0.5,
            inner_steps=5,
            noise_dim=2,
            hidden=(32, 32),
            num_constraints=100,
            sample_size=512,
            modes=8,
            std=0.05,
            mnist_path="",
        )
    )
    return config
