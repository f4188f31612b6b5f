"""Distillation from frozen teachers: losses and training objectives.

Importing this package registers the ``distill_kl`` training objective.
"""

from jaxlab.distill.losses import distill_kl_objective, token_kl

__all__ = ["distill_kl_objective", "token_kl"]
