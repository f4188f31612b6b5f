"""Distillation from frozen teachers: students initialised from a teacher's weights
(:mod:`jaxlab.distill.transfer`), losses and training objectives.

Importing this package registers the ``distill_kl`` training objective.
"""

from jaxlab.distill.losses import distill_kl_objective, token_kl
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
    "hybrid_layers",
    "student_config",
    "token_kl",
    "transfer",
]
