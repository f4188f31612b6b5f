"""UDP against ERM and PGD training (experiments/udp.py).

Usage:
  python -m experiments.udp --workdir=runs/udp [--config.margin.steps=20000]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # (a) Linear model on separable data with a certified max margin (gamma* = 1): full-batch
    # gradient descent on the logistic loss from w = 0; PGD and UDP at eps = factor * gamma*,
    # l2 ball, num_steps steps of eps / num_steps (the authors' iterations = eps / alpha), UDP with
    # per-sample random stopping. long_steps: a longer run of the eps > gamma* settings.
    config.margin = ml_collections.ConfigDict(
        dict(
            seeds=(0, 1, 2, 3, 4),
            dim=2,
            steps=10_000,
            long_steps=40_000,
            learning_rate=0.1,
            eps_factors=(0.5, 0.9, 1.5),
            num_steps=10,
            norm="l2",
            log_every=100,
        )
    )
    # (b) LMS-7 slab data (a linear and a 7-slab coordinate, each fully predictive) with an MLP:
    # reliance on each coordinate = test accuracy after shuffling the other one.
    config.slab = ml_collections.ConfigDict(
        dict(
            seeds=(0, 1, 2),
            num_train=6000,
            num_test=2000,
            hidden=(100, 100),
            steps=3000,
            batch_size=128,
            learning_rate=1e-3,
            udp_epsilons=(0.3, 1.0),
            pgd_epsilon=0.3,
            num_steps=10,
            norm="linf",
        )
    )
    # (c) Two moons with an MLP: decision boundaries and PGD robust accuracy.
    config.moons = ml_collections.ConfigDict(
        dict(
            seed=0,
            num_train=1000,
            num_test=2000,
            noise=0.15,
            hidden=(64, 64),
            steps=3000,
            batch_size=128,
            learning_rate=3e-3,
            epsilon=0.3,
            num_steps=10,
            norm="l2",
            attack_epsilons=(0.05, 0.1, 0.2, 0.3),
        )
    )
    return config
