"""Attention -> Mamba weight transfer: closed forms in float64 NumPy from the teacher's weights,
copied parts bitwise, cached decoding, a Hugging Face Llama through engine checkpoints."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlab import models
from jaxlab.distill import TRANSFER_MIXERS, hybrid_layers, student_config, transfer
from jaxlab.interop.hf import load_hf_llama
from jaxlab.models.denseformer import DWAConfig
from jaxlab.models.mamba import MambaConfig, init_cache
from jaxlab.models.sparse_attention import SparseAttentionConfig
from jaxlab.models.transformer import Transformer, TransformerConfig
from jaxlab.train.checkpoint import Checkpointer
from jaxlab.train.pretrained import (
    load_params,
    parse_source,
    source_model_config,
    write_model_config,
)
from tests.hf_utils import make_hf_model

# Two query heads share one kv head (GQA) of width 16.
TEACHER = TransformerConfig(
    vocab_size=41,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    max_seq_len=64,
)
SEQ = 21  # past one chunk of 8: the chunked scans carry their state between chunks


def _teacher(seed, config=TEACHER):
    """A Transformer whose every parameter is random (std 0.2; norm scales near 1)."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(0.2 * rng.normal(size=x.shape) + (x.ndim == 1), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def _randomize(variable, seed, scale=1.0):
    """Non-trivial values for a fresh parameter that starts at 0 or 1 (and would hide a term)."""
    shape = variable[...].shape
    variable[...] = jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _inputs(seed, batch=2):
    return np.random.default_rng(seed).normal(size=(batch, SEQ, TEACHER.hidden_size))


def _f64(x):
    return np.asarray(x, np.float64)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _causal_conv(x, weight, bias):
    """Depthwise causal conv of x [batch, seq, channels] with weight [kernel, channels]."""
    k = weight.shape[0]
    padded = np.concatenate([np.zeros((x.shape[0], k - 1, x.shape[2])), x], axis=1)
    return sum(padded[:, i : i + x.shape[1]] * weight[i] for i in range(k)) + bias


def _teacher_qkv(attn, u):
    """The teacher's q [batch, seq, heads, P] and k, v [batch, seq, kv_heads, P], no RoPE."""
    return tuple(
        np.einsum("bte,ehp->bthp", u, _f64(getattr(attn, f"{n}_proj")[...])) for n in "qkv"
    )


def _gqa(x, heads):
    """kv heads -> query heads: head h reads kv head h // (heads // kv_heads)."""
    return np.repeat(x, heads // x.shape[2], axis=2)


@nnx.jit
def _mixer_forward(mixer, u):
    return mixer(u, None)[0]


def _run_mixer(mixer, u):
    return np.asarray(_mixer_forward(mixer, jnp.asarray(u, jnp.float32)))


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _decoded(student, tokens):
    """The logits of a 9-token prefill, then of one token per step (one compiled step)."""
    decode = nnx.jit(lambda m, x, cache, p: m.decode(x, cache, positions=p))
    positions = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
    cache = init_cache(student.config, 2, 32)
    logits, cache = decode(student, tokens[:, :9], cache, positions[:, :9])
    steps = [logits]
    for t in range(9, SEQ):
        logits, cache = decode(student, tokens[:, t : t + 1], cache, positions[:, t : t + 1])
        steps.append(logits)
    return np.concatenate(steps, axis=1)


def test_discrete_mamba2_with_zero_steps_is_decayed_linear_attention_of_the_teacher():
    """a = 0 gives the decay exp(-softplus(0)) = 1/2 per step, and with an identity conv
    y_t = sum_s (q_t . k_s) 2^(s-t) v_s + D v_t per head from the teacher's projections."""
    teacher = _teacher(1)
    config = student_config(TEACHER, "discrete_mamba2", chunk_size=8)
    student = transfer(teacher, config, rngs=nnx.Rngs(2), conv="identity")
    mixer = student.layers[1].mixer
    heads, d = config.heads, config.inner_size
    mixer.in_proj[...] = mixer.in_proj[...].at[:, -heads:].set(0.0)  # the step rows a
    _randomize(mixer.D, 3)
    _randomize(mixer.z_bias, 4)
    u = _inputs(5)
    got = _run_mixer(mixer, u)

    q, k, v = _teacher_qkv(teacher.layers[1].attn, u)
    k, v = _gqa(k, heads), _gqa(v, heads)
    t = np.arange(SEQ)
    decay = np.where(t[None, :] <= t[:, None], 2.0 ** (t[None, :] - t[:, None]), 0.0)  # [t, s]
    scores = np.einsum("bthn,bshn->bhts", q, k) * decay
    y = np.einsum("bhts,bshp->bthp", scores, v) + _f64(mixer.D[...])[:, None] * v
    in_proj = _f64(mixer.in_proj[...])
    z = u @ in_proj[:, 3 * d : 4 * d] + _f64(mixer.z_bias[...])  # [x B C | z | a], N = P
    o = _f64(teacher.layers[1].attn.o_proj[...]).reshape(d, -1)
    want = (y.reshape(2, SEQ, d) * _silu(z)) @ o
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mamba2_layer_is_its_recurrence_over_the_teachers_weights():
    """in_proj [z | x B C | dt] with x <- V, B <- K (repeated per head), C <- Q; conv + SiLU on
    x B C; h = exp(dt A) h + dt x B^T, y = h C + D x per head; out = O (RMSNorm(y * silu(z)))."""
    teacher = _teacher(6)
    config = student_config(TEACHER, "mamba2", chunk_size=8)
    student = transfer(teacher, config, rngs=nnx.Rngs(7))
    mixer = student.layers[2].mixer
    for i, name in enumerate(("D", "conv_bias")):
        _randomize(getattr(mixer, name), 8 + i)
    _randomize(mixer.norm.scale, 10)
    u = _inputs(11)
    got = _run_mixer(mixer, u)

    heads, p, d = config.heads, config.head_dim, config.inner_size
    q, k, v = _teacher_qkv(teacher.layers[2].attn, u)
    in_proj = _f64(mixer.in_proj[...])
    z, dt = u @ in_proj[:, :d], u @ in_proj[:, 4 * d :]  # the fresh rows: gate and step
    parts = (_gqa(v, heads), _gqa(k, heads), q)  # x <- V, B <- K, C <- Q
    xbc = np.concatenate([part.reshape(2, SEQ, d) for part in parts], axis=-1)
    xbc = _silu(_causal_conv(xbc, _f64(mixer.conv_weight[...]), _f64(mixer.conv_bias[...])))
    x, B, C = (part.reshape(2, SEQ, heads, p) for part in np.split(xbc, 3, axis=-1))
    step = _softplus(dt + _f64(mixer.dt_bias[...]))
    A, D = -np.exp(_f64(mixer.A_log[...])), _f64(mixer.D[...])
    h = np.zeros((2, heads, p, p))
    y = np.zeros_like(x)
    for s in range(SEQ):
        decay = np.exp(step[:, s] * A)[:, :, None, None]
        h = decay * h + (step[:, s, :, None] * x[:, s])[..., None] * B[:, s, :, None, :]
        y[:, s] = np.einsum("bhpn,bhn->bhp", h, C[:, s]) + D[:, None] * x[:, s]
    g = y.reshape(2, SEQ, d) * _silu(z)
    g = g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + config.rms_norm_eps)
    g = g * _f64(mixer.norm.scale[...])
    want = g @ _f64(teacher.layers[2].attn.o_proj[...]).reshape(d, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mamba1_qkv_layer_is_a_selective_scan_over_the_teachers_weights():
    """Per channel c = (head h, feature f): x_c = SiLU(conv(v[h // rep, f])), B and C the
    chunk f // N of k[h // rep] and q[h]; h_c = exp(dt_c A_c) h_c + dt_c x_c B, y_c = h_c . C +
    D_c x_c, gated by SiLU(z) and projected by the teacher's O."""
    teacher = _teacher(12)
    config = student_config(TEACHER, "mamba1_qkv", state_size=8, chunk_size=8)
    assert (config.num_groups, config.heads, config.state_size) == (1, 2, 8)
    student = transfer(teacher, config, rngs=nnx.Rngs(13))
    mixer = student.layers[0].mixer
    for i, name in enumerate(("D", "conv_bias")):
        _randomize(getattr(mixer, name), 14 + i)
    u = _inputs(16)
    got = _run_mixer(mixer, u)

    heads, p, n, d = config.heads, config.head_dim, config.state_size, config.inner_size
    rep = heads // config.num_groups
    q, k, v = _teacher_qkv(teacher.layers[0].attn, u)
    in_proj = _f64(mixer.in_proj[...])
    z, dt_low = u @ in_proj[:, :d], u @ in_proj[:, -config.dt_rank :]
    x = np.zeros((2, SEQ, d))
    B, C = np.zeros((2, SEQ, d, n)), np.zeros((2, SEQ, d, n))
    for h in range(heads):
        for f in range(p):
            c, chunk = h * p + f, slice(f // n * n, f // n * n + n)
            x[:, :, c] = v[:, :, h // rep, f]
            B[:, :, c], C[:, :, c] = k[:, :, h // rep, chunk], q[:, :, h, chunk]
    x = _silu(_causal_conv(x, _f64(mixer.conv_weight[...]), _f64(mixer.conv_bias[...])))
    delta = _softplus(dt_low @ _f64(mixer.dt_proj[...]) + _f64(mixer.dt_bias[...]))
    A, D = -np.exp(_f64(mixer.A_log[...])), _f64(mixer.D[...])
    state = np.zeros((2, d, n))
    y = np.zeros_like(x)
    for s in range(SEQ):
        state = np.exp(delta[:, s, :, None] * A) * state
        state = state + (delta[:, s] * x[:, s])[..., None] * B[:, s]
        y[:, s] = np.sum(state * C[:, s], axis=-1) + D * x[:, s]
    want = (y * _silu(z)) @ _f64(teacher.layers[0].attn.o_proj[...]).reshape(d, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_mamba1_qkv_with_full_head_state_is_linear_attention_at_zero_decay():
    """N = head_dim, A -> 0, a constant unit step, identity conv and D = 0: channel f of head h
    is sum_s (q_t . k_s) SiLU(v_s[f]) (per-head causal linear attention), then gate and O."""
    teacher = _teacher(17)
    config = student_config(TEACHER, "mamba1_qkv", chunk_size=8)
    assert config.state_size == TEACHER.head_dim == 16  # the authors' 16 divides the head
    student = transfer(teacher, config, rngs=nnx.Rngs(18), conv="identity")
    mixer = student.layers[1].mixer
    d = config.inner_size
    mixer.A_log[...] = jnp.full(mixer.A_log[...].shape, -40.0)  # A = -exp(-40): no decay
    mixer.dt_proj[...] = jnp.zeros(mixer.dt_proj[...].shape)
    mixer.dt_bias[...] = jnp.full((d,), float(np.log(np.e - 1.0)))  # softplus = 1
    mixer.D[...] = jnp.zeros((d,))
    u = _inputs(20)
    got = _run_mixer(mixer, u)

    q, k, v = _teacher_qkv(teacher.layers[1].attn, u)
    k, v = _gqa(k, config.heads), _gqa(v, config.heads)
    mask = np.tril(np.ones((SEQ, SEQ)))
    y = np.einsum("bthn,bshn,ts,bshp->bthp", q, k, mask, _silu(v)).reshape(2, SEQ, d)
    z = u @ _f64(mixer.in_proj[...])[:, :d]
    want = (y * _silu(z)) @ _f64(teacher.layers[1].attn.o_proj[...]).reshape(d, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", TRANSFER_MIXERS)
def test_copied_parts_are_bitwise_the_teachers(mixer):
    teacher = _teacher(21)
    config = student_config(TEACHER, mixer, attention_layers=(1,))
    student = transfer(teacher, config, rngs=nnx.Rngs(22))

    def same(a, b):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))

    same(student.embed, teacher.embed)
    same(student.lm_head, teacher.lm_head)
    same(student.final_norm.scale, teacher.final_norm.scale)
    kept = jax.tree.leaves(nnx.state(student.layers[1], nnx.Param))
    source = jax.tree.leaves(nnx.state(teacher.layers[1], nnx.Param))
    assert len(kept) == len(source) == 9
    for a, b in zip(kept, source, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for i in (0, 2):
        block, layer = student.layers[i], teacher.layers[i]
        same(block.input_norm.scale, layer.input_norm.scale)
        same(block.post_mixer_norm.scale, layer.post_attention_norm.scale)
        for name in ("gate_proj", "up_proj", "down_proj"):
            same(getattr(block.mlp, name), getattr(layer.mlp, name))
        np.testing.assert_array_equal(
            np.asarray(block.mixer.out_proj[...]),
            np.asarray(layer.attn.o_proj[...]).reshape(config.inner_size, -1),
        )


def test_a_hybrid_that_keeps_every_attention_layer_is_the_teacher():
    teacher = _teacher(23)
    layers = hybrid_layers(TEACHER.num_layers, 1.0)
    assert layers == (0, 1, 2)
    student = transfer(teacher, student_config(TEACHER, "mamba2", layers), rngs=nnx.Rngs(24))
    tokens = jnp.asarray(np.random.default_rng(25).integers(0, 41, (2, SEQ)))
    np.testing.assert_array_equal(np.asarray(student(tokens)), np.asarray(teacher(tokens)))


@pytest.mark.parametrize("mixer", TRANSFER_MIXERS)
def test_cached_decoding_of_a_transferred_student_equals_its_full_forward(mixer):
    """A hybrid (Mamba layers 0 and 1, attention at 2): prefill, then one token per step."""
    teacher = _teacher(26)
    layers = hybrid_layers(TEACHER.num_layers, 1 / 3)
    assert layers == (2,)
    config = student_config(TEACHER, mixer, layers, chunk_size=8)
    student = transfer(teacher, config, rngs=nnx.Rngs(27))
    tokens = jnp.asarray(np.random.default_rng(28).integers(0, 41, (2, SEQ)))
    np.testing.assert_allclose(_decoded(student, tokens), _logits(student, tokens), atol=1e-5)


# A DenseFormer (2x1 DWAs: each average reads every other representation) with hash-bucket
# sparse attention: what a Mamba student carries over (MambaConfig.dwa, sparse_attention).
DENSE_SPARSE = dataclasses.replace(
    TEACHER,
    dwa=DWAConfig(dilation=2, period=1),
    sparse_attention=SparseAttentionConfig(kind="hash", num_buckets=4, seed=3),
)


def test_a_densformer_sparse_hybrid_that_keeps_every_attention_layer_is_the_teacher():
    teacher = _teacher(40, DENSE_SPARSE)
    config = student_config(DENSE_SPARSE, "mamba2", (0, 1, 2))
    assert config.dwa == DENSE_SPARSE.dwa
    assert config.sparse_attention == DENSE_SPARSE.sparse_attention
    student = transfer(teacher, config, rngs=nnx.Rngs(41))
    for a, b in zip(student.dwa.weights, teacher.dwa.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    tokens = jnp.asarray(np.random.default_rng(42).integers(0, 41, (2, SEQ)))
    want = np.asarray(teacher(tokens))
    # The sparse attention and the averages change what the teacher computes: without them the
    # same weights give other logits (so the equality below is not vacuous).
    plain = Transformer(TEACHER, rngs=nnx.Rngs(0))
    weights = nnx.state(teacher, nnx.Param)
    nnx.update(plain, nnx.State({k: v for k, v in weights.items() if k != "dwa"}))
    assert np.abs(np.asarray(plain(tokens)) - want).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(student(tokens)), want)


def test_a_densformer_hybrid_student_averages_its_blocks_outputs():
    """Mamba layers 0 and 1, attention (hash-sparse) at 2; the logits against the DWA formula
    in float64 over the student's own blocks: Y_i = sum_j alpha_ij X_j, X_i = block_i(Y_{i-1})."""
    teacher = _teacher(43, DENSE_SPARSE)
    config = student_config(DENSE_SPARSE, "mamba2", (2,), chunk_size=8)
    assert config.sparse_attention == DENSE_SPARSE.sparse_attention
    student = transfer(teacher, config, rngs=nnx.Rngs(44))
    for i, w in enumerate(student.dwa.weights):  # random averages, not the identity start
        _randomize(w, 45 + i)
    tokens = jnp.asarray(np.random.default_rng(46).integers(0, 41, (2, SEQ)))
    positions = jnp.broadcast_to(jnp.arange(SEQ), (2, SEQ))
    xs = [_f64(student.embed[...])[np.asarray(tokens)]]
    ys = [xs[0]]
    for i, layer in enumerate(student.layers):
        out = layer(jnp.asarray(ys[-1], jnp.float32), positions, None, None)[0]
        xs.append(_f64(out))
        weights = _f64(student.dwa.weights[i][...])
        ys.append(
            sum(a * xs[j] for a, j in zip(weights, range((i + 1) % 2, i + 2, 2), strict=True))
        )
    y = ys[-1]
    norm = y / np.sqrt(np.mean(y**2, -1, keepdims=True) + config.rms_norm_eps)
    want = (norm * _f64(student.final_norm.scale[...])) @ _f64(student.lm_head[...])
    logits, hidden = student(tokens, return_hidden=True)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-4)
    # The hidden states: X_i the blocks' outputs, Y_i the averages the next block reads.
    for got, ref in ((hidden.residuals, xs), (hidden.averaged, ys)):
        assert len(got) == len(ref) == config.num_layers + 1
        for a, b in zip(got, ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mixer", ("mamba2", "discrete_mamba2"))
def test_cached_decoding_of_a_densformer_sparse_hybrid_equals_its_full_forward(mixer):
    teacher = _teacher(47, DENSE_SPARSE)
    config = student_config(DENSE_SPARSE, mixer, (1,), chunk_size=8)
    student = transfer(teacher, config, rngs=nnx.Rngs(48))
    tokens = jnp.asarray(np.random.default_rng(49).integers(0, 41, (2, SEQ)))
    np.testing.assert_allclose(_decoded(student, tokens), _logits(student, tokens), atol=1e-5)


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory):
    """A tiny random Hugging Face Llama (tied head, llama3 RoPE, 4 heads on 1 kv head)."""
    path = str(tmp_path_factory.mktemp("hf_llama"))
    make_hf_model("llama3_rope_tied", seed=29).save_pretrained(path)
    return load_hf_llama(path)


@pytest.mark.parametrize("mixer", TRANSFER_MIXERS)
def test_hf_llama_student_round_trips_through_an_engine_checkpoint(hf_teacher, mixer, tmp_path):
    """load_hf_llama -> transfer -> the engine's run layout (model_config.json and a checkpoint)
    -> the engine's ``run:`` loader -> identical logits."""
    config = student_config(hf_teacher.config, mixer, attention_layers=(1,))
    student = transfer(hf_teacher, config, rngs=nnx.Rngs(30))
    tokens = jnp.asarray(np.random.default_rng(31).integers(0, 97, (2, SEQ)))
    want = np.asarray(_logits(student, tokens))

    workdir = str(tmp_path)
    write_model_config(workdir, config)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
    params = nnx.to_pure_dict(nnx.state(student, nnx.Param))
    checkpointer.save(5, {"params": params}, {}, {"model": config.to_dict()})
    checkpointer.close()

    source = parse_source(f"run:{workdir}")
    reloaded_config = source_model_config(source)
    assert reloaded_config == config
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: models.build(reloaded_config, nnx.Rngs(0))), nnx.Param
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        nnx.to_pure_dict(state),
    )
    restored, report = load_params(source, abstract)
    assert not report["kept"] and not report["unused"]
    nnx.replace_by_pure_dict(state, restored)
    reloaded = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(_logits(reloaded, tokens)), want)


def test_hybrid_layers_spread_attention_as_mambainllama_does():
    assert hybrid_layers(28, 0.5) == tuple(range(1, 28, 2))
    assert hybrid_layers(32, 0.25) == (3, 7, 11, 15, 19, 23, 27, 31)
    assert hybrid_layers(16, 0.25) == (3, 7, 11, 15)  # MambaInLlama 1B: 4 of 16
    assert hybrid_layers(28, 6 / 28) == (3, 8, 13, 17, 22, 27)  # 3B: 6 of 28, evenly spread
    assert hybrid_layers(4, 0.0) == () and hybrid_layers(4, 1.0) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        hybrid_layers(4, 1.5)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        hybrid_layers(0, 0.5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"attention_layers \[3\] are not layers of the teacher's"):
        student_config(TEACHER, "mamba2", attention_layers=(0, 3))
    with pytest.raises(ValueError, match=r"mixer must be one of .* got 's4'"):
        student_config(TEACHER, "s4")
    with pytest.raises(ValueError, match="'mamba1_qkv' is the Mamba-1 mixer attention maps onto"):
        student_config(TEACHER, "mamba1")
    with pytest.raises(ValueError, match="state_size must be a positive int dividing"):
        student_config(TEACHER, "mamba1_qkv", state_size=12)
    with pytest.raises(ValueError, match="state_size must be None or 16, got 8"):
        student_config(TEACHER, "mamba2", state_size=8)
    biased = dataclasses.replace(TEACHER, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=True"):
        student_config(biased, "mamba2", attention_layers=(1,))
    student_config(biased, "mamba2", attention_layers=(0, 1, 2))  # all attention: nothing to map
    with pytest.raises(ValueError, match="teacher layer_widths=.* has no counterpart"):
        student_config(dataclasses.replace(TEACHER, layer_widths=(1, 2, 1)))
    # A pure student has no attention layer to keep the teacher's sparse attention in.
    assert student_config(DENSE_SPARSE, "mamba2").sparse_attention is None
    with pytest.raises(ValueError, match="sparse_attention applies to attention layers"):
        dataclasses.replace(
            student_config(DENSE_SPARSE, "mamba2"),
            sparse_attention=DENSE_SPARSE.sparse_attention,
        )
    # A student without the teacher's averages cannot take its weights.
    dense = student_config(DENSE_SPARSE, "mamba2", (1,))
    with pytest.raises(ValueError, match=r"student_config.dwa=None .* needs DWAConfig"):
        transfer(
            Transformer(DENSE_SPARSE, rngs=nnx.Rngs(0)),
            dataclasses.replace(dense, dwa=None),
            rngs=nnx.Rngs(0),
        )
    assert MambaConfig.from_dict(dense.to_dict()) == dense  # JSON round trip of the nested configs

    teacher = Transformer(TEACHER, rngs=nnx.Rngs(0))
    config = student_config(TEACHER, "mamba2")
    # Widths that cannot map: a student whose heads are not the teacher's.
    narrow = dataclasses.replace(config, head_dim=8, state_size=8, num_groups=4)
    with pytest.raises(ValueError, match=r"student_config.state_size=8 .* needs 16"):
        transfer(teacher, narrow, rngs=nnx.Rngs(0))
    wide = dataclasses.replace(config, inner_size=64, num_groups=4)
    with pytest.raises(ValueError, match=r"student_config.inner_size=64 .* needs 32"):
        transfer(teacher, wide, rngs=nnx.Rngs(0))
    other = dataclasses.replace(config, hidden_size=48)
    with pytest.raises(ValueError, match=r"student_config.hidden_size=48 .* needs 32"):
        transfer(teacher, other, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mixer must be one of"):
        transfer(teacher, dataclasses.replace(config, mixer="mamba1"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"conv must be one of \('fresh', 'identity'\)"):
        transfer(teacher, config, rngs=nnx.Rngs(0), conv="zeros")
    with pytest.raises(ValueError, match="teacher must be a jaxlab Transformer"):
        transfer(models.build(config, nnx.Rngs(0)), config, rngs=nnx.Rngs(0))


def test_hybrid_layers_rounds_half_up_and_refuses_an_empty_hybrid():
    assert hybrid_layers(6, 0.25) == (2, 5)  # 1.5 layers round up to 2, evenly spaced
    assert hybrid_layers(10, 0.25) == (2, 5, 9)  # 2.5 round up to 3 (not to the even 2)
    with pytest.raises(ValueError, match="keeps no attention layer"):
        hybrid_layers(2, 0.2)
    assert hybrid_layers(2, 0.0) == ()
