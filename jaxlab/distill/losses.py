"""Logit distillation from a frozen teacher (``config.objective.name = "distill_kl"``).

Per counted token (``loss_mask``), the forward KL from the teacher's to the student's next-token
distribution at temperature ``T``, scaled by ``T^2`` so gradients keep their size as ``T`` changes
(Hinton et al. 2015):

    KL_t = T^2 * sum_v p_T(v) (log p_T(v) - log q_T(v)),  p_T = softmax(teacher / T),
                                                          q_T = softmax(student / T),

plus ``ce_weight`` times the next-token cross-entropy. The loss is *summed* over counted tokens
and divided once by their number, so it does not grow with the sequence length, and gradient
accumulation and packing stay exact. The teacher is the frozen model ``teacher`` loaded from
``config.objective.teacher`` (``hf:PATH`` or ``run:WORKDIR[@STEP]``): any registered family, with
its own graph definition (a Llama teacher for a Mamba student), sharded like the student.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlab import objectives


def token_kl(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``[...]`` per-token ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` from logits
    ``[..., vocab]`` (float32)."""
    t = jnp.asarray(temperature, jnp.float32)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _validate(config) -> None:
    o = config.objective
    if not o.teacher:
        raise ValueError(
            "config.objective.teacher must name the teacher as 'hf:PATH' or "
            "'run:WORKDIR[@STEP]', got ''"
        )
    if not o.temperature > 0:
        raise ValueError(f"config.objective.temperature must be > 0, got {o.temperature}")
    if o.ce_weight < 0:
        raise ValueError(f"config.objective.ce_weight must be >= 0, got {o.ce_weight}")


def distill_kl_objective(context) -> objectives.Objective:
    """Token-level KL to the teacher (+ ``ce_weight`` x cross-entropy). Metrics: ``kl`` and
    ``ce`` (means over counted tokens) beside ``loss``."""
    o = context.config.objective
    teacher = context.frozen["teacher"]
    student_vocab = context.model_config.vocab_size
    teacher_vocab = context.frozen_configs["teacher"].vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"config.objective.teacher: the teacher's vocab_size {teacher_vocab} "
            f"differs from the student's {student_vocab}"
        )
    temperature, ce_weight = float(o.temperature), float(o.ce_weight)

    def loss(params, batch, frozen, rng):
        del rng
        mask = batch["loss_mask"].astype(jnp.float32)
        teacher_logits = jax.lax.stop_gradient(
            objectives.model_logits(teacher, frozen["teacher"], batch)
        )
        logits = objectives.model_logits(context.graphdef, params, batch)
        kl = jnp.sum(token_kl(teacher_logits, logits, temperature) * mask)
        ce = jnp.sum(
            optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * mask
        )
        total = kl + ce_weight * ce if ce_weight else kl
        return total, jnp.sum(mask), {"kl": kl, "ce": ce}

    return objectives.Objective(
        objectives.from_loss(loss, context.config.accum_steps, context.trainable)
    )


objectives.register_objective(
    "distill_kl",
    distill_kl_objective,
    validate=_validate,
    frozen_models=lambda config: {"teacher": config.objective.teacher},
)
