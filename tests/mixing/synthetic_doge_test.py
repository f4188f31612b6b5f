"""DoGE on generated domains with seeded roles: the OOD weights favour the domains that share
structure with the target, the scores predict one-step target-loss changes, and the weights help
a fresh model (one seed, shortened; experiments/doge.py runs three)."""

import ml_collections
import numpy as np
import pytest

from jaxlab.mixing import synthetic

CONFIG = ml_collections.ConfigDict(
    dict(
        seeds=(4,),
        hidden=(64,),
        learning_rate=1e-2,
        final_lr_ratio=0.1,
        proxy_steps=400,
        base_steps=400,
        batch_size=64,
        mu_ood=0.05,
        mu_universal=0.01,
        score_clip=(0.0, 5.0),
        doremi_step_size=1.0,
        doremi_smoothing=1e-4,
        fd_step=1e-3,
    )
)


@pytest.fixture(scope="module")
def result():
    return synthetic.run(CONFIG)[0]


def test_ood_weights_favour_related_domains(result):
    shares = synthetic.role_shares(result, "doge-ood")
    assert shares["related"] + shares["duplicate"] >= 0.7, shares
    assert shares["noise"] <= 0.1, shares
    weights = np.asarray(result["weights"]["doge-ood"])
    assert weights.sum() == pytest.approx(1.0, abs=1e-5) and np.all(weights > 0)


def test_scores_predict_the_one_step_change_of_the_target_loss(result):
    signs = result["signs"]
    scores, changes = np.asarray(signs["scores"]), np.asarray(signs["changes"])
    assert signs["agree"] == len(scores)
    # Central differences: L(theta - h g) - L(theta + h g) = -2 h <g, g_T> + O(h^3).
    np.testing.assert_allclose(changes, -2 * CONFIG.fd_step * scores, rtol=0.02, atol=1e-9)


def test_doge_weights_train_a_better_target_model_than_uniform(result):
    losses = result["target_loss"]
    assert losses["doge-ood"] < losses["uniform"], losses
