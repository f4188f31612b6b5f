"""Distillation losses against float64 NumPy closed forms: forward and reverse KL with a
temperature, both reductions (masked token mean, the authors' unmasked batchmean), KL + CE on
the teacher's argmax, MOHAWK's matrix (Frobenius) and hidden-state (L2) alignments, teacher-forced
per layer; and the materialised SSD mixer matrix, ``y = M x`` against the mixer's own scan to
1e-10 in float64."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxlab import distill, models, objectives
from jaxlab.models import TransformerConfig
from jaxlab.models.denseformer import DWAConfig
from jaxlab.models.mamba import MambaConfig
from jaxlab.ops import scan as scan_ops

VOCAB = 37
TEACHER = TransformerConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
# Four SSM heads of 8 channels: one per teacher head.
LLAMBA = MambaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    intermediate_size=48,
    mixer="discrete_mamba2",
    expand=1,
    head_dim=8,
    state_size=8,
    chunk_size=8,
    num_heads=4,
    num_kv_heads=2,
    max_seq_len=64,
)
HYBRID = dataclasses.replace(LLAMBA, mixer="mamba2", num_groups=2, attention_layers=(1,))


def log_softmax(x, temperature=1.0):
    x = np.asarray(x, np.float64) / temperature
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_kl(p_logits, q_logits, temperature):
    """``T^2 sum_v p (log p - log q)`` with ``p, q`` the softmaxes at ``T``."""
    lp, lq = log_softmax(p_logits, temperature), log_softmax(q_logits, temperature)
    return temperature**2 * np.sum(np.exp(lp) * (lp - lq), axis=-1)


def numpy_ce(logits, targets):
    return -np.take_along_axis(log_softmax(logits), np.asarray(targets)[..., None], -1)[..., 0]


def numpy_reduce(values, mask, reduction):
    if reduction == "token_mean":
        return np.sum(values * mask) / np.sum(mask)
    return np.sum(values) / values.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_token_kls_and_reductions_are_the_direct_sums(temperature):
    rng = np.random.default_rng(0)
    teacher = rng.normal(0, 2, (3, 5, 11)).astype(np.float32)
    student = rng.normal(0, 2, (3, 5, 11)).astype(np.float32)
    mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
    forward = distill.token_kl(teacher, student, temperature)
    reverse = distill.token_reverse_kl(teacher, student, temperature)
    np.testing.assert_allclose(forward, numpy_kl(teacher, student, temperature), rtol=1e-5)
    np.testing.assert_allclose(reverse, numpy_kl(student, teacher, temperature), rtol=1e-5)
    assert not np.allclose(forward, reverse, rtol=1e-2)  # the two directions differ
    values = np.asarray(forward, np.float64)
    total, count = distill.reduce_tokens(forward, mask, "token_mean")
    assert float(count) == mask.sum()
    assert float(total) / float(count) == pytest.approx(numpy_reduce(values, mask, "token_mean"))
    # The authors' batchmean: every position, divided by the batch size (3), mask ignored.
    total, count = distill.reduce_tokens(forward, mask, "batchmean")
    assert float(count) == 3.0
    assert float(total) / 3.0 == pytest.approx(values.sum() / 3.0, rel=1e-6)
    np.testing.assert_array_equal(distill.pseudo_labels(teacher), teacher.argmax(-1))
    with pytest.raises(ValueError, match="reduction must be one of"):
        distill.reduce_tokens(forward, mask, "mean")


def test_alignment_norms_are_frobenius_and_l2_with_finite_gradients_at_zero():
    rng = np.random.default_rng(1)
    m, a = rng.normal(size=(2, 3, 6, 6)), rng.normal(size=(2, 3, 6, 6))
    np.testing.assert_allclose(
        distill.matrix_alignment(jnp.asarray(m, jnp.float32), jnp.asarray(a, jnp.float32)),
        np.sqrt(((m - a) ** 2).sum((-2, -1))),
        rtol=1e-5,
    )
    s, t = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 5))
    np.testing.assert_allclose(
        distill.hidden_alignment(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)),
        np.sqrt(((s - t) ** 2).sum(-1)),
        rtol=1e-5,
    )
    # A layer equal to its target (a copied attention layer) must not give NaN gradients.
    same = jnp.asarray(s, jnp.float32)
    grad = jax.grad(lambda x: distill.hidden_alignment(x, same).sum())(same)
    assert np.all(np.asarray(grad) == 0)


def build(config, seed):
    graphdef, params = nnx.split(models.build(config, nnx.Rngs(seed)), nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def make_objective(name, student_config, teacher_config=TEACHER, **fields):
    """The registered objective ``name`` for a fresh student and teacher, as the engine builds
    it (the same context fields), with ``fields`` in ``config.objective``."""
    objective = dict(name=name, teacher="run:unused", temperature=1.0, ce_weight=0.0)
    objective.update(fields)
    config = ml_collections.ConfigDict(dict(accum_steps=1, objective=objective))
    objectives.get_objective(name).validate(config)
    graphdef, params = build(student_config, 0)
    teacher_graphdef, teacher_params = build(teacher_config, 1)
    params["embed"] = teacher_params["embed"]  # as a transferred student's
    context = objectives.ObjectiveContext(
        config=config,
        graphdef=graphdef,
        frozen={"teacher": teacher_graphdef},
        model_config=student_config,
        frozen_configs={"teacher": teacher_config},
        params=params,
        schedule=None,
        components=(),
    )
    built = objectives.get_objective(name).build(context)
    return built, (graphdef, params), (teacher_graphdef, teacher_params)


def make_batch(seed=2, batch=3, seq=12):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, VOCAB, (batch, seq))
    return dict(
        inputs=jnp.asarray(inputs, jnp.int32),
        targets=jnp.asarray(np.roll(inputs, -1, axis=1), jnp.int32),
        loss_mask=jnp.asarray(rng.random((batch, seq)) < 0.7, jnp.int32),
        segment_ids=jnp.ones((batch, seq), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
    )


def run_loss(built, params, teacher_params, batch):
    grads, _, metrics = jax.jit(built.gradients)(
        params, batch, {"teacher": teacher_params}, (), jax.random.PRNGKey(0)
    )
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    return {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize(
    "name, fields",
    [
        ("distill_kl", dict(temperature=2.0, ce_weight=0.5, kl_weight=0.7)),
        ("distill_reverse_kl", dict(temperature=1.5, ce_weight=0.25, reduction="batchmean")),
        ("distill_pseudo_labels", dict(kl_weight=0.1, ce_weight=1.0, reduction="batchmean")),
    ],
)
def test_logit_objectives_equal_their_numpy_closed_forms(name, fields):
    # Any family learns from logits: a Llama student (cheap to compile) of another seed.
    built, (graphdef, params), (teacher_graphdef, teacher_params) = make_objective(
        name, TEACHER, **fields
    )
    batch = make_batch()
    metrics = run_loss(built, params, teacher_params, batch)

    student = np.asarray(objectives.model_logits(graphdef, params, batch), np.float64)
    teacher = np.asarray(objectives.model_logits(teacher_graphdef, teacher_params, batch))
    temperature = fields.get("temperature", 1.0)
    if name == "distill_reverse_kl":
        kl = numpy_kl(student, teacher, temperature)
    else:
        kl = numpy_kl(teacher, student, temperature)
    targets = teacher.argmax(-1) if name == "distill_pseudo_labels" else batch["targets"]
    ce = numpy_ce(student, targets)
    mask = np.asarray(batch["loss_mask"], np.float64)
    reduction = fields.get("reduction", "token_mean")
    want_kl, want_ce = numpy_reduce(kl, mask, reduction), numpy_reduce(ce, mask, reduction)
    want = fields.get("kl_weight", 1.0) * want_kl + fields.get("ce_weight", 0.0) * want_ce
    assert metrics["kl"] == pytest.approx(want_kl, rel=1e-5)
    assert metrics["ce"] == pytest.approx(want_ce, rel=1e-5)
    assert metrics["loss"] == pytest.approx(want, rel=1e-5)
    # batchmean counts sequences, the token mean counted tokens.
    assert metrics["tokens"] == (3.0 if reduction == "batchmean" else mask.sum())


def teacher_hidden(teacher_graphdef, teacher_params, batch):
    teacher = nnx.merge(teacher_graphdef, teacher_params)
    _, hidden = teacher(
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        return_attention=True,
    )
    return hidden


@pytest.mark.parametrize("student_config", [LLAMBA, HYBRID], ids=["llamba", "hybrid"])
def test_mohawk_matrix_objective_is_the_teacher_forced_frobenius_sum(student_config):
    built, (graphdef, params), (teacher_graphdef, teacher_params) = make_objective(
        "mohawk_matrix", student_config
    )
    batch = make_batch()
    metrics = run_loss(built, params, teacher_params, batch)

    hidden = teacher_hidden(teacher_graphdef, teacher_params, batch)
    student = nnx.merge(graphdef, params)
    layers = [i for i in range(2) if i not in student_config.attention_layers]
    want = 0.0
    for i in layers:
        # The student's mixer on the teacher's input to layer i.
        block = student.layers[i]
        matrix = np.asarray(block.mixer.mixer_matrix(block.input_norm(hidden.residuals[i]))[0])
        probs = np.asarray(hidden.attention[i], np.float64)
        assert matrix.shape == probs.shape == (3, 4, 12, 12)
        per_head = np.sqrt(((matrix.astype(np.float64) - probs) ** 2).sum((-2, -1)))
        layer = per_head.mean(1).sum() / 3  # mean over heads, then over sequences
        assert metrics[f"matrix_{i}"] == pytest.approx(layer, rel=1e-5)
        want += layer
    assert set(metrics) >= {f"matrix_{i}" for i in layers}
    assert not any(f"matrix_{i}" in metrics for i in student_config.attention_layers)
    assert metrics["loss"] == pytest.approx(want, rel=1e-5) and metrics["tokens"] == 3.0


def test_mohawk_hidden_objective_is_the_teacher_forced_l2_sum():
    student_config = LLAMBA
    built, (graphdef, params), (teacher_graphdef, teacher_params) = make_objective(
        "mohawk_hidden", student_config
    )
    batch = make_batch()
    metrics = run_loss(built, params, teacher_params, batch)

    residuals = teacher_hidden(teacher_graphdef, teacher_params, batch).residuals
    student = nnx.merge(graphdef, params)
    # Layer 0 reads the embedding, which the student shares with the teacher: its teacher-forced
    # output is the student's own first residual.
    _, own = student(batch["inputs"], return_hidden=True)
    np.testing.assert_allclose(
        distill.layer_output(student, 0, residuals[0]), own.residuals[1], atol=1e-6
    )
    mask = np.asarray(batch["loss_mask"], np.float64)
    layers = [i for i in range(2) if i not in student_config.attention_layers]
    want = 0.0
    for i in layers:
        out = np.asarray(distill.layer_output(student, i, residuals[i]), np.float64)
        norms = np.sqrt(((out - np.asarray(residuals[i + 1], np.float64)) ** 2).sum(-1))
        layer = np.sum(norms * mask) / mask.sum()
        assert metrics[f"hidden_{i}"] == pytest.approx(layer, rel=1e-5)
        want += layer
    assert metrics["loss"] == pytest.approx(want, rel=1e-5) and metrics["tokens"] == mask.sum()


def test_mohawk_hidden_objective_feeds_a_densformer_students_blocks_the_teachers_averages():
    """With a DenseFormer teacher each block reads the depth-weighted average before it
    (``HiddenStates.averaged``), not the previous block's output; the target is still the
    teacher block's output."""
    dense = DWAConfig(dilation=1, period=1)
    teacher_config = dataclasses.replace(TEACHER, dwa=dense)
    built, (graphdef, params), (teacher_graphdef, teacher_params) = make_objective(
        "mohawk_hidden", dataclasses.replace(LLAMBA, dwa=dense), teacher_config
    )
    rng = np.random.default_rng(9)  # random averages: at their identity start Y_i = X_i
    teacher_params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.asarray(rng.normal(0.3, 0.5, x.shape), x.dtype)
            if "dwa" in jax.tree_util.keystr(path)
            else x
        ),
        teacher_params,
    )
    batch = make_batch()
    metrics = run_loss(built, params, teacher_params, batch)

    hidden = teacher_hidden(teacher_graphdef, teacher_params, batch)
    averaged, residual = np.asarray(hidden.averaged[1]), np.asarray(hidden.residuals[1])
    assert np.abs(averaged - residual).max() > 0.1 * np.abs(residual).max()
    student = nnx.merge(graphdef, params)
    mask = np.asarray(batch["loss_mask"], np.float64)
    want = 0.0
    for i in range(2):
        out = np.asarray(distill.layer_output(student, i, hidden.averaged[i]), np.float64)
        norms = np.sqrt(((out - np.asarray(hidden.residuals[i + 1], np.float64)) ** 2).sum(-1))
        layer = np.sum(norms * mask) / mask.sum()
        assert metrics[f"hidden_{i}"] == pytest.approx(layer, rel=1e-5)
        want += layer
    assert metrics["loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="depth-weighted averages must be the teacher's"):
        make_objective("mohawk_hidden", LLAMBA, teacher_config)


def test_mohawk_objectives_name_what_does_not_fit():
    with pytest.raises(ValueError, match="num_heads=4"):
        make_objective("mohawk_matrix", dataclasses.replace(LLAMBA, head_dim=16))
    with pytest.raises(ValueError, match="SSD mixer"):
        make_objective("mohawk_matrix", dataclasses.replace(LLAMBA, mixer="mamba1"))
    with pytest.raises(ValueError, match="num_layers"):
        make_objective("mohawk_hidden", dataclasses.replace(LLAMBA, num_layers=3))
    with pytest.raises(ValueError, match="one block per teacher layer"):
        make_objective("mohawk_hidden", LLAMBA, dataclasses.replace(TEACHER, parallel_groups=(2,)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        make_objective("distill_kl", LLAMBA, reduction="sum")


def randomize_in_float64(mixer, seed):
    """Random float64 values for every mixer parameter (the zero biases and unit D would hide a
    term left out of M)."""
    state = nnx.state(mixer, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float64) for x in leaves]
    nnx.update(mixer, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
@pytest.mark.parametrize("mixer", ["mamba2", "discrete_mamba2"])
def test_mixer_matrix_times_x_is_the_mixers_own_scan_in_float64(mixer, impl, monkeypatch):
    config = dataclasses.replace(
        LLAMBA, mixer=mixer, num_groups=2, scan_impl=impl, attention_layers=()
    )
    with jax.enable_x64(True):
        module = models.build(config, nnx.Rngs(0)).layers[0].mixer
        randomize_in_float64(module, 3)
        scans = []  # what the mixer's own SSD call returns

        def recording(*args, **kwargs):
            result = real(*args, **kwargs)
            scans.append(result[0])
            return result

        real = scan_ops.ssd
        monkeypatch.setattr(scan_ops, "ssd", recording)
        hidden = jnp.asarray(np.random.default_rng(4).normal(size=(2, 20, 32)))
        out, _ = module(hidden, None)
        matrix, x = module.mixer_matrix(hidden)
        assert matrix.dtype == jnp.float64 and matrix.shape == (2, 4, 20, 20)
        assert len(scans) == 1 and scans[0].dtype == jnp.float64
        # Causal: nothing above the diagonal.
        assert np.all(np.asarray(matrix)[..., np.triu(np.ones((20, 20), bool), 1)] == 0)
        y = np.einsum("bhts,bshp->bthp", np.asarray(matrix), np.asarray(x))
        D = np.asarray(module.D[...])
        if mixer == "mamba2":  # its scan adds D x itself
            np.testing.assert_allclose(np.asarray(scans[0]), y, rtol=0, atol=1e-10)
        else:  # its scan reads x / step and the mixer adds D x after it
            skip = D[:, None] * np.asarray(x)
            np.testing.assert_allclose(np.asarray(scans[0]) + skip, y, rtol=0, atol=1e-10)
            # And the whole mixer: out = W_o (y * silu(z + z_bias)), no norm in between.
            z = np.asarray(module.ssd_inputs(hidden)[5]) + np.asarray(module.z_bias[...])
            gated = y.reshape(2, 20, 32) * z / (1 + np.exp(-z))
            want = gated @ np.asarray(module.out_proj[...])
            np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-10)
        assert np.abs(y).max() > 0.1  # not trivially zero
