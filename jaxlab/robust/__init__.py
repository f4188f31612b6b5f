"""Training-time input perturbations: UDP (label-free entropy ascent), PGD and TRADES baselines,
a classifier objective that applies them as a batch transform (trained with jaxlab's one step,
:func:`jaxlab.objectives.make_train_step`), and margin/robustness metrics."""

from jaxlab.robust.ascent import ascend, project_ball
from jaxlab.robust.metrics import (
    MaxMargin,
    accuracy,
    binary_linear,
    flip_fraction,
    hard_margin_svm,
    linear_margin,
    randomized_feature_accuracy,
    robust_accuracy,
)
from jaxlab.robust.pgd import pgd_perturb, trades_perturb, vat_perturb
from jaxlab.robust.training import (
    MODES,
    PERTURBATIONS,
    TrainResult,
    batches,
    classification_loss,
    classifier_objective,
    perturbation,
    train,
)
from jaxlab.robust.udp import predictive_entropy, udp_perturb

__all__ = [
    "MODES",
    "MaxMargin",
    "PERTURBATIONS",
    "TrainResult",
    "accuracy",
    "ascend",
    "batches",
    "binary_linear",
    "classification_loss",
    "flip_fraction",
    "hard_margin_svm",
    "linear_margin",
    "classifier_objective",
    "perturbation",
    "pgd_perturb",
    "predictive_entropy",
    "project_ball",
    "randomized_feature_accuracy",
    "robust_accuracy",
    "train",
    "trades_perturb",
    "udp_perturb",
    "vat_perturb",
]
