"""Distillation from frozen teachers: students initialised from a teacher's weights
(:mod:`jaxlab.distill.transfer`), losses and training objectives.

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
from jaxlab.distill.transfer import (
    CONV_INITS,
    TRANSFER_MIXERS,
    hybrid_layers,
    student_config,
    transfer,
)

__all__ = [
    "CONV_INITS",
    "TRANSFER_MIXERS",
    "distill_kl_objective",
    "hidden_alignment",
    "hybrid_layers",
    "layer_mixer_matrix",
    "layer_output",
    "matrix_alignment",
    "mohawk_hidden_objective",
    "mohawk_matrix_objective",
    "pseudo_label_objective",
    "pseudo_labels",
    "reduce_tokens",
    "reverse_kl_objective",
    "student_config",
    "token_kl",
    "token_reverse_kl",
    "transfer",
]
