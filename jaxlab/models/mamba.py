"""Mamba language models: Mamba-1, Mamba-2 and discrete Mamba-2 mixers, pure or hybrid.

A block is ``x + mixer(rmsnorm(x))`` followed, when ``intermediate_size > 0``, by the Llama SwiGLU
MLP ``x + mlp(rmsnorm(x))`` (as in the distilled students, which keep their teacher's MLPs).
Layers listed in ``attention_layers`` are Llama attention blocks instead (a hybrid LM), with
the Transformer's dense or sparse attention. With ``dwa`` the blocks are a DenseFormer's:
depth-weighted averages of the earlier blocks' outputs between them (as a DenseFormer teacher's,
so that a student distilled from one keeps them).

Mixers (``d = inner_size``, ``N = state_size``):
* ``mamba1`` (Gu & Dao 2023): ``in_proj -> (x, z)``; causal depthwise conv + SiLU on x;
  ``x_proj -> (dt_low, B, C)``; ``dt = dt_proj(dt_low)``; the selective scan with
  ``A = -exp(A_log)`` ``[d, N]``, softplus(dt + dt_bias), D skip and SiLU(z) gate; ``out_proj``.
* ``mamba2`` (Dao & Gu 2024): ``in_proj -> (z, x, B, C, dt)``; causal conv + SiLU on (x, B, C);
  SSD with one ``A`` per head and ``groups`` shared B/C; gated RMSNorm ``norm(y * silu(z))``;
  ``out_proj``.
* ``mamba1_qkv`` (MambaInLlama's Mamba-1 variant, Wang et al. 2024): Mamba-1 whose x, B, C are
  linear projections of the block input, shaped like an attention layer's V, K, Q so that they can
  be initialised from one (:mod:`jaxlab.distill.transfer`). ``in_proj -> (z, x, B, C, dt_low)``
  with x and B ``num_groups * head_dim`` wide (the teacher's kv heads) and z, C ``d`` wide
  (``d / head_dim`` query heads); x and B are repeated per head as grouped-query attention
  repeats its kv heads (query head ``h`` reads group ``h // (heads / num_groups)``). B and C are
  cut into chunks of ``N`` features (``N`` divides ``head_dim``): channel ``f`` of head ``h``
  scans with chunk ``f // N`` of head ``h``'s C and of its group's B, so with ``N = head_dim``,
  no decay and a unit step a head is causal linear attention ``y_t = sum_s (C_t . B_s) x_s``
  over its (conv + SiLU) x.
  Causal conv + SiLU on the (repeated) x only; per-channel ``dt = dt_proj(dt_low)`` from the
  block input (low rank ``dt_rank``); the selective scan with ``A = -exp(A_log)`` ``[d, N]``,
  softplus(dt + dt_bias), D skip and SiLU(z) gate; ``out_proj``. The authors' code repeats x and
  B in chunks of ``N`` rather than per head, which pairs a query chunk with another chunk's key
  whenever ``N < head_dim`` and heads share kv heads; here the pairing follows the heads.
* ``discrete_mamba2`` (Llamba / MOHAWK): ``in_proj -> (x, B, C, z, a)`` with one B/C per head;
  conv without activation; ``h_t = exp(-softplus(a_t)) h_{t-1} + x_t B_t^T`` (the input is not
  scaled by the step), ``y = h C + D x``; ``out_proj(y * silu(z + z_bias))``.

Calling conventions: those of every family (:class:`~jaxlab.models.interface.LanguageModel`).
Decoding: ``model.decode(tokens, cache)`` with a cache from :func:`init_cache` runs the same scan
from the cached state (any number of tokens at once: a prompt, then one token per step) and
returns ``(logits, cache)``; the conv keeps its last ``conv_kernel - 1`` inputs. The cache is the
:class:`~jaxlab.models.interface.Cache` every family uses: a :class:`MixerCache` per Mamba layer
and, for the attention layers of a hybrid, a :class:`LayerCache` as the Transformer's. Packed
documents (``segment_ids``) are isolated in attention layers only: the recurrence runs across
document boundaries, as in Mamba's own packed pretraining.

Internals: ``return_hidden=True`` (or ``return_attention=True``) appends ``hidden`` to the result,
``(logits, hidden)`` or ``(logits, cache, hidden)`` from ``decode``, ``hidden`` a
:class:`~jaxlab.models.layers.HiddenStates` with the residual stream after every layer and, with
``return_attention``, the probabilities of the attention layers (``None`` for Mamba layers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab.models.denseformer import DepthWeightedAverages, DWAConfig, run_blocks
from jaxlab.models.interface import (
    Cache,
    LanguageModel,
    LayerCache,
    MixerCache,
    checked_positions,
    config_values,
)
from jaxlab.models.layers import (
    HiddenStates,
    RMSNorm,
    RopeScaling,
    logical_param,
    matmul,
    param,
)
from jaxlab.models.partitioning import constrain, mesh_parts, per_shard
from jaxlab.models.sparse_attention import SparseAttentionConfig
from jaxlab.models.transformer import DTYPES, Block, TransformerConfig, canonical_dtype
from jaxlab.ops import scan as scan_ops
from jaxlab.ops import ssm_matrix

MIXERS = ("mamba1", "mamba1_qkv", "mamba2", "discrete_mamba2")


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """Architecture of a Mamba or hybrid LM.

    Attributes:
      vocab_size, hidden_size, num_layers: as the Transformer's.
      intermediate_size: SwiGLU MLP width after each mixer; 0 = no MLP (original Mamba).
      mixer: one of :data:`MIXERS` (``mamba1``, ``mamba1_qkv``, ``mamba2``,
        ``discrete_mamba2``).
      inner_size: mixer width ``d``; default ``expand * hidden_size``.
      expand: default inner width multiple.
      state_size: SSM state per channel (mamba1s) or per head (mamba2s); mamba1_qkv: the width
        of the B/C chunks, dividing ``head_dim``.
      conv_kernel: causal depthwise conv width.
      dt_rank: the mamba1s' low-rank dt projection; default ``ceil(hidden_size / 16)``.
      head_dim: mamba2s and mamba1_qkv: channels per head (``inner_size % head_dim == 0``).
      num_groups: mamba2: B/C groups (divides the heads); discrete_mamba2 uses one per head;
        mamba1_qkv: the x/B heads (kv heads; divides the heads).
      chunk_size: chunk of the chunked scans.
      scan_impl: :mod:`jaxlab.ops.scan` implementation.
      attention_layers: indices of layers that are Llama attention blocks (a hybrid).
      num_heads, num_kv_heads, attention_head_dim, rope_theta, rope_scaling, attention_bias,
        sliding_window, max_seq_len: those blocks' attention, as the Transformer's fields (so a
        hybrid made from a Llama teacher computes the teacher's attention exactly).
      mlp_bias: biases on the projections of every SwiGLU MLP (attention and Mamba blocks).
      sparse_attention: if set, the attention layers' dynamic sparse attention, as the
        Transformer's field (a hybrid of a sparse-attention teacher keeps its layers' hashes:
        each attention block keeps its layer index); needs ``attention_layers``.
      dwa: if set, depth-weighted averages between the blocks (a DenseFormer hybrid, as the
        Transformer's field; :mod:`jaxlab.models.denseformer`), Mamba and attention blocks alike.
      rms_norm_eps, tie_embeddings, initializer_range, param_dtype, dtype, remat: as the
        Transformer's.
      bos_token_id: beginning-of-sequence id, kept for checkpoint round trips.
      eos_token_id: end-of-sequence id(s); :func:`jaxlab.infer.generate` stops a row at one
        by default.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int = 0
    mixer: str = "mamba1"
    inner_size: int | None = None
    expand: int = 2
    state_size: int = 16
    conv_kernel: int = 4
    dt_rank: int | None = None
    head_dim: int = 64
    num_groups: int = 1
    chunk_size: int = 64
    scan_impl: str = "auto"
    attention_layers: tuple[int, ...] = ()
    num_heads: int = 8
    num_kv_heads: int | None = None
    attention_head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    sparse_attention: SparseAttentionConfig | None = None
    dwa: DWAConfig | None = None
    max_seq_len: int = 2048
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    name: str = "mamba"

    def __post_init__(self):
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            object.__setattr__(self, "rope_scaling", RopeScaling(**dict(self.rope_scaling)))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for field in ("bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            ids = value if isinstance(value, tuple) and field == "eos_token_id" else (value,)
            if value is not None and not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(
                    f"MambaConfig.{field} must be a non-negative int"
                    f"{' or a tuple of them' if field == 'eos_token_id' else ''}"
                    f" or None, got {value!r}"
                )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(
                f"MambaConfig.sliding_window must be an int >= 1 or None, got "
                f"{self.sliding_window!r}"
            )
        if self.dwa is not None and not isinstance(self.dwa, DWAConfig):
            object.__setattr__(self, "dwa", DWAConfig(**dict(self.dwa)))
        sparse = self.sparse_attention
        if sparse is not None and not isinstance(sparse, SparseAttentionConfig):
            object.__setattr__(self, "sparse_attention", SparseAttentionConfig(**dict(sparse)))
        if self.sparse_attention is not None and not self.attention_layers:
            raise ValueError(
                "MambaConfig.sparse_attention applies to attention layers, and attention_layers "
                f"is empty; got sparse_attention={self.sparse_attention}"
            )
        if self.inner_size is None:
            object.__setattr__(self, "inner_size", self.expand * self.hidden_size)
        if self.dt_rank is None:
            object.__setattr__(self, "dt_rank", math.ceil(self.hidden_size / 16))
        layers = tuple(int(i) for i in self.attention_layers)
        object.__setattr__(self, "attention_layers", layers)
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "inner_size",
            "state_size",
            "conv_kernel",
            "dt_rank",
            "head_dim",
            "num_groups",
            "chunk_size",
        )
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{field} must be a positive int, got {value!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"MambaConfig.mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.mixer != "mamba1":
            if self.inner_size % self.head_dim:
                raise ValueError(
                    f"MambaConfig.head_dim={self.head_dim} must divide inner_size={self.inner_size}"
                )
            heads = self.inner_size // self.head_dim
            if self.mixer in ("mamba2", "mamba1_qkv") and heads % self.num_groups:
                raise ValueError(
                    f"MambaConfig.num_groups={self.num_groups} must divide the {heads} heads"
                )
            if self.mixer == "mamba1_qkv" and self.head_dim % self.state_size:
                raise ValueError(
                    f"MambaConfig.state_size={self.state_size} must divide head_dim="
                    f"{self.head_dim} (mamba1_qkv cuts each head's B/C into state_size chunks)"
                )
        bad = [i for i in self.attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"MambaConfig.attention_layers {bad} are not layers of 0..{self.num_layers - 1}"
            )
        if self.attention_layers and self.intermediate_size < 1:
            raise ValueError(
                "MambaConfig: attention_layers need intermediate_size > 0 (Llama "
                "blocks have an MLP)"
            )
        if self.scan_impl not in scan_ops.available_impls():
            raise ValueError(
                f"MambaConfig.scan_impl must be one of {scan_ops.available_impls()}, "
                f"got {self.scan_impl!r}"
            )
        for field in ("param_dtype", "dtype"):  # canonical names: configs stay JSON and compare
            value = canonical_dtype(getattr(self, field), f"MambaConfig.{field}")
            object.__setattr__(self, field, value)
        if self.attention_layers:
            self.attention_config()  # the attention blocks' own checks (heads, head_dim, ...)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MambaConfig:
        values = config_values(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def heads(self) -> int:
        """SSM heads of the mamba2 mixers (query heads of mamba1_qkv)."""
        return self.inner_size // self.head_dim

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    def attention_config(self) -> TransformerConfig:
        """The Llama configuration of this model's attention blocks."""
        return TransformerConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.attention_head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
            sliding_window=self.sliding_window,
            sparse_attention=self.sparse_attention,
            max_seq_len=self.max_seq_len,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            param_dtype=self.param_dtype,
            dtype=self.dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )


def _is_mamba1(c: MambaConfig) -> bool:
    """Whether the mixer is a Mamba-1 selective scan (a state per channel)."""
    return c.mixer in ("mamba1", "mamba1_qkv")


def _conv_channels(c: MambaConfig) -> int:
    if _is_mamba1(c):  # the conv sees x only (mamba1_qkv: after the per-head repeat)
        return c.inner_size
    groups = c.num_groups if c.mixer == "mamba2" else c.heads
    return c.inner_size + 2 * groups * c.state_size


def _ssm_shape(c: MambaConfig, batch: int) -> tuple[int, ...]:
    if _is_mamba1(c):
        return (batch, c.inner_size, c.state_size)
    return (batch, c.heads, c.head_dim, c.state_size)


def _inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


def _channel_axes(channels: str, groups: int) -> tuple[str | None, str | None]:
    """The logical axes of a scan's channels (``"heads"`` or ``"mlp"``) and of its B/C groups
    inside :func:`_per_shard_scan`: the channels split over devices where the groups split with
    them, or there is one group (then every shard reads it whole); otherwise neither splits."""
    split = groups % mesh_parts(channels) == 0
    return (channels if split or groups == 1 else None), (channels if split else None)


def _per_shard_scan(scan, arrays: dict, out_axes):
    """``scan(**arrays)`` on each device's shard of a sharded model (``partitioning.per_shard``);
    ``arrays``: keyword -> (array or None, logical axes), the Nones left out. XLA cannot partition
    a Mosaic (TPU) kernel itself, and a scan is independent per batch row and channel."""
    arrays = {k: v for k, v in arrays.items() if v[0] is not None}

    def run(*values):
        return scan(**dict(zip(arrays, values, strict=True)))

    axes = [a for _, a in arrays.values()]
    # A scan runs along the sequence and sums over the state: neither may split.
    sharded = per_shard(run, axes, out_axes, whole=("seq", "state"))
    return sharded(*[v for v, _ in arrays.values()])


class MambaMixer(nnx.Module):
    def __init__(self, config: MambaConfig, rngs: nnx.Rngs):
        c = self.config = config
        pd, std = c.storage_dtype, c.initializer_range
        d, n = c.inner_size, c.state_size
        conv = _conv_channels(c)
        if c.mixer == "mamba1":
            in_width = 2 * d
        elif c.mixer == "mamba1_qkv":  # [z | x | B | C | dt_low]
            in_width = 2 * d + 2 * c.num_groups * c.head_dim + c.dt_rank
        elif c.mixer == "mamba2":
            in_width = 2 * d + 2 * c.num_groups * n + c.heads
        else:
            in_width = 2 * d + 2 * c.heads * n + c.heads
        self.in_proj = param(rngs, (c.hidden_size, in_width), ("embed", "mlp"), dtype=pd, std=std)
        self.conv_weight = param(
            rngs, (c.conv_kernel, conv), (None, "mlp"), dtype=pd, std=1.0 / math.sqrt(c.conv_kernel)
        )
        self.conv_bias = param(rngs, (conv,), ("mlp",), dtype=pd, value=0.0)
        self.out_proj = param(rngs, (d, c.hidden_size), ("mlp", "embed"), dtype=pd, std=std)
        # dt initialised log-uniform in [1e-3, 1e-1] (through the bias), as mamba_ssm does.
        channels = d if _is_mamba1(c) else c.heads
        dt = jnp.exp(
            jax.random.uniform(rngs.params(), (channels,)) * math.log(100) + math.log(1e-3)
        )
        if c.mixer != "discrete_mamba2":
            self.dt_bias = logical_param(_inverse_softplus(dt).astype(pd), ("mlp",))
        if _is_mamba1(c):
            if c.mixer == "mamba1":  # mamba1_qkv's dt_low, B, C come from in_proj
                self.x_proj = param(rngs, (d, c.dt_rank + 2 * n), ("mlp", None), dtype=pd, std=std)
            self.dt_proj = param(rngs, (c.dt_rank, d), (None, "mlp"), dtype=pd, std=c.dt_rank**-0.5)
            a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d, n)))
            self.A_log = logical_param(a_log.astype(pd), ("mlp", "state"))
            self.D = param(rngs, (d,), ("mlp",), dtype=pd, value=1.0)
        elif c.mixer == "mamba2":
            a = jax.random.uniform(rngs.params(), (c.heads,), minval=1.0, maxval=16.0)
            self.A_log = logical_param(jnp.log(a).astype(pd), ("heads",))
            self.D = param(rngs, (c.heads,), ("heads",), dtype=pd, value=1.0)
            self.norm = RMSNorm(d, eps=c.rms_norm_eps, param_dtype=pd, rngs=rngs)
        else:
            self.D = param(rngs, (c.heads,), ("heads",), dtype=pd, value=1.0)
            self.z_bias = param(rngs, (d,), ("mlp",), dtype=pd, value=0.0)

    def _conv(self, x, cache_conv, lengths):
        """Causal depthwise conv over seq; cache_conv: [batch, kernel - 1, channels] or None.

        Returns the conv output and the next conv cache: the last ``kernel - 1`` inputs up to
        each row's ``lengths`` (all ``seq`` when None).
        """
        k = self.config.conv_kernel
        past = (
            jnp.zeros((x.shape[0], k - 1, x.shape[2]), x.dtype)
            if cache_conv is None
            else cache_conv.astype(x.dtype)
        )
        full = jnp.concatenate([past, x], axis=1)
        w = self.conv_weight[...].astype(x.dtype)
        out = sum(full[:, i : i + x.shape[1]] * w[i] for i in range(k))
        if lengths is None:
            tail = full[:, x.shape[1] :]
        else:
            rows = lengths[:, None] + jnp.arange(k - 1)[None, :]
            tail = jnp.take_along_axis(full, rows[:, :, None], axis=1)
        return out + self.conv_bias[...].astype(x.dtype), tail

    def ssd_inputs(self, hidden, conv_cache=None, lengths=None):
        """What the SSD of a ``mamba2`` or ``discrete_mamba2`` mixer reads, from ``hidden``
        [batch, seq, embed] (``conv_cache`` and ``lengths`` as in :meth:`__call__`).

        Returns:
          ``(x [batch, seq, heads, head_dim], step [batch, seq, heads], A [heads], B, C [batch,
          seq, groups, state], z [batch, seq, inner], conv_state)``: the decay is
          ``exp(step * A)``; mamba2 scales its input by ``step``, discrete_mamba2 does not
          (its ``A = -1`` and its step is floored at 1e-6). ``step`` and ``A`` are float32 or
          wider.
        """
        c = self.config
        if _is_mamba1(c):
            raise ValueError(
                f"MambaMixer.ssd_inputs: mixer {c.mixer!r} has no SSD (mamba2 and "
                "discrete_mamba2 only)"
            )
        dt_ = hidden.dtype
        f32 = jnp.promote_types(jnp.float32, dt_)
        batch, seq, _ = hidden.shape
        d, n = c.inner_size, c.state_size
        proj = matmul(hidden, self.in_proj[...].astype(dt_))
        groups = c.num_groups if c.mixer == "mamba2" else c.heads
        xbc_width = d + 2 * groups * n
        if c.mixer == "mamba2":  # [z | x B C | dt]
            z, xbc, dt = jnp.split(proj, [d, d + xbc_width], axis=-1)
        else:  # [x B C | z | a]
            xbc, z, dt = jnp.split(proj, [xbc_width, xbc_width + d], axis=-1)
        xbc, conv_state = self._conv(xbc, conv_cache, lengths)
        if c.mixer == "mamba2":
            xbc = jax.nn.silu(xbc)
        x, B, C = jnp.split(xbc, [d, d + groups * n], axis=-1)
        x = x.reshape(batch, seq, c.heads, c.head_dim)
        B = B.reshape(batch, seq, groups, n)
        C = C.reshape(batch, seq, groups, n)
        if c.mixer == "mamba2":
            step = jax.nn.softplus(dt.astype(f32) + self.dt_bias[...].astype(f32))
            A = -jnp.exp(self.A_log[...].astype(f32))
        else:
            # Floored so that dividing x by the step (see __call__) stays finite.
            step = jnp.maximum(jax.nn.softplus(dt.astype(f32)), 1e-6)
            A = -jnp.ones(c.heads, f32)
        return x, step, A, B, C, z, conv_state

    def _ssd(self, x, step, A, B, C, D, state):
        """``scan_ops.ssd`` (``D``, ``state``: None or arrays) per shard (:func:`_per_shard_scan`):
        each device's batch rows, and its heads where the groups of B and C split with them (or
        there is one group)."""
        c = self.config
        heads, group = _channel_axes("heads", B.shape[2])
        return _per_shard_scan(
            functools.partial(scan_ops.ssd, chunk_size=c.chunk_size, impl=c.scan_impl),
            {
                "x": (x, ("batch", "seq", heads, "head_dim")),
                "dt": (step, ("batch", "seq", heads)),
                "A": (A, (heads,)),
                "B": (B, ("batch", "seq", group, "state")),
                "C": (C, ("batch", "seq", group, "state")),
                "D": (D, (heads,)),
                "initial_state": (state, ("batch", heads, "head_dim", "state")),
            },
            (("batch", "seq", heads, "head_dim"), ("batch", heads, "head_dim", "state")),
        )

    def _selective_scan(self, x, delta, A, B, C, z, state):
        """Mamba-1's ``scan_ops.selective_scan`` (``state``: None or an array) per shard
        (:func:`_per_shard_scan`): each device's batch rows, and its channels where the groups of
        B and C split with them (or there is one group)."""
        c = self.config
        channels, group = _channel_axes("mlp", B.shape[2])
        return _per_shard_scan(
            functools.partial(scan_ops.selective_scan, chunk_size=c.chunk_size, impl=c.scan_impl),
            {
                "u": (x, ("batch", "seq", channels)),
                "delta": (delta, ("batch", "seq", channels)),
                "A": (A, (channels, "state")),
                "B": (B, ("batch", "seq", group, "state")),
                "C": (C, ("batch", "seq", group, "state")),
                "D": (self.D[...], (channels,)),
                "z": (z, ("batch", "seq", channels)),
                "initial_state": (state, ("batch", channels, "state")),
            },
            (("batch", "seq", channels), ("batch", channels, "state")),
        )

    def mixer_matrix(self, hidden):
        """MOHAWK stage 1: the matrix ``M`` [batch, heads, seq, seq] (float32 or wider) of this
        mixer's SSD on ``hidden`` [batch, seq, embed], with the SSD output from a zero state
        ``y[:, t, h] = sum_s M[:, h, t, s] x[:, s, h]`` (``D`` on the diagonal), and that ``x``
        [batch, seq, heads, head_dim] (:func:`jaxlab.ops.ssm_matrix.ssd_matrix`)."""
        x, step, A, B, C, _, _ = self.ssd_inputs(hidden)
        scale_inputs = self.config.mixer == "mamba2"
        return ssm_matrix.ssd_matrix(step, A, B, C, D=self.D[...], scale_inputs=scale_inputs), x

    def __call__(self, hidden, cache: MixerCache | None, lengths=None):
        """hidden: [batch, seq, embed]; lengths: [batch] valid (unpadded) tokens per row, whose
        steps past it leave the state and conv cache unchanged (right-padded prompts)."""
        c = self.config
        dt_ = hidden.dtype
        batch, seq, _ = hidden.shape
        d, n = c.inner_size, c.state_size
        state = None if cache is None else cache.ssm
        conv_cache = None if cache is None else cache.conv
        # Padded steps get a zero step size: no decay and no input, the state passes through.
        valid = 1.0
        if lengths is not None:
            # [batch, seq, 1]: broadcasts over channels (mamba1) and heads (mamba2s).
            valid = (jnp.arange(seq)[None, :, None] < lengths[:, None, None]).astype(jnp.float32)
        # float32, or float64 for a float64 call (closed-form tests).
        f32 = jnp.promote_types(jnp.float32, dt_)
        if _is_mamba1(c):
            proj = matmul(hidden, self.in_proj[...].astype(dt_))
            if c.mixer == "mamba1":
                x, z = jnp.split(proj, 2, axis=-1)
                x, conv_state = self._conv(x, conv_cache, lengths)
                x = jax.nn.silu(x)
                dbc = matmul(x, self.x_proj[...].astype(dt_))
                dt_low, B, C = jnp.split(dbc, [c.dt_rank, c.dt_rank + n], axis=-1)
                B, C = B[:, :, None, :], C[:, :, None, :]  # one group shared by all channels
            else:
                kv = c.num_groups * c.head_dim
                z, x, B, C, dt_low = jnp.split(proj, [d, d + kv, d + 2 * kv, 2 * d + 2 * kv], -1)

                def per_head(v):
                    """[batch, seq, groups * head_dim] -> [batch, seq, d], repeated as GQA."""
                    v = v.reshape(batch, seq, c.num_groups, c.head_dim)
                    return jnp.repeat(v, c.heads // c.num_groups, axis=2).reshape(batch, seq, d)

                x, conv_state = self._conv(per_head(x), conv_cache, lengths)
                x = jax.nn.silu(x)
                # Channel c scans with the B/C chunk c // N, i.e. chunk f // N of its own head.
                B = per_head(B).reshape(batch, seq, d // n, n)
                C = C.reshape(batch, seq, d // n, n)
            delta = jax.nn.softplus(
                matmul(dt_low, self.dt_proj[...].astype(dt_)).astype(f32)
                + self.dt_bias[...].astype(f32)
            )
            delta = delta * valid
            y, new_state = self._selective_scan(
                x, delta, -jnp.exp(self.A_log[...].astype(f32)), B, C, z, state
            )
        else:
            x, step, A, B, C, z, conv_state = self.ssd_inputs(hidden, conv_cache, lengths)
            if c.mixer == "mamba2":
                y, new_state = self._ssd(x, step * valid, A, B, C, self.D[...], state)
                y = self.norm(y.reshape(batch, seq, d) * jax.nn.silu(z))
            else:
                # Decay exp(-softplus(a)) with an input not scaled by the step: the SSD multiplies
                # x by its step, so x is divided by it first (as the Llamba code does), in
                # float32 and with the step floored at 1e-6 so that the quotient stays finite.
                x_in = x.astype(f32) / step[..., None]
                if lengths is not None:
                    step = step * valid
                    x_in = jnp.where(valid[..., None] > 0, x_in, 0)
                y, new_state = self._ssd(x_in, step, A, B, C, None, state)
                # The skip connection uses x itself, not the rescaled input.
                y = y + self.D[...].astype(f32)[:, None] * x.astype(f32)
                y = y.reshape(batch, seq, d) * jax.nn.silu(z + self.z_bias[...].astype(dt_))
        out = matmul(y.astype(dt_), self.out_proj[...].astype(dt_))
        new_cache = None if cache is None else MixerCache(conv_state, new_state)
        return out, new_cache


class MambaBlock(nnx.Module):
    def __init__(self, config: MambaConfig, rngs: nnx.Rngs):
        from jaxlab.models.transformer import MLP

        c = config
        norm = dict(eps=c.rms_norm_eps, param_dtype=c.storage_dtype, rngs=rngs)
        self.input_norm = RMSNorm(c.hidden_size, **norm)
        self.mixer = MambaMixer(c, rngs)
        self.has_mlp = c.intermediate_size > 0
        if self.has_mlp:
            self.post_mixer_norm = RMSNorm(c.hidden_size, **norm)
            self.mlp = MLP(c.attention_config(), rngs)

    def __call__(self, x, positions, segment_ids, cache, lengths=None):
        del positions, segment_ids  # the recurrence runs across packed documents
        h, cache = self.mixer(self.input_norm(x), cache, lengths)
        x = x + h
        if self.has_mlp:
            x = x + self.mlp(self.post_mixer_norm(x))
        return x, cache


def init_cache(config: MambaConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty (zero) :class:`Cache`: per layer a :class:`MixerCache` or, for attention layers,
    a :class:`LayerCache` of ``max_len`` slots."""
    dtype = config.compute_dtype if dtype is None else dtype
    att = config.attention_config() if config.attention_layers else None
    caches = []
    for i in range(config.num_layers):
        if att is not None and i in config.attention_layers:
            shape = (batch, max_len, att.num_kv_heads, att.head_dim)
            caches.append(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        else:
            conv = jnp.zeros((batch, config.conv_kernel - 1, _conv_channels(config)), dtype)
            caches.append(MixerCache(conv, jnp.zeros(_ssm_shape(config, batch), jnp.float32)))
    return Cache(tuple(caches))


class MambaLM(LanguageModel):
    """Embedding, blocks (Mamba or attention), final norm, head; called like the Transformer:
    ``model(tokens, ...)`` -> logits, ``model.decode(tokens, cache, ...)`` -> ``(logits, cache)``
    (see :class:`LanguageModel`)."""

    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.embed = param(
            rngs,
            (c.vocab_size, c.hidden_size),
            ("vocab", "embed"),
            dtype=c.storage_dtype,
            std=c.initializer_range,
        )
        att = c.attention_config() if c.attention_layers else None
        self.layers = nnx.List(
            [
                Block(att, rngs, i) if i in c.attention_layers else MambaBlock(c, rngs)
                for i in range(c.num_layers)
            ]
        )
        self.final_norm = RMSNorm(
            c.hidden_size, eps=c.rms_norm_eps, param_dtype=c.storage_dtype, rngs=rngs
        )
        if not c.tie_embeddings:
            self.lm_head = param(
                rngs,
                (c.hidden_size, c.vocab_size),
                ("embed", "vocab"),
                dtype=c.storage_dtype,
                std=c.initializer_range,
            )
        if c.dwa is not None:
            self.dwa = DepthWeightedAverages(c.num_layers, c.dwa, param_dtype=c.storage_dtype)

    def _cache_kinds(self) -> tuple[type, ...]:
        return tuple(
            LayerCache if i in self.config.attention_layers else MixerCache
            for i in range(self.config.num_layers)
        )

    def _run(
        self,
        tokens,
        positions,
        segment_ids,
        cache,
        logits_at,
        lengths,
        return_hidden,
        return_attention,
    ):
        """The loop behind :meth:`__call__` and :meth:`decode` (arguments documented there).

        Mamba specifics: ``positions`` matter in attention layers only (with a cache, also the
        KV slots written); ``lengths`` (decoding) stops the recurrent states and conv caches at
        each row's length; the attention probabilities are ``None`` for Mamba layers.

        Returns:
          ``(logits, new cache or None, HiddenStates or None)``.
        """
        c = self.config
        positions = checked_positions("MambaLM", tokens, positions)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(c.compute_dtype)
        axes = ("batch", "seq", "embed")
        x = constrain(x, axes)
        collect = return_hidden or return_attention
        residuals, probs = [x], [None] * c.num_layers
        new_cache = [None] * c.num_layers

        def call_layer(layer, y, layer_cache):
            if isinstance(layer, MambaBlock):
                return layer(y, positions, segment_ids, layer_cache, lengths)
            if return_attention:
                return layer(y, positions, segment_ids, layer_cache, return_attention=True)
            return layer(y, positions, segment_ids, layer_cache)

        if c.remat:
            call_layer = nnx.remat(call_layer)

        def block(i):
            def run(y):
                out, new_cache[i], *layer_probs = call_layer(
                    self.layers[i], y, None if cache is None else cache[i]
                )
                out = constrain(out, axes)
                if collect:
                    residuals.append(out)
                if layer_probs:
                    probs[i] = layer_probs[0]
                return out

            return run

        blocks = [block(i) for i in range(c.num_layers)]
        x, averaged = run_blocks(
            x, blocks, self.dwa if c.dwa is not None else None, return_averages=collect
        )
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.final_norm(x)
        head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
        logits = matmul(x, head.astype(x.dtype), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "seq", "vocab"))
        hidden = None
        if collect:
            hidden = HiddenStates(
                tuple(residuals), tuple(probs) if return_attention else None, averaged
            )
        return logits, None if cache is None else Cache(tuple(new_cache)), hidden
