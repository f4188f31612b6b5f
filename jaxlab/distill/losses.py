"""Distillation from a frozen teacher: logit losses and the MOHAWK layer alignments, as pure
functions and as training objectives (``config.objective.name``).

Logit losses, per token, at temperature ``T`` (``p_T = softmax(teacher / T)``,
``q_T = softmax(student / T)``), scaled by ``T^2`` so that gradients keep their size as ``T``
changes (Hinton et al. 2015):

    forward KL:  T^2 * sum_v p_T(v) (log p_T(v) - log q_T(v))          (:func:`token_kl`)
    reverse KL:  T^2 * sum_v q_T(v) (log q_T(v) - log p_T(v))          (:func:`token_reverse_kl`)
    CE:          -log softmax(student)[y], y the data's next token or the teacher's argmax
                 (pseudo-labels, :func:`pseudo_labels`)

Reductions over the ``[batch, seq]`` per-token losses (:func:`reduce_tokens`):

* ``"token_mean"`` (default): ``sum_t mask_t l_t / sum_t mask_t``, the mean over counted tokens;
  it does not grow with the sequence length.
* ``"batchmean"``: ``sum_{b, t} l_{b,t} / batch``, every position counted, pad and prompt
  included: what MambaInLlama's ``F.kl_div(..., reduction="batchmean")`` computes (its scale
  grows with the sequence length, MambaInLlama issue #15), for parity runs. It applies to the
  cross-entropy term too, where their code averages over labelled tokens instead (their
  end-to-end configs set the CE weight to 0, where the two agree).

MOHAWK (Bick et al. 2024), teacher-forced per layer: student layer ``i`` reads the teacher's
residual stream ``u_i`` entering layer ``i`` (never its own previous layers' output):

* stage 1, matrix orientation (:func:`matrix_alignment`): for every head,
  ``||M_i - A_i||_F`` over the ``[seq, seq]`` matrices, with ``M_i`` the student mixer's
  materialised matrix on ``input_norm_i(u_i)`` (``y = M x``, :meth:`MambaMixer.mixer_matrix`)
  and ``A_i`` the teacher's attention probabilities at layer ``i``; mean over heads, summed over
  layers, mean over sequences. Packed documents are not separated: the recurrence runs across
  them, so the full matrices are compared.
* stage 2, hidden-state alignment (:func:`hidden_alignment`): ``||block_i(u_i) - u_{i+1}||_2``
  over features per token, summed over layers, mean over counted tokens.

Objectives (each reads the frozen ``teacher`` from ``config.objective.teacher``, ``hf:PATH`` or
``run:WORKDIR[@STEP]``, any registered family with its own graph definition):

* ``distill_kl``: ``kl_weight * forward KL + ce_weight * CE`` on the data's targets;
* ``distill_reverse_kl``: the same with the reverse KL (as MambaInLlama's follow-up M1);
* ``distill_pseudo_labels``: ``kl_weight * forward KL + ce_weight * CE`` on the teacher's argmax
  (MambaInLlama's stepwise stage: 0.1 and 1);
* ``mohawk_matrix``, ``mohawk_hidden``: MOHAWK stages 1 and 2 over the student's Mamba layers
  (a hybrid's attention layers are skipped), for a Mamba student with the teacher's depth.

Losses are returned as sums with their count (``jaxlab.objectives.from_loss``), so gradient
accumulation stays exact under both reductions. Metrics: ``kl`` and ``ce`` (logit objectives),
``matrix_<layer>`` or ``hidden_<layer>`` (MOHAWK), each divided by the same count as ``loss``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlab import objectives

REDUCTIONS = ("token_mean", "batchmean")


def token_kl(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``[...]`` per-token ``T^2 KL(softmax(teacher / T) || softmax(student / T))`` from logits
    ``[..., vocab]`` (float32)."""
    t = jnp.asarray(temperature, jnp.float32)
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_reverse_kl(
    teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """``[...]`` per-token ``T^2 KL(softmax(student / T) || softmax(teacher / T))``: the reverse
    (mode-seeking) KL, from logits ``[..., vocab]`` (float32)."""
    return token_kl(student_logits, teacher_logits, temperature)


def pseudo_labels(teacher_logits: jax.Array) -> jax.Array:
    """``[...]`` int32 targets: the teacher's most likely token at every position."""
    return jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)


def reduce_tokens(
    values: jax.Array, mask: jax.Array, reduction: str = "token_mean"
) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)`` of per-token ``values`` [batch, seq]: ``sum / count`` is the loss.

    ``"token_mean"``: ``(sum(values * mask), sum(mask))``; ``"batchmean"``: ``(sum(values),
    batch)``, the mask ignored (see the module docstring).
    """
    if reduction == "token_mean":
        mask = mask.astype(values.dtype)
        return jnp.sum(values * mask), jnp.sum(mask)
    if reduction == "batchmean":
        return jnp.sum(values), jnp.asarray(values.shape[0], values.dtype)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _norm(squares: jax.Array, axis) -> jax.Array:
    """``sqrt(sum(squares, axis))`` with a zero (not NaN) gradient where the sum is 0 (a layer
    equal to its target, e.g. a copied attention layer)."""
    total = jnp.sum(squares, axis=axis)
    positive = total > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1.0)), 0.0)


def matrix_alignment(student_matrix: jax.Array, teacher_probs: jax.Array) -> jax.Array:
    """MOHAWK stage 1: ``[batch, heads]`` Frobenius norms ``||M - A||_F`` over the last two axes
    of ``[batch, heads, seq, seq]`` matrices (float32 or wider)."""
    if student_matrix.shape != teacher_probs.shape:
        raise ValueError(
            f"matrix_alignment: the student's matrix {student_matrix.shape} and the teacher's "
            f"attention {teacher_probs.shape} must have the same [batch, heads, seq, seq] shape"
        )
    dtype = jnp.promote_types(student_matrix.dtype, jnp.float32)
    diff = student_matrix.astype(dtype) - teacher_probs.astype(dtype)
    return _norm(diff * diff, axis=(-2, -1))


def hidden_alignment(student_hidden: jax.Array, teacher_hidden: jax.Array) -> jax.Array:
    """MOHAWK stage 2: ``[batch, seq]`` L2 norms over features of ``student - teacher``
    (``[batch, seq, embed]`` each; float32 or wider)."""
    dtype = jnp.promote_types(student_hidden.dtype, jnp.float32)
    diff = student_hidden.astype(dtype) - teacher_hidden.astype(dtype)
    return _norm(diff * diff, axis=-1)


def layer_output(model, layer: int, x: jax.Array, positions=None, segment_ids=None) -> jax.Array:
    """Block ``layer`` of ``model`` (a Transformer with unrolled layers or a Mamba/hybrid LM)
    on the residual stream ``x`` [batch, seq, embed]: its output, as the model's own loop
    computes it (no cache)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return model.layers[layer](x, positions, segment_ids, None)[0]


def layer_mixer_matrix(model, layer: int, x: jax.Array) -> jax.Array:
    """The mixer matrix ``[batch, heads, seq, seq]`` of Mamba block ``layer`` of ``model`` on the
    residual stream ``x`` entering it (its input norm applied first, as in the block)."""
    block = model.layers[layer]
    return block.mixer.mixer_matrix(block.input_norm(x))[0]


# ------------------------------------------------------------------------------- objectives


def _get(objective, field, default):
    return objective[field] if field in objective else default


def _validate_teacher(config) -> None:
    if not config.objective.teacher:
        raise ValueError(
            "config.objective.teacher must name the teacher as 'hf:PATH' or "
            "'run:WORKDIR[@STEP]', got ''"
        )


def _validate(config) -> None:
    _validate_teacher(config)
    o = config.objective
    if not o.temperature > 0:
        raise ValueError(f"config.objective.temperature must be > 0, got {o.temperature}")
    if o.ce_weight < 0:
        raise ValueError(f"config.objective.ce_weight must be >= 0, got {o.ce_weight}")
    kl_weight = _get(o, "kl_weight", 1.0)
    if kl_weight < 0:
        raise ValueError(f"config.objective.kl_weight must be >= 0, got {kl_weight}")
    reduction = _get(o, "reduction", "token_mean")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"config.objective.reduction must be one of {REDUCTIONS}, got {reduction!r}"
        )


def _logit_objective(context, kl_fn, pseudo: bool) -> objectives.Objective:
    """``kl_weight * KL + ce_weight * CE`` with the KL of ``kl_fn`` (:func:`token_kl` or
    :func:`token_reverse_kl`) and CE targets the data's or, with ``pseudo``, the teacher's
    argmax; reduced by ``config.objective.reduction``."""
    o = context.config.objective
    student_vocab = context.model_config.vocab_size
    teacher_vocab = context.frozen_configs["teacher"].vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"config.objective.teacher: the teacher's vocab_size {teacher_vocab} "
            f"differs from the student's {student_vocab}"
        )
    temperature, ce_weight = float(o.temperature), float(o.ce_weight)
    kl_weight = float(_get(o, "kl_weight", 1.0))
    reduction = _get(o, "reduction", "token_mean")

    def loss(params, batch, frozen, rng):
        del rng
        mask = batch["loss_mask"].astype(jnp.float32)
        teacher_logits = jax.lax.stop_gradient(
            objectives.model_logits(context.frozen["teacher"], frozen["teacher"], batch)
        )
        logits = objectives.model_logits(context.graphdef, params, batch)
        targets = pseudo_labels(teacher_logits) if pseudo else batch["targets"]
        kl, count = reduce_tokens(kl_fn(teacher_logits, logits, temperature), mask, reduction)
        ce, _ = reduce_tokens(
            optax.softmax_cross_entropy_with_integer_labels(logits, targets), mask, reduction
        )
        total = kl if kl_weight == 1.0 else kl_weight * kl
        if ce_weight:
            total = total + ce_weight * ce
        return total, count, {"kl": kl, "ce": ce}

    return objectives.Objective(
        objectives.from_loss(loss, context.config.accum_steps, context.trainable)
    )


def distill_kl_objective(context) -> objectives.Objective:
    """``kl_weight`` x forward KL to the teacher + ``ce_weight`` x cross-entropy on the data's
    targets. Metrics: ``kl`` and ``ce`` beside ``loss``."""
    return _logit_objective(context, token_kl, pseudo=False)


def reverse_kl_objective(context) -> objectives.Objective:
    """``kl_weight`` x reverse KL to the teacher + ``ce_weight`` x cross-entropy on the data's
    targets. Metrics: ``kl`` (the reverse KL) and ``ce``."""
    return _logit_objective(context, token_reverse_kl, pseudo=False)


def pseudo_label_objective(context) -> objectives.Objective:
    """``kl_weight`` x forward KL to the teacher + ``ce_weight`` x cross-entropy on the teacher's
    argmax (pseudo-labels). Metrics: ``kl`` and ``ce`` (on the pseudo-labels)."""
    return _logit_objective(context, token_kl, pseudo=True)


def aligned_layers(context, *, matrix: bool) -> tuple[int, ...]:
    """The student layers MOHAWK aligns (its Mamba layers), after checking that the student is
    a Mamba LM with the teacher's depth and width (and, for ``matrix``, an SSD mixer with the
    teacher's query heads)."""
    from jaxlab.models.mamba import MambaConfig  # the models import nothing from here

    student, teacher = context.model_config, context.frozen_configs["teacher"]
    name = context.config.objective.name
    if not isinstance(student, MambaConfig):
        raise ValueError(
            f"config.objective.name={name!r} aligns Mamba mixers: config.model.name must be "
            f"'mamba', got {student.name!r}"
        )
    for field in ("num_layers", "hidden_size"):
        if getattr(student, field) != getattr(teacher, field):
            raise ValueError(
                f"config.objective.teacher: {name} needs the teacher's {field} "
                f"({getattr(teacher, field)}) in the student, got {getattr(student, field)}"
            )
    # Teacher forcing reads the input of every teacher layer: one block per layer (a
    # DenseFormer's blocks read the averages between them, which the student must have too).
    reshaped = [f for f in ("layer_widths", "parallel_groups") if getattr(teacher, f, None)]
    if reshaped:
        raise ValueError(
            f"config.objective.teacher: {name} needs one block per teacher layer; the teacher "
            f"sets {reshaped}"
        )
    if getattr(teacher, "dwa", None) != student.dwa:
        raise ValueError(
            f"config.objective.teacher: {name} feeds each student block its teacher block's "
            f"input, so the student's depth-weighted averages must be the teacher's: teacher "
            f"dwa={getattr(teacher, 'dwa', None)}, student dwa={student.dwa}"
        )
    layers = tuple(i for i in range(student.num_layers) if i not in student.attention_layers)
    if not layers:
        raise ValueError(f"config.objective.name={name!r}: the student has no Mamba layer")
    if matrix and isinstance(teacher, MambaConfig):
        missing = [i for i in layers if i not in teacher.attention_layers]
        if missing:
            raise ValueError(
                f"config.objective.teacher: {name} aligns the student's layers {missing} with "
                "teacher attention, and the teacher has Mamba mixers there"
            )
    if matrix:
        if student.mixer not in ("mamba2", "discrete_mamba2"):
            raise ValueError(
                f"config.objective.name={name!r} needs an SSD mixer ('mamba2' or "
                f"'discrete_mamba2'), got config.model.mixer={student.mixer!r}"
            )
        if student.heads != teacher.num_heads:
            raise ValueError(
                f"config.objective.teacher: {name} compares each student head with a teacher "
                f"head: the student's {student.heads} SSM heads (inner_size / head_dim) must "
                f"equal the teacher's num_heads={teacher.num_heads}"
            )
    return layers


def block_inputs(hidden) -> tuple[jax.Array, ...]:
    """What each block reads in a forward's hidden states: the residual stream, or in a
    DenseFormer the depth-weighted average before the block (``HiddenStates.averaged``)."""
    return hidden.residuals if hidden.averaged is None else hidden.averaged


def _teacher_hidden(context, frozen, batch, return_attention: bool):
    teacher = nnx.merge(context.frozen["teacher"], frozen["teacher"])
    _, hidden = teacher(
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        return_hidden=True,
        return_attention=return_attention,
    )
    return jax.lax.stop_gradient(hidden)


def mohawk_matrix_objective(context) -> objectives.Objective:
    """MOHAWK stage 1: per Mamba layer, the mean over heads of ``||M - A||_F``, summed over
    layers, mean over sequences (the count is the batch's rows). Metrics ``matrix_<layer>``."""
    layers = aligned_layers(context, matrix=True)

    def loss(params, batch, frozen, rng):
        del rng
        hidden = _teacher_hidden(context, frozen, batch, return_attention=True)
        model = nnx.merge(context.graphdef, params)
        total, metrics = jnp.float32(0), {}
        for i in layers:
            matrix = layer_mixer_matrix(model, i, block_inputs(hidden)[i])
            metrics[f"matrix_{i}"] = jnp.sum(
                jnp.mean(matrix_alignment(matrix, hidden.attention[i]), axis=1)
            )
            total = total + metrics[f"matrix_{i}"]
        return total, jnp.float32(batch["inputs"].shape[0]), metrics

    return objectives.Objective(
        objectives.from_loss(loss, context.config.accum_steps, context.trainable)
    )


def mohawk_hidden_objective(context) -> objectives.Objective:
    """MOHAWK stage 2: per Mamba layer, ``||block(u_i) - x_{i+1}||_2`` per counted token, summed
    over layers, mean over counted tokens, with ``u_i`` what teacher block ``i`` reads (the
    residual stream, or a DenseFormer's average before it) and ``x_{i+1}`` its output. Metrics
    ``hidden_<layer>``."""
    layers = aligned_layers(context, matrix=False)

    def loss(params, batch, frozen, rng):
        del rng
        hidden = _teacher_hidden(context, frozen, batch, return_attention=False)
        model = nnx.merge(context.graphdef, params)
        mask = batch["loss_mask"].astype(jnp.float32)
        total, metrics = jnp.float32(0), {}
        for i in layers:
            out = layer_output(
                model, i, block_inputs(hidden)[i], batch["positions"], batch["segment_ids"]
            )
            metrics[f"hidden_{i}"], count = reduce_tokens(
                hidden_alignment(out, hidden.residuals[i + 1]), mask
            )
            total = total + metrics[f"hidden_{i}"]
        return total, count, metrics

    return objectives.Objective(
        objectives.from_loss(loss, context.config.accum_steps, context.trainable)
    )


def _teacher(config):
    return {"teacher": config.objective.teacher}


for _name, _build, _check in (
    ("distill_kl", distill_kl_objective, _validate),
    ("distill_reverse_kl", reverse_kl_objective, _validate),
    ("distill_pseudo_labels", pseudo_label_objective, _validate),
    ("mohawk_matrix", mohawk_matrix_objective, _validate_teacher),
    ("mohawk_hidden", mohawk_hidden_objective, _validate_teacher),
):
    objectives.register_objective(_name, _build, validate=_check, frozen_models=_teacher)
