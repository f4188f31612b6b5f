"""Mamba and hybrid students initialised from a Llama-family teacher (attention -> SSM transfer).

:func:`student_config` derives a :class:`~jaxlab.models.mamba.MambaConfig` from the teacher's
:class:`~jaxlab.models.transformer.TransformerConfig` (same width, vocabulary, MLP, norms, head
tying, attention settings); :func:`transfer` builds that student with the teacher's embeddings,
MLPs, norms, final norm and head, the teacher's whole blocks at ``attention_layers``, and every
other layer's mixer initialised from that layer's attention, after MambaInLlama (Wang et al.
2024): ``V -> x``, ``K -> B``, ``Q -> C``, ``O -> out_proj``, kv heads repeated per query head as
grouped-query attention repeats them. With a decay of 1 and a unit step the recurrence unrolls to
``y_t = sum_{s<=t} (C_t . B_s) x_s``, i.e. causal linear attention with the teacher's q, k, v:
softmax, its normalisation, the ``1/sqrt(head_dim)`` scale and RoPE are dropped. What has no
counterpart in attention starts fresh (the mixer's own initialisation): the gate z, the step
(dt / a) path, A, D, the conv (or an identity conv, ``conv="identity"``) and mamba2's gated norm.

Per mixer (teacher: ``H`` query heads, ``K`` kv heads, head width ``P``):

* ``mamba2`` (MambaInLlama's Mamba-2): ``H`` heads of ``P`` channels, state ``N = P``, one B/C
  group per head (``num_groups = H``); K and V rows repeated to ``H`` heads.
* ``discrete_mamba2`` (Llamba's mixer, shaped so that attention maps onto it): ``H`` heads of
  ``P`` channels, state ``P``, one B/C per head; K and V repeated.
* ``mamba1_qkv`` (MambaInLlama's Mamba-1): ``H`` query heads of ``P`` channels, ``num_groups = K``
  x/B heads (repeated inside the mixer), B/C chunks of ``state_size`` (the authors' 16 when it
  divides ``P``, else ``P``), a per-channel low-rank dt from the block input.

Placement: :func:`hybrid_layers` keeps attention at evenly spaced layers ending at the last one,
as MambaInLlama's released hybrids do (50%: the odd layers 1, 3, ...; 25%: 3, 7, ...).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxlab.models.mamba import MambaConfig, MambaLM
from jaxlab.models.transformer import Transformer, TransformerConfig

# The mixers an attention layer maps onto; ``mamba1`` computes x/B/C from its conv output.
TRANSFER_MIXERS = ("mamba2", "discrete_mamba2", "mamba1_qkv")
CONV_INITS = ("fresh", "identity")
# Teacher features a MambaLM student cannot carry (they change what the blocks compute). A
# DenseFormer's depth-weighted averages and sparse attention carry over (MambaConfig.dwa and
# sparse_attention: the averages over the student's blocks, the sparse attention in its kept
# attention layers).
_UNSUPPORTED = ("layer_widths", "parallel_groups")


def hybrid_layers(num_layers: int, fraction: float) -> tuple[int, ...]:
    """The layers that keep attention in a hybrid with ``fraction`` of ``num_layers`` attention.

    ``round(fraction * num_layers)`` evenly spaced layers, the last one included: layer
    ``(i + 1) * num_layers // count - 1`` for ``i < count``. For 0.5 these are the odd layers,
    for 0.25 every fourth from layer 3, as in MambaInLlama's released hybrids (attention spread
    over the depth, the last layer kept so that the head reads an attention block's output).

    Raises:
      ValueError: ``num_layers`` not a positive int or ``fraction`` outside ``[0, 1]``.
    """
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"hybrid_layers: num_layers must be a positive int, got {num_layers!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hybrid_layers: fraction must be in [0, 1], got {fraction!r}")
    count = math.floor(fraction * num_layers + 0.5)  # half rounds up (not to even)
    if fraction > 0 and count == 0:
        raise ValueError(
            f"hybrid_layers: fraction={fraction} of num_layers={num_layers} keeps no attention "
            "layer; use fraction=0 for a pure Mamba student"
        )
    return tuple((i + 1) * num_layers // count - 1 for i in range(count))


def _check_teacher(teacher_config) -> None:
    if not isinstance(teacher_config, TransformerConfig):
        raise ValueError(
            "transfer: the teacher must be a Llama-family TransformerConfig / Transformer, got "
            f"{type(teacher_config).__name__}"
        )
    for field in _UNSUPPORTED:
        if getattr(teacher_config, field) is not None:
            raise ValueError(
                f"transfer: teacher {field}={getattr(teacher_config, field)!r} has no "
                "counterpart in a Mamba student; transfer from a plain Llama teacher"
            )


def _check_mixer(mixer: str) -> None:
    if mixer not in TRANSFER_MIXERS:
        hint = (
            " ('mamba1' computes x, B and C from its conv output; 'mamba1_qkv' is the Mamba-1 "
            "mixer attention maps onto)"
            if mixer == "mamba1"
            else ""
        )
        raise ValueError(f"transfer: mixer must be one of {TRANSFER_MIXERS}, got {mixer!r}{hint}")


def student_config(
    teacher_config: TransformerConfig,
    mixer: str = "mamba2",
    attention_layers=(),
    *,
    state_size: int | None = None,
    conv_kernel: int = 4,
    dt_rank: int | None = None,
    chunk_size: int = 64,
    scan_impl: str = "auto",
) -> MambaConfig:
    """The :class:`MambaConfig` whose Mamba layers take the teacher's attention weights.

    Args:
      teacher_config: a Llama-family config, a DenseFormer's and sparse attention included (the
        student keeps the depth-weighted averages, and the sparse attention in its attention
        layers); not Layer Parallelism's parallel layers.
      mixer: one of :data:`TRANSFER_MIXERS`.
      attention_layers: teacher layers kept as attention blocks (e.g. :func:`hybrid_layers`).
      state_size: ``mamba1_qkv`` only (the others' state is the head width): the B/C chunk,
        dividing the teacher's ``head_dim``; default 16 (the authors') if it divides it, else
        ``head_dim``.
      conv_kernel, dt_rank, chunk_size, scan_impl: the mixer's (see :class:`MambaConfig`).

    Raises:
      ValueError: naming the argument, the expectation and the value (unknown mixer, layers out
        of range, a state size that does not divide the head width, a teacher with attention
        biases, which the bias-free mixer projections cannot hold, or unsupported features).
    """
    t = teacher_config
    _check_teacher(t)
    _check_mixer(mixer)
    layers = tuple(attention_layers)
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < t.num_layers]
    if bad:
        raise ValueError(
            f"student_config: attention_layers {bad} are not layers of the teacher's "
            f"0..{t.num_layers - 1}"
        )
    if t.attention_bias and len(set(layers)) < t.num_layers:
        raise ValueError(
            "student_config: the teacher has attention_bias=True, and the Mamba mixers' "
            "projections have no biases to take the q/k/v/o biases; keep every layer as "
            f"attention or use a bias-free teacher (attention_layers={layers})"
        )
    p = t.head_dim
    if mixer == "mamba1_qkv":
        if state_size is None:
            state_size = 16 if p % 16 == 0 else p
        if not isinstance(state_size, int) or state_size < 1 or p % state_size:
            raise ValueError(
                f"student_config: state_size must be a positive int dividing the teacher's "
                f"head_dim={p} (mamba1_qkv cuts each head's q/k into state_size chunks), got "
                f"{state_size!r}"
            )
        groups = t.num_kv_heads
    else:
        if state_size not in (None, p):
            raise ValueError(
                f"student_config: {mixer}'s state is the teacher's head_dim={p} (B <- K and "
                f"C <- Q per head); state_size must be None or {p}, got {state_size!r}"
            )
        state_size = p
        groups = t.num_heads if mixer == "mamba2" else 1
    return MambaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        num_layers=t.num_layers,
        intermediate_size=t.intermediate_size,
        mixer=mixer,
        inner_size=t.num_heads * p,
        state_size=state_size,
        conv_kernel=conv_kernel,
        dt_rank=dt_rank,
        head_dim=p,
        num_groups=groups,
        chunk_size=chunk_size,
        scan_impl=scan_impl,
        attention_layers=tuple(sorted(set(layers))),
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        attention_head_dim=p,
        rope_theta=t.rope_theta,
        rope_scaling=t.rope_scaling,
        attention_bias=t.attention_bias,
        mlp_bias=t.mlp_bias,
        sliding_window=t.sliding_window,
        sparse_attention=t.sparse_attention if layers else None,
        dwa=t.dwa,
        max_seq_len=t.max_seq_len,
        rms_norm_eps=t.rms_norm_eps,
        tie_embeddings=t.tie_embeddings,
        initializer_range=t.initializer_range,
        param_dtype=t.param_dtype,
        dtype=t.dtype,
        remat=t.remat,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
    )


def _check_fit(t: TransformerConfig, s: MambaConfig) -> None:
    """Every field the weight copy relies on agrees between teacher and student."""
    wanted = student_config(
        t,
        s.mixer,
        s.attention_layers,
        state_size=s.state_size if s.mixer == "mamba1_qkv" else None,
    )
    mapped = (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "intermediate_size",
        "inner_size",
        "state_size",
        "head_dim",
        "num_groups",
        "num_heads",
        "num_kv_heads",
        "attention_head_dim",
        "attention_bias",
        "mlp_bias",
        "tie_embeddings",
        "rope_theta",
        "rope_scaling",
        "sliding_window",
        "sparse_attention",
        "dwa",
        "rms_norm_eps",
    )
    for field in mapped:
        have, want = getattr(s, field), getattr(wanted, field)
        if have != want:
            raise ValueError(
                f"transfer: student_config.{field}={have!r} cannot take the teacher's weights; "
                f"the {s.mixer} mapping needs {want!r} (derive it with student_config)"
            )


def _set(variable, value) -> None:
    """Assigns ``value`` to a parameter, in the parameter's dtype and shape."""
    old = variable[...]
    variable[...] = jnp.asarray(value, old.dtype).reshape(old.shape)


def _copy_module(target: nnx.Module, source: nnx.Module) -> None:
    nnx.update(target, nnx.state(source, nnx.Param))


def _init_mixer(mixer, attn, c: MambaConfig, conv: str) -> None:
    """Writes the attention's projections into the mixer's x/B/C rows and out_proj."""
    hidden = c.hidden_size
    q, k, v, o = (getattr(attn, f"{n}_proj")[...] for n in "qkvo")
    rep = c.num_heads // c.num_kv_heads

    def flat(w):  # [hidden, heads, head_dim] -> [hidden, heads * head_dim]
        return w.reshape(hidden, -1)

    def repeated(w):  # kv heads -> query heads, head h reads kv head h // rep (GQA)
        return flat(jnp.repeat(w, rep, axis=1))

    d = c.inner_size
    if c.mixer == "mamba1_qkv":  # [z | x | B | C | dt_low]; the mixer repeats x and B
        kv = c.num_groups * c.head_dim
        blocks = {d: flat(v), d + kv: flat(k), d + 2 * kv: flat(q)}
    elif c.mixer == "mamba2":  # [z | x B C | dt]
        blocks = {d: repeated(v), 2 * d: repeated(k), 3 * d: flat(q)}
    else:  # discrete_mamba2: [x B C | z | a]
        blocks = {0: repeated(v), d: repeated(k), 2 * d: flat(q)}
    w = mixer.in_proj[...]
    for start, block in blocks.items():
        w = w.at[:, start : start + block.shape[1]].set(block.astype(w.dtype))
    mixer.in_proj[...] = w
    _set(mixer.out_proj, o.reshape(d, hidden))
    if conv == "identity":  # the current input's tap: the conv passes x (and B, C) through
        weight = jnp.zeros(mixer.conv_weight[...].shape).at[-1].set(1.0)
        _set(mixer.conv_weight, weight)
        _set(mixer.conv_bias, jnp.zeros(mixer.conv_bias[...].shape))


def transfer(
    teacher: Transformer,
    student_config: MambaConfig,
    *,
    rngs: nnx.Rngs,
    conv: str = "fresh",
) -> MambaLM:
    """A :class:`MambaLM` initialised from ``teacher`` (see the module docstring).

    Args:
      teacher: a Llama-family :class:`Transformer` (e.g. from
        :func:`jaxlab.interop.hf.load_hf_llama`).
      student_config: the student's architecture; :func:`student_config` derives one.
      rngs: the fresh parameters' (z, dt, A, D, conv, gated norm) random streams.
      conv: ``"fresh"``: the mixer's own random conv (MambaInLlama's choice); ``"identity"``: a
        delta on the current input's tap and no bias, so that at initialisation the layer is
        exactly the mixer's recurrence over the teacher's v, k, q.

    Returns:
      The student: embeddings, MLPs, norms, final norm, head and a DenseFormer's depth-weighted
      average weights bitwise the teacher's (same ``param_dtype``), the teacher's whole blocks
      at ``attention_layers``.

    Raises:
      ValueError: a teacher or student the mapping cannot join, naming the field, the
        expectation and the value.
    """
    if not isinstance(teacher, Transformer):
        raise ValueError(
            f"transfer: teacher must be a jaxlab Transformer, got {type(teacher).__name__}"
        )
    t = teacher.config
    _check_teacher(t)
    if t.scan_layers:
        raise ValueError(
            "transfer: the teacher has scan_layers=True (stacked blocks); build it with "
            "scan_layers=False"
        )
    if not isinstance(student_config, MambaConfig):
        raise ValueError(
            f"transfer: student_config must be a MambaConfig, got {type(student_config).__name__}"
        )
    _check_mixer(student_config.mixer)
    if conv not in CONV_INITS:
        raise ValueError(f"transfer: conv must be one of {CONV_INITS}, got {conv!r}")
    _check_fit(t, student_config)
    student = MambaLM(student_config, rngs=rngs)
    _set(student.embed, teacher.embed[...])
    _copy_module(student.final_norm, teacher.final_norm)
    if not t.tie_embeddings:
        _set(student.lm_head, teacher.lm_head[...])
    if t.dwa is not None:
        _copy_module(student.dwa, teacher.dwa)
    for i, (layer, source) in enumerate(zip(student.layers, teacher.layers, strict=True)):
        if i in student_config.attention_layers:
            _copy_module(layer, source)
            continue
        _copy_module(layer.input_norm, source.input_norm)
        _copy_module(layer.post_mixer_norm, source.post_attention_norm)
        _copy_module(layer.mlp, source.mlp)
        _init_mixer(layer.mixer, source.attn, student_config, conv)
    return student
