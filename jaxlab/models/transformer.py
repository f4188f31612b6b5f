"""Llama-family decoder (Llama 2, Llama 3, Mistral-style) in Flax NNX.

Pre-norm blocks: ``x + attn(rmsnorm(x))`` then ``x + mlp(rmsnorm(x))`` with grouped-query
attention, rotary position embeddings (optionally ``linear``/``llama3`` scaled), a SwiGLU MLP, and a
tied or untied output head. Parameters are stored in ``param_dtype`` and cast to ``dtype`` for
compute; logits are returned in float32. Every parameter carries logical axis names
(``vocab, embed, heads, kv_heads, head_dim, mlp``) that ``jaxlab.train.sharding`` maps to a mesh.

Calling conventions (those of every family, :class:`~jaxlab.models.interface.LanguageModel`):
  * ``model(tokens)`` -> logits ``[batch, seq, vocab]`` (causal, positions ``arange(seq)``);
  * ``model(tokens, positions=..., segment_ids=...)`` for packed sequences;
  * ``model.decode(tokens, cache, positions=...)`` -> ``(logits, cache)`` for decoding, where
    ``cache`` (a :class:`~jaxlab.models.interface.Cache` of one :class:`LayerCache` per layer)
    comes from :func:`init_cache` and row ``b``'s tokens are written at cache slots
    ``positions[b]`` (contiguous);
  * ``return_hidden=True`` (or ``return_attention=True``) appends a
    :class:`~jaxlab.models.layers.HiddenStates` to either: ``(logits, hidden)``,
    ``(logits, cache, hidden)``; it holds the residual stream after every block and, with
    ``return_attention``, each layer's attention probabilities. The same loop that computes the
    logits collects them; a call that asks for neither traces exactly as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlab import ops
from jaxlab.models.denseformer import DepthWeightedAverages, DWAConfig, run_blocks
from jaxlab.models.interface import (
    Cache,
    LanguageModel,
    LayerCache,
    checked_positions,
    config_values,
)
from jaxlab.models.layers import (
    HiddenStates,
    RMSNorm,
    RopeScaling,
    apply_rope,
    matmul,
    param,
    rope_inv_freq,
)
from jaxlab.models.partitioning import constrain
from jaxlab.models.sparse_attention import (
    SparseAttentionConfig,
    sparse_attention,
    sparse_attention_mask,
)
from jaxlab.ops.attention import attention_mask

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def canonical_dtype(value: Any, name: str) -> str:
    """The :data:`DTYPES` name of ``value``: anything ``jnp.dtype`` takes (``jnp.float32``,
    ``np.float32``, ``np.dtype('float32')``, ``"float32"``, ``jnp.bfloat16``, ...).

    Args:
      value: the dtype as given.
      name: what to call the argument or field in the error (``"TransformerConfig.dtype"``).

    Raises:
      ValueError: naming ``name``, the allowed dtypes and ``value``, for ``None``, something that
        is not a dtype, or a dtype outside :data:`DTYPES` (``int32``, ``float64``, ...).
    """
    try:
        # None and bools are not dtypes (jnp.dtype(None) is float64); say so rather than guess.
        canonical = None if value is None or isinstance(value, bool) else jnp.dtype(value).name
    except (TypeError, ValueError):
        canonical = None
    if canonical not in DTYPES:
        found = f"{value!r}" if canonical is None else f"{value!r} ({canonical})"
        raise ValueError(
            f"{name} must be one of {tuple(DTYPES)} (a name or anything jnp.dtype takes for "
            f"them, e.g. jnp.float32), got {found}"
        )
    return canonical


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a Llama-family decoder.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: model width (``embed``).
      intermediate_size: SwiGLU hidden width (``mlp``).
      num_layers: number of blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads; ``num_heads`` must be a multiple (GQA; equal = MHA).
      head_dim: per-head width; default ``hidden_size // num_heads``.
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: RoPE base.
      rope_scaling: optional frequency scaling (``linear`` or ``llama3``).
      tie_embeddings: output head shares the embedding matrix.
      attention_bias: biases on the q/k/v and output projections (as Hugging Face Llama).
      mlp_bias: biases on the three MLP projections.
      sliding_window: if set, each token attends to at most this many positions (Mistral).
      max_seq_len: longest sequence the model accepts (``max_position_embeddings``).
      initializer_range: std of the normal initialiser of weight matrices.
      param_dtype: storage dtype of parameters: a :data:`DTYPES` name or anything ``jnp.dtype``
        takes for one (``jnp.bfloat16``, ``np.float32``); stored as the name.
      dtype: compute dtype of activations, given and stored as ``param_dtype``.
      attention_impl: name of a :mod:`jaxlab.ops.attention` implementation.
      bos_token_id: beginning-of-sequence id, kept for checkpoint round trips.
      eos_token_id: end-of-sequence id(s), kept for checkpoint round trips.
      dwa: if set, a DenseFormer: depth-weighted averages between blocks
        (:mod:`jaxlab.models.denseformer`).
      sparse_attention: if set, dynamic sparse attention (hash buckets or query/key dropping,
        :mod:`jaxlab.models.sparse_attention`) replaces dense attention in every layer.
      remat: recompute each block's activations in the backward pass (gradient checkpointing)
        instead of storing them.
      scan_layers: stack the blocks' parameters on a leading ``layers`` axis (created with
        ``nnx.vmap``) and run them with ``jax.lax.scan``, so one block is traced and compiled
        instead of ``num_layers`` (maxtext's ``scan_layers``); same numbers as the unrolled loop.
        Parameters are then ``layers/<name>`` of shape ``[num_layers, ...]`` instead of
        ``layers/<i>/<name>``, so checkpoints and Hugging Face weights of the unrolled layout do
        not load into it. Not combinable with ``dwa`` or ``sparse_attention``; decoding with a
        cache is an error (use an unrolled model for generation).
      layer_widths: Layer Parallelism, folded (:func:`jaxlab.models.depth.layer_parallel`): block
        ``i`` is ``layer_widths[i]`` original layers evaluated side by side as one layer that many
        times as wide (query heads, kv heads and MLP width); ``num_layers`` entries; None: all 1.
      parallel_groups: Layer Parallelism, unfolded: consecutive blocks in groups of these sizes
        (summing to ``num_layers``); the blocks of a group read the same input, both in
        attention and in the MLP: ``h = x + sum_i A_i(N_i x)``, ``y = h + sum_i M_i(N'_i h)``.
        None: every block alone (sequential).
      name: registry name.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "xla"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dwa: DWAConfig | None = None
    sparse_attention: SparseAttentionConfig | None = None
    remat: bool = False
    scan_layers: bool = False
    layer_widths: tuple[int, ...] | None = None
    parallel_groups: tuple[int, ...] | None = None
    name: str = "llama"

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for field in ("eos_token_id", "layer_widths", "parallel_groups"):
            if isinstance(getattr(self, field), list):  # as JSON gives them back
                object.__setattr__(self, field, tuple(getattr(self, field)))
        if self.dwa is not None and not isinstance(self.dwa, DWAConfig):
            object.__setattr__(self, "dwa", DWAConfig(**dict(self.dwa)))
        sparse = self.sparse_attention
        if sparse is not None and not isinstance(sparse, SparseAttentionConfig):
            object.__setattr__(self, "sparse_attention", SparseAttentionConfig(**dict(sparse)))
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_seq_len",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"TransformerConfig.head_dim must be even for RoPE, got {self.head_dim}"
            )
        for field in ("param_dtype", "dtype"):  # canonical names: configs stay JSON and compare
            value = canonical_dtype(getattr(self, field), f"TransformerConfig.{field}")
            object.__setattr__(self, field, value)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"TransformerConfig.sliding_window must be >= 1 or None, got {self.sliding_window}"
            )
        if self.sparse_attention is not None and self.sliding_window is not None:
            raise ValueError(
                "TransformerConfig: sparse_attention and sliding_window cannot be combined, got "
                f"sliding_window={self.sliding_window}"
            )
        if self.scan_layers and self.dwa is not None:
            raise ValueError(
                "TransformerConfig: scan_layers cannot be combined with dwa (each depth-weighted "
                f"average reads the outputs of earlier blocks), got dwa={self.dwa}"
            )
        if self.scan_layers and self.sparse_attention is not None:
            raise ValueError(
                "TransformerConfig: scan_layers cannot be combined with sparse_attention (each "
                "layer seeds its hashes with its own index), got "
                f"sparse_attention={self.sparse_attention}"
            )
        self._check_parallel_layers()
        if self.attention_impl not in ops.available_impls():
            raise ValueError(
                f"TransformerConfig.attention_impl must be one of {ops.available_impls()}, "
                f"got {self.attention_impl!r}"
            )

    def _check_parallel_layers(self):
        for field in ("layer_widths", "parallel_groups"):
            value = getattr(self, field)
            if value is None:
                continue
            if not isinstance(value, tuple) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in value
            ):
                raise ValueError(
                    f"TransformerConfig.{field} must be a tuple of positive ints or None, "
                    f"got {value!r}"
                )
            for other in ("scan_layers", "dwa", "sparse_attention"):
                if getattr(self, other):
                    raise ValueError(
                        f"TransformerConfig: {field} cannot be combined with {other}, got "
                        f"{other}={getattr(self, other)!r}"
                    )
        if self.layer_widths is not None and len(self.layer_widths) != self.num_layers:
            raise ValueError(
                f"TransformerConfig.layer_widths must have num_layers={self.num_layers} entries, "
                f"got {self.layer_widths}"
            )
        if self.parallel_groups is not None and sum(self.parallel_groups) != self.num_layers:
            raise ValueError(
                f"TransformerConfig.parallel_groups must sum to num_layers={self.num_layers}, "
                f"got {self.parallel_groups}"
            )
        if self.layer_widths is not None and self.parallel_groups is not None:
            raise ValueError(
                "TransformerConfig: layer_widths (folded parallel layers) and parallel_groups "
                "(unfolded) are two forms of the same thing; set one, got "
                f"layer_widths={self.layer_widths}, parallel_groups={self.parallel_groups}"
            )

    def width(self, layer: int) -> int:
        """How many original layers block ``layer`` evaluates side by side (``layer_widths``)."""
        return 1 if self.layer_widths is None else self.layer_widths[layer]

    def groups(self) -> tuple[tuple[int, ...], ...]:
        """The blocks that run side by side, in order: ``parallel_groups`` as index tuples."""
        sizes = self.parallel_groups or (1,) * self.num_layers
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        return tuple(tuple(range(s, s + n)) for s, n in zip(starts, sizes, strict=True))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransformerConfig:
        """Builds a config from a mapping (e.g. an ``ml_collections.ConfigDict``).

        Unknown keys are an error rather than silently ignored.
        """
        values = config_values(cls, values)
        if values.get("rope_scaling") is not None and not isinstance(
            values["rope_scaling"], RopeScaling
        ):
            values["rope_scaling"] = RopeScaling(**dict(values["rope_scaling"]))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]


def init_cache(config: TransformerConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty (zero) cache for ``batch`` rows of up to ``max_len`` positions: a :class:`Cache`
    of one :class:`LayerCache` per layer."""
    if max_len > config.max_seq_len:
        raise ValueError(
            f"init_cache: max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}"
        )
    dtype = config.compute_dtype if dtype is None else dtype

    def layer_cache(layer):
        shape = (batch, max_len, config.num_kv_heads * config.width(layer), config.head_dim)
        return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    return Cache(tuple(layer_cache(i) for i in range(config.num_layers)))


def _write_rows(buffer: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
    """Writes ``update[b]`` into ``buffer[b]`` at slot ``starts[b]`` along axis 0 of each row."""
    return jax.vmap(lambda buf, upd, s: jax.lax.dynamic_update_slice_in_dim(buf, upd, s, 0))(
        buffer, update, starts
    )


def attention_probabilities(
    q: jax.Array, k: jax.Array, mask: jax.Array, scale: float | None = None
) -> jax.Array:
    """Dense softmax attention weights, for inspecting a model (not for its forward pass).

    Args:
      q: [batch, q_len, heads, head_dim] queries (after RoPE).
      k: [batch, kv_len, kv_heads, head_dim] keys; ``heads % kv_heads == 0`` (query head ``h``
        reads kv head ``h // (heads // kv_heads)``).
      mask: bool, broadcastable to [batch, heads, q_len, kv_len]: the keys each query sees.
      scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
      [batch, heads, q_len, kv_len] float32 probabilities; a row is 0 where no key is visible.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = jnp.repeat(k, heads // kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = jnp.broadcast_to(mask, logits.shape)
    visible = jnp.any(mask, axis=-1, keepdims=True)
    # Rows with no visible key get finite logits so that the softmax stays NaN-free.
    logits = jnp.where(mask, logits, jnp.where(visible, -jnp.inf, 0.0))
    return jnp.where(visible, jax.nn.softmax(logits, axis=-1), 0.0)


class Attention(nnx.Module):
    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, layer: int = 0):
        c = config
        self.config = c
        self.layer = layer  # seeds the sparse-attention hashes of this layer
        pd, std = c.storage_dtype, c.initializer_range
        heads, kv_heads = c.num_heads * c.width(layer), c.num_kv_heads * c.width(layer)
        self.q_proj = param(
            rngs,
            (c.hidden_size, heads, c.head_dim),
            ("embed", "heads", "head_dim"),
            dtype=pd,
            std=std,
        )
        self.k_proj = param(
            rngs,
            (c.hidden_size, kv_heads, c.head_dim),
            ("embed", "kv_heads", "head_dim"),
            dtype=pd,
            std=std,
        )
        self.v_proj = param(
            rngs,
            (c.hidden_size, kv_heads, c.head_dim),
            ("embed", "kv_heads", "head_dim"),
            dtype=pd,
            std=std,
        )
        self.o_proj = param(
            rngs,
            (heads, c.head_dim, c.hidden_size),
            ("heads", "head_dim", "embed"),
            dtype=pd,
            std=std,
        )
        if c.attention_bias:
            self.q_bias = param(
                rngs, (heads, c.head_dim), ("heads", "head_dim"), dtype=pd, value=0.0
            )
            self.k_bias = param(
                rngs, (kv_heads, c.head_dim), ("kv_heads", "head_dim"), dtype=pd, value=0.0
            )
            self.v_bias = param(
                rngs, (kv_heads, c.head_dim), ("kv_heads", "head_dim"), dtype=pd, value=0.0
            )
            self.o_bias = param(rngs, (c.hidden_size,), ("embed",), dtype=pd, value=0.0)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        cache: LayerCache | None,
        return_attention: bool = False,
    ) -> tuple[jax.Array, LayerCache | None] | tuple[jax.Array, LayerCache | None, jax.Array]:
        """x: [batch, seq, embed]; positions, segment_ids: [batch, seq].

        Returns the output [batch, seq, embed] and the updated cache (None without one), and
        with ``return_attention`` also the probabilities [batch, heads, seq, kv_len] (float32,
        :func:`attention_probabilities` under the mask this layer attends with; for sparse
        attention the dense form of its pattern, which decoding uses).
        """
        c = self.config
        dt = x.dtype

        def project(name):
            y = matmul(x, getattr(self, f"{name}_proj")[...].astype(dt))
            if c.attention_bias:
                y = y + getattr(self, f"{name}_bias")[...].astype(dt)
            return y

        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q = apply_rope(project("q"), positions, inv_freq)
        k = apply_rope(project("k"), positions, inv_freq)
        v = project("v")
        if cache is None:
            kv_positions, kv_segments = positions, segment_ids
        else:
            # Row b's new tokens occupy slots positions[b, 0] .. positions[b, 0] + seq - 1.
            starts = positions[:, 0]
            cache = LayerCache(
                _write_rows(cache.k, k.astype(cache.k.dtype), starts),
                _write_rows(cache.v, v.astype(cache.v.dtype), starts),
            )
            k, v = cache.k.astype(dt), cache.v.astype(dt)
            kv_positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
            kv_segments = None
        sparse = c.sparse_attention
        mask = None
        if sparse is not None and cache is None:
            out = sparse_attention(sparse, self.layer, q, k, v, positions, segment_ids)
        elif sparse is not None:
            mask = sparse_attention_mask(sparse, self.layer, q, k, positions, kv_positions)
            out = ops.masked_attention(q, k, v, mask)
        else:
            out = self._dense(q, k, v, positions, kv_positions, segment_ids, kv_segments)
        out = matmul(out, self.o_proj[...].astype(dt), in_dims=2)
        if c.attention_bias:
            out = out + self.o_bias[...].astype(dt)
        if not return_attention:
            return out, cache
        if mask is None:
            mask = self._mask(q, k, positions, kv_positions, segment_ids, kv_segments)
        return out, cache, attention_probabilities(q, k, mask)

    def _mask(self, q, k, positions, kv_positions, segment_ids, kv_segments):
        """[batch, 1 or heads, q_len, kv_len] bool: the keys each query attends to."""
        c = self.config
        segments = dict(
            q_segment_ids=segment_ids if kv_segments is not None else None,
            kv_segment_ids=kv_segments,
        )
        if c.sparse_attention is None:
            mask = attention_mask(
                positions, kv_positions, causal=True, sliding_window=c.sliding_window, **segments
            )
            return mask[:, None]
        mask = sparse_attention_mask(c.sparse_attention, self.layer, q, k, positions, kv_positions)
        if kv_segments is not None:
            mask &= attention_mask(positions, kv_positions, causal=False, **segments)[:, None]
        return mask

    def _dense(self, q, k, v, positions, kv_positions, segment_ids, kv_segments):
        c = self.config
        return ops.attention(
            q,
            k,
            v,
            q_positions=positions,
            kv_positions=kv_positions,
            causal=True,
            sliding_window=c.sliding_window,
            q_segment_ids=segment_ids if kv_segments is not None else None,
            kv_segment_ids=kv_segments,
            impl=c.attention_impl,
        )


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, layer: int = 0):
        c = config
        self.use_bias = c.mlp_bias
        pd, std = c.storage_dtype, c.initializer_range
        width = c.intermediate_size * c.width(layer)
        self.gate_proj = param(rngs, (c.hidden_size, width), ("embed", "mlp"), dtype=pd, std=std)
        self.up_proj = param(rngs, (c.hidden_size, width), ("embed", "mlp"), dtype=pd, std=std)
        self.down_proj = param(rngs, (width, c.hidden_size), ("mlp", "embed"), dtype=pd, std=std)
        if c.mlp_bias:
            self.gate_bias = param(rngs, (width,), ("mlp",), dtype=pd, value=0.0)
            self.up_bias = param(rngs, (width,), ("mlp",), dtype=pd, value=0.0)
            self.down_bias = param(rngs, (c.hidden_size,), ("embed",), dtype=pd, value=0.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype

        def linear(name, inputs):
            y = matmul(inputs, getattr(self, f"{name}_proj")[...].astype(dt))
            if self.use_bias:
                y = y + getattr(self, f"{name}_bias")[...].astype(dt)
            return y

        return linear("down", jax.nn.silu(linear("gate", x)) * linear("up", x))


class Block(nnx.Module):
    def __init__(self, config: TransformerConfig, rngs: nnx.Rngs, layer: int = 0):
        c = config
        norm = dict(eps=c.rms_norm_eps, param_dtype=c.storage_dtype, rngs=rngs)
        self.input_norm = RMSNorm(c.hidden_size, **norm)
        self.attn = Attention(c, rngs, layer)
        self.post_attention_norm = RMSNorm(c.hidden_size, **norm)
        self.mlp = MLP(c, rngs, layer)

    def __call__(self, x, positions, segment_ids, cache, return_attention: bool = False):
        """x: [batch, seq, embed] -> (x', cache), and the attention probabilities
        [batch, heads, seq, kv_len] last with ``return_attention``."""
        h, cache, *probs = self.attn(
            self.input_norm(x), positions, segment_ids, cache, return_attention
        )
        x = x + h
        return (x + self.mlp(self.post_attention_norm(x)), cache, *probs)


def parallel_blocks(blocks, x, positions, segment_ids, caches, return_attention: bool = False):
    """Blocks evaluated side by side (Layer Parallelism, unfolded): every attention reads the
    same ``x``, every MLP the same ``h``: ``h = x + sum_i A_i(N_i x)``, ``y = h + sum_i
    M_i(N'_i h)``.

    Returns ``(y, caches, probs)``: one updated cache (or None) and, with ``return_attention``,
    one probability array per block (else an empty tuple).
    """
    h, new_caches, probs = x, [], []
    for block, cache in zip(blocks, caches, strict=True):
        a, cache, *p = block.attn(
            block.input_norm(x), positions, segment_ids, cache, return_attention
        )
        h, new_caches, probs = h + a, new_caches + [cache], probs + p
    y = h
    for block in blocks:
        y = y + block.mlp(block.post_attention_norm(h))
    return y, tuple(new_caches), tuple(probs)


def _stacked_blocks(config: TransformerConfig, rngs: nnx.Rngs) -> Block:
    """One :class:`Block` whose parameters have a leading ``num_layers`` axis, named ``layers``
    in their sharding metadata, each layer drawn from its own split of ``rngs``."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs):
        return Block(config, layer_rngs)

    return create(rngs)


class Transformer(LanguageModel):
    """The decoder: ``model(tokens, ...)`` -> logits, ``model.decode(tokens, cache, ...)`` ->
    ``(logits, cache)`` (see the module docstring and :class:`LanguageModel`)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = param(
            rngs,
            (c.vocab_size, c.hidden_size),
            ("vocab", "embed"),
            dtype=c.storage_dtype,
            std=c.initializer_range,
        )
        if c.scan_layers:
            self.layers = _stacked_blocks(c, rngs)
        else:
            self.layers = nnx.List([Block(c, rngs, i) for i in range(c.num_layers)])
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
        return (LayerCache,) * self.config.num_layers

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

        Transformer specifics: ``lengths`` is unused (attention needs only positions); the
        residuals of a
        DenseFormer are the block outputs ``X_i`` before the averages, which are in
        ``HiddenStates.averaged``; ``kv_len`` of the attention probabilities is the cache length
        with a cache, ``seq`` without.

        Returns:
          ``(logits, new cache or None, HiddenStates or None)``.
        """
        c = self.config
        del lengths
        positions = checked_positions(
            "Transformer", tokens, positions, max_seq_len=c.max_seq_len, cached=cache is not None
        )
        batch, seq = tokens.shape
        residual_axes = ("batch", "seq", "embed")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(c.compute_dtype)
        x = constrain(x, residual_axes)
        new_cache: list[LayerCache | None] = [None] * c.num_layers
        collect = return_hidden or return_attention
        residuals, probs = [x], [None] * c.num_layers

        def call_layer(layer, y, layer_cache):
            if return_attention:
                return layer(y, positions, segment_ids, layer_cache, return_attention=True)
            return layer(y, positions, segment_ids, layer_cache)

        def call_group(layers, y, caches):
            return parallel_blocks(layers, y, positions, segment_ids, caches, return_attention)

        if c.remat:
            call_layer, call_group = nnx.remat(call_layer), nnx.remat(call_group)

        def block(i):
            def run(y):
                out, new_cache[i], *layer_probs = call_layer(
                    self.layers[i], y, None if cache is None else cache[i]
                )
                out = constrain(out, residual_axes)
                if collect:
                    residuals.append(out)
                if layer_probs:
                    probs[i] = layer_probs[0]
                return out

            return run

        def group(indices):
            def run(y):
                layers = tuple(self.layers[i] for i in indices)
                caches = tuple(None if cache is None else cache[i] for i in indices)
                out, group_caches, group_probs = call_group(layers, y, caches)
                out = constrain(out, residual_axes)
                for j, i in enumerate(indices):
                    new_cache[i] = group_caches[j]
                    if group_probs:
                        probs[i] = group_probs[j]
                if collect:
                    residuals.append(out)
                return out

            return run

        if c.scan_layers:
            if cache is not None:
                raise ValueError(
                    "Transformer: decoding with a cache needs unrolled layers, and this model "
                    "has scan_layers=True; build it with scan_layers=False to decode"
                )
            graphdef, stacked = nnx.split(self.layers)

            def scan_step(y, layer_state):
                out, _, *layer_probs = call_layer(nnx.merge(graphdef, layer_state), y, None)
                out = constrain(out, residual_axes)
                return out, (out if collect else None, layer_probs[0] if layer_probs else None)

            x, (outs, stacked_probs) = jax.lax.scan(scan_step, x, stacked)
            if collect:
                residuals += list(outs)
            if return_attention:
                probs = list(stacked_probs)
            blocks = []  # the scan has run them
        else:
            blocks = [block(g[0]) if len(g) == 1 else group(g) for g in c.groups()]
        x, averaged = run_blocks(
            x, blocks, self.dwa if c.dwa is not None else None, return_averages=collect
        )
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.final_norm(x)
        if c.tie_embeddings:
            head = self.embed[...].astype(x.dtype).T
        else:
            head = self.lm_head[...].astype(x.dtype)
        logits = matmul(x, head, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "seq", "vocab"))
        hidden = None
        if collect:
            hidden = HiddenStates(
                tuple(residuals), tuple(probs) if return_attention else None, averaged
            )
        return logits, None if cache is None else Cache(tuple(new_cache)), hidden
