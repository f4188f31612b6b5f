"""Distillation from frozen teachers: losses and training objectives.

Importing this package registers the training objectives ``distill_kl``,
``distill_reverse_kl``, ``distill_pseudo_labels``, ``mohawk_matrix`` and ``mohawk_hidden``
(:mod:`jaxlab.distill.losses`).
"""

from jaxlab.distill.losses import (
    distill_kl_objective,
    hidden_alignment,
    layer_mixer_matrix,
    layer_output,
    matrix_alignment,
    mohawk_hidden_objective,
    mohawk_matrix_objective,
    pseudo_label_objective,
    pseudo_labels,
    reduce_tokens,
    reverse_kl_objective,
    token_kl,
    token_reverse_kl,
)

__all__ = [
    "distill_kl_objective",
    "hidden_alignment",
    "layer_mixer_matrix",
    "layer_output",
    "matrix_alignment",
    "mohawk_hidden_objective",
    "mohawk_matrix_objective",
    "pseudo_label_objective",
    "pseudo_labels",
    "reduce_tokens",
    "reverse_kl_objective",
    "token_kl",
    "token_reverse_kl",
]
