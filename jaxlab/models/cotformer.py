"""CoTFormer (Mohtashami, Pagliardini, Jaggi; ICLR 2025): a shared stack of blocks repeated with
attention across repeats, its LN/depth-embedding variant, the Block Universal Transformer
baseline, and the adaptive Mixture of Repeats with a causal per-token threshold for decoding.

Layout: ``n_layer_begin`` reserved Llama blocks, a shared stack of ``n_layer_mid`` blocks applied
``n_repeat`` times, ``n_layer_end`` reserved blocks, then the final norm and the head. The blocks
are :class:`jaxlab.models.transformer.Block` modules; only the mid blocks' attention differs: at
repeat ``r`` a query at position ``t`` sees the keys/values of repeats ``1..r`` at positions
``<= t`` (``cross_repeat=True``), or of repeat ``r`` only (``cross_repeat=False``, the Block
Universal Transformer). Every repeat of a token has the token's own rotary position.

Adaptive depth (``adaptive=True``): after repeat ``r < n_repeat`` a router ``w = sigmoid(x . u_r)``
scores each token; a token that continues is updated as ``x <- (1 - w) x + w B(x)`` where ``B`` is
the next repeat, a token that stops keeps its representation (the authors' reassembly: each token
leaves the mid stack with the output of the repeat it exited at), and its keys/values of the
repeats it did not reach are invisible. Who continues is decided by :attr:`CoTFormer.routing`:

* ``"threshold"`` (default): ``w >= config.threshold``, token by token, so the full forward and
  cached decoding agree;
* a tuple of ``n_repeat - 1`` fractions ``f`` (a budget, non-causal: for scoring, not decoding):
  repeat ``r + 1`` runs the top ``int(f_r / f_{r-1} * n_r)`` of the ``n_r`` tokens that ran
  repeat ``r`` (per row, ``f_0 = 1``, ``n_1 = seq``), as the authors' ``eval_length_factor``;
* ``"sample"`` (training): a budget drawn each call by :func:`draw_capacities` from a key
  hashed from the batch's tokens, so every batch draws its own budget and a resumed run (or a
  sharded one) draws the same budgets as the run it continues (the authors' code does not: its
  RNG state is not restored on resume).

Tokens the mid stack computes and then discards (an exited token at a deeper repeat) cost no
correctness, only compute: shapes stay static. :func:`macs` counts the work a dropping
implementation does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxlab import ops
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
from jaxlab.models.transformer import DTYPES, Block, TransformerConfig, canonical_dtype

DEPTH_EMBEDDINGS = ("none", "linear", "per_repeat")
# kv segment id of cache/buffer entries a query must not see (a repeat the token did not reach).
_HIDDEN = jnp.iinfo(jnp.int32).min


@dataclasses.dataclass(frozen=True)
class CoTFormerConfig:
    """Architecture of a CoTFormer.

    The block fields (``vocab_size`` .. ``remat``) mean what they mean in
    :class:`~jaxlab.models.transformer.TransformerConfig`.

    Attributes:
      n_layer_begin: reserved blocks before the repeated stack.
      n_layer_mid: blocks of the shared stack.
      n_repeat: passes through the shared stack.
      n_layer_end: reserved blocks after it.
      cross_repeat: True: mid attention at repeat r sees repeats 1..r (CoTFormer); False: only
        repeat r (Block Universal Transformer).
      ln_mid: an RMSNorm after every pass through the shared stack (LN-CoTFormer).
      depth_embedding: added to x before repeat r (1-based): ``"none"``; ``"linear"``, one
        learned vector e scaled by ``n_repeat - r``; ``"per_repeat"``, one vector per repeat.
      adaptive: a router per repeat boundary (Mixture of Repeats, see the module docstring).
      threshold: router weight at or above which a token continues in ``"threshold"`` routing.
      routing: the model's initial :attr:`CoTFormer.routing`, ``"threshold"`` or ``"sample"``
        (a config trains with budgets drawn per batch; set ``model.routing`` to evaluate with a
        budget or the threshold).
      name: registry name.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    n_layer_mid: int
    n_repeat: int
    n_layer_begin: int = 0
    n_layer_end: int = 0
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    dtype: str = "float32"
    attention_impl: str = "xla"
    remat: bool = False
    cross_repeat: bool = True
    ln_mid: bool = False
    depth_embedding: str = "none"
    adaptive: bool = False
    threshold: float = 0.5
    routing: str = "threshold"
    name: str = "cotformer"

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for field in ("n_layer_mid", "n_repeat"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CoTFormerConfig.{field} must be a positive int, got {value!r}")
        for field in ("n_layer_begin", "n_layer_end"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"CoTFormerConfig.{field} must be a non-negative int, got {value!r}"
                )
        if self.depth_embedding not in DEPTH_EMBEDDINGS:
            raise ValueError(
                f"CoTFormerConfig.depth_embedding must be one of {DEPTH_EMBEDDINGS}, got "
                f"{self.depth_embedding!r}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"CoTFormerConfig.threshold must be in [0, 1], got {self.threshold}")
        if self.routing not in ("threshold", "sample"):
            raise ValueError(
                f"CoTFormerConfig.routing must be 'threshold' or 'sample', got {self.routing!r}"
            )
        if self.adaptive and self.n_repeat < 2:
            raise ValueError(
                f"CoTFormerConfig.adaptive needs n_repeat >= 2 (a router decides between "
                f"repeats), got n_repeat={self.n_repeat}"
            )
        for field in ("param_dtype", "dtype"):
            value = canonical_dtype(getattr(self, field), f"CoTFormerConfig.{field}")
            object.__setattr__(self, field, value)
        # The block fields are validated (and num_kv_heads/head_dim defaulted) by the
        # Transformer's config, which the blocks are built from.
        blocks = self.block_config()
        object.__setattr__(self, "num_kv_heads", blocks.num_kv_heads)
        object.__setattr__(self, "head_dim", blocks.head_dim)

    def block_config(self) -> TransformerConfig:
        """The :class:`TransformerConfig` of the blocks (``num_layers`` = all distinct blocks)."""
        shared = {f.name for f in dataclasses.fields(TransformerConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in shared}
        values.update(
            num_layers=self.n_layer_begin + self.n_layer_mid + self.n_layer_end, name="llama"
        )
        return TransformerConfig(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CoTFormerConfig:
        """Builds a config from a mapping; unknown keys are an error."""
        values = config_values(cls, values)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self) -> jnp.dtype:
        return DTYPES[self.param_dtype]


@struct.dataclass
class RepeatCache:
    """Keys and values of one shared (mid) layer for every repeat and cache slot.

    Attributes:
      k: [batch, n_repeat, max_len, kv_heads, head_dim]
      v: [batch, n_repeat, max_len, kv_heads, head_dim]
      reached: [batch, n_repeat, max_len] bool: the token at that slot ran that repeat (an
        adaptive model's exited tokens have no keys/values in deeper repeats).
    """

    k: jax.Array
    v: jax.Array
    reached: jax.Array


def init_cache(config: CoTFormerConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty cache: a :class:`LayerCache` per reserved block and a :class:`RepeatCache` per
    shared block, in the order begin, mid, end."""
    if max_len > config.max_seq_len:
        raise ValueError(
            f"init_cache: max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}"
        )
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    repeat_shape = (batch, config.n_repeat, *shape[1:])

    def reserved():
        return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    mid = RepeatCache(
        jnp.zeros(repeat_shape, dtype),
        jnp.zeros(repeat_shape, dtype),
        jnp.zeros(repeat_shape[:3], bool),
    )
    return Cache(
        tuple(reserved() for _ in range(config.n_layer_begin))
        + (mid,) * config.n_layer_mid
        + tuple(reserved() for _ in range(config.n_layer_end))
    )


def draw_capacities(key: jax.Array, n_repeat: int) -> jax.Array:
    """The authors' training budget: ``n_repeat - 1`` fractions ``min(1.05 U(0, 1), 1)`` sorted
    in decreasing order (so about 5% of the draws are exactly 1), float32 [n_repeat - 1]."""
    if n_repeat < 2:
        raise ValueError(f"draw_capacities: n_repeat must be >= 2, got {n_repeat}")
    draws = jnp.minimum(jax.random.uniform(key, (n_repeat - 1,)) * 1.05, 1.0)
    return -jnp.sort(-draws)


def budget_counts(budget, seq: int) -> jax.Array:
    """Tokens per row that run each repeat under ``budget`` (``n_repeat - 1`` fractions):
    int32 [n_repeat], ``n_1 = seq``, ``n_{r+1} = int(f_r / f_{r-1} * n_r)`` with ``f_0 = 1``."""
    budget = jnp.asarray(budget, jnp.float32)
    counts, previous, fraction = [jnp.int32(seq)], jnp.float32(1.0), None
    for r in range(budget.shape[0]):
        fraction = budget[r]
        ratio = jnp.where(previous > 0, fraction / jnp.maximum(previous, 1e-30), 0.0)
        # The tiny slack keeps e.g. 0.5 / 1 * 16 at 8 despite rounding in the division.
        counts.append(jnp.floor(ratio * counts[-1].astype(jnp.float32) + 1e-4).astype(jnp.int32))
        previous = fraction
    return jnp.stack(counts)


def _batch_key(tokens: jax.Array) -> jax.Array:
    """A PRNG key that is a function of the batch's token ids (a position-weighted hash)."""
    weights = jnp.arange(1, tokens.size + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
    digest = jnp.sum(tokens.reshape(-1).astype(jnp.uint32) * weights, dtype=jnp.uint32)
    return jax.random.fold_in(jax.random.key(0), digest)


def _top_active(scores: jax.Array, active: jax.Array, count: jax.Array) -> jax.Array:
    """[batch, seq] bool: per row the ``count`` highest ``scores`` among ``active`` tokens (ties
    to the earlier position)."""
    keyed = jnp.where(active, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-keyed, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    return active & (ranks < count)


def _mid_block(
    block: Block,
    x: jax.Array,
    positions: jax.Array,
    keys_values,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A shared block whose attention reads a repeat buffer.

    ``keys_values(k, v) -> (k_all, v_all, kv_positions, kv_segments, q_segments)`` stores this
    repeat's rotated keys/values and returns what the queries attend to. Returns
    ``(x', k, v)`` with this repeat's keys/values. The block's own attention is not called
    because it reads and writes a one-repeat :class:`LayerCache`; its parameters are used as
    they are, so a shared block is an ordinary Transformer block.
    """
    attn, c = block.attn, block.attn.config
    h = block.input_norm(x)
    dt = h.dtype

    def project(name):
        y = matmul(h, getattr(attn, f"{name}_proj")[...].astype(dt))
        if c.attention_bias:
            y = y + getattr(attn, f"{name}_bias")[...].astype(dt)
        return y

    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    q = apply_rope(project("q"), positions, inv_freq)
    k = apply_rope(project("k"), positions, inv_freq)
    v = project("v")
    k_all, v_all, kv_positions, kv_segments, q_segments = keys_values(k, v)
    out = ops.attention(
        q,
        k_all.astype(dt),
        v_all.astype(dt),
        q_positions=positions,
        kv_positions=kv_positions,
        causal=True,
        q_segment_ids=q_segments,
        kv_segment_ids=kv_segments,
        impl=c.attention_impl,
    )
    out = matmul(out, attn.o_proj[...].astype(dt), in_dims=2)
    if c.attention_bias:
        out = out + attn.o_bias[...].astype(dt)
    x = x + out
    return x + block.mlp(block.post_attention_norm(x)), k, v


def mid_visibility(n_repeat: int, repeat: int, cross_repeat: bool) -> np.ndarray:
    """[n_repeat] bool: the repeats (0-based) whose keys a query of ``repeat`` may see (NumPy:
    static under ``jit``)."""
    rho = np.arange(n_repeat)
    return rho <= repeat if cross_repeat else rho == repeat


class CoTFormer(LanguageModel):
    """The CoTFormer decoder (see the module docstring and :class:`LanguageModel`)."""

    def __init__(self, config: CoTFormerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        blocks = c.block_config()
        pd, std = c.storage_dtype, c.initializer_range
        self.embed = param(
            rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dtype=pd, std=std
        )
        n_begin, n_mid = c.n_layer_begin, c.n_layer_mid
        self.begin = nnx.List([Block(blocks, rngs, i) for i in range(n_begin)])
        self.mid = nnx.List([Block(blocks, rngs, n_begin + i) for i in range(n_mid)])
        self.end = nnx.List(
            [Block(blocks, rngs, n_begin + n_mid + i) for i in range(c.n_layer_end)]
        )
        norm = dict(eps=c.rms_norm_eps, param_dtype=pd, rngs=rngs)
        if c.ln_mid:
            self.ln_mid = RMSNorm(c.hidden_size, **norm)
        if c.depth_embedding == "linear":
            self.depth_embed = param(rngs, (c.hidden_size,), ("embed",), dtype=pd, std=std)
        elif c.depth_embedding == "per_repeat":
            self.depth_embed = param(
                rngs, (c.n_repeat, c.hidden_size), (None, "embed"), dtype=pd, std=std
            )
        if c.adaptive:
            self.router = param(
                rngs, (c.n_repeat - 1, c.hidden_size), (None, "embed"), dtype=pd, std=std
            )
        # "threshold", "sample" or a budget tuple (see the module docstring).
        self.routing: str | tuple[float, ...] = c.routing
        self.final_norm = RMSNorm(c.hidden_size, **norm)
        if not c.tie_embeddings:
            self.lm_head = param(
                rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dtype=pd, std=std
            )

    def _cache_kinds(self) -> tuple[type, ...]:
        c = self.config
        return (
            (LayerCache,) * c.n_layer_begin
            + (RepeatCache,) * c.n_layer_mid
            + (LayerCache,) * c.n_layer_end
        )

    def router_weights(self, x: jax.Array, repeat: int) -> jax.Array:
        """[batch, seq] float32 sigmoid score of ``x`` after ``repeat`` (0-based)."""
        u = self.router[repeat].astype(x.dtype)
        return jax.nn.sigmoid(jnp.einsum("bse,e->bs", x, u, preferred_element_type=jnp.float32))

    def _depth(self, repeat: int, dtype) -> jax.Array | float:
        c = self.config
        if c.depth_embedding == "linear":
            return (c.n_repeat - 1 - repeat) * self.depth_embed[...].astype(dtype)
        if c.depth_embedding == "per_repeat":
            return self.depth_embed[repeat].astype(dtype)
        return 0.0

    def _budget(self, tokens: jax.Array, decoding: bool) -> jax.Array | None:
        """Tokens per row per repeat of a budget routing, or None for the threshold rule."""
        routing, n_repeat, seq = self.routing, self.config.n_repeat, tokens.shape[1]
        if isinstance(routing, str) and routing == "threshold":
            return None
        if decoding:
            raise ValueError(
                f"CoTFormer.decode: routing must be 'threshold' to decode (a budget ranks tokens "
                f"over the whole sequence), got routing={routing!r}"
            )
        if isinstance(routing, str) and routing == "sample":
            return budget_counts(draw_capacities(_batch_key(tokens), n_repeat), seq)
        if isinstance(routing, str) or len(routing) != n_repeat - 1:
            raise ValueError(
                f"CoTFormer.routing must be 'threshold', 'sample' or {n_repeat - 1} fractions "
                f"(one per extra repeat), got {routing!r}"
            )
        return budget_counts(routing, seq)

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

        ``lengths`` is unused (attention needs only positions). The residuals of
        ``return_hidden`` are the embedding, each reserved block's output and each repeat's
        output (after gating), ``n_layer_begin + n_repeat + n_layer_end + 1`` arrays.
        """
        c = self.config
        del lengths
        if return_attention:
            raise ValueError(
                "CoTFormer: return_attention is not supported (the shared layers attend over a "
                "repeat buffer); got return_attention=True"
            )
        positions = checked_positions(
            "CoTFormer", tokens, positions, max_seq_len=c.max_seq_len, cached=cache is not None
        )
        batch, seq = tokens.shape
        counts = self._budget(tokens, cache is not None) if c.adaptive else None
        residual_axes = ("batch", "seq", "embed")
        x = constrain(
            jnp.take(self.embed[...], tokens, axis=0).astype(c.compute_dtype), residual_axes
        )
        residuals = [x]
        new_cache = [None] * len(self._cache_kinds())

        def call_block(block, y, layer_cache):
            return block(y, positions, segment_ids, layer_cache)

        call_mid = _mid_block
        if c.remat:
            call_block = nnx.remat(call_block)
            if cache is None:  # the cache reader writes the cache: decoding runs without remat

                def call_mid(block, y, positions, keys_values):
                    return nnx.remat(lambda b, z: _mid_block(b, z, positions, keys_values))(
                        block, y
                    )

        def reserved(blocks, first, y):
            for i, block in enumerate(blocks):
                y, new_cache[first + i] = call_block(
                    block, y, None if cache is None else cache[first + i]
                )
                y = constrain(y, residual_axes)
                residuals.append(y)
            return y

        x = reserved(self.begin, 0, x)
        x = self._repeats(x, positions, segment_ids, cache, new_cache, counts, call_mid, residuals)
        x = reserved(self.end, c.n_layer_begin + c.n_layer_mid, x)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
        x = self.final_norm(x)
        head = (
            self.embed[...].astype(x.dtype).T
            if c.tie_embeddings
            else self.lm_head[...].astype(x.dtype)
        )
        logits = matmul(x, head, preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "seq", "vocab"))
        hidden = HiddenStates(tuple(residuals), None, None) if return_hidden else None
        return logits, None if cache is None else Cache(tuple(new_cache)), hidden

    def _repeats(self, x, positions, segment_ids, cache, new_cache, counts, call_mid, residuals):
        """The shared stack ``n_repeat`` times; fills ``new_cache``'s mid entries when decoding."""
        c = self.config
        batch, seq = positions.shape
        first = c.n_layer_begin
        q_segments = jnp.zeros((batch, seq), jnp.int32) if segment_ids is None else segment_ids
        q_segments = q_segments.astype(jnp.int32)
        buffers = [[] for _ in range(c.n_layer_mid)]  # full forward: (k, v, kv segments) per repeat
        entries = [None if cache is None else cache[first + i] for i in range(c.n_layer_mid)]
        active = jnp.ones((batch, seq), bool)
        gate = None  # the router weights that admitted the active tokens to this repeat
        for repeat in range(c.n_repeat):
            x_in = x
            y = x + self._depth(repeat, x.dtype)
            kv_segments = jnp.where(active, q_segments, _HIDDEN)
            visible = mid_visibility(c.n_repeat, repeat, c.cross_repeat)
            for i, block in enumerate(self.mid):
                if cache is None:
                    keys_values = self._buffer_reader(
                        buffers[i], positions, kv_segments, q_segments, visible
                    )
                else:
                    keys_values = self._cache_reader(entries, i, repeat, positions, active, visible)
                y, k, v = call_mid(block, y, positions, keys_values)
                if cache is None:
                    buffers[i].append((k, v, kv_segments))
                y = constrain(y, ("batch", "seq", "embed"))
            if c.ln_mid:
                y = self.ln_mid(y)
            if c.adaptive and repeat > 0:
                w = gate.astype(y.dtype)[..., None]
                y = (1 - w) * x_in + w * y
                y = jnp.where(active[..., None], y, x_in)
            x = y
            residuals.append(x)
            if c.adaptive and repeat < c.n_repeat - 1:
                gate = self.router_weights(x, repeat)
                if counts is None:
                    active = active & (gate >= c.threshold)
                else:
                    active = _top_active(gate, active, counts[repeat + 1])
        if cache is not None:
            new_cache[first : first + c.n_layer_mid] = entries
        return x

    def _buffer_reader(self, buffer, positions, kv_segments, q_segments, visible):
        """Keys/values of the full forward: this call's repeats that ``visible`` allows."""

        def read(k, v):
            items = [*buffer, (k, v, kv_segments)]
            items = [item for rho, item in enumerate(items) if bool(visible[rho])]
            k_all = jnp.concatenate([item[0] for item in items], axis=1)
            v_all = jnp.concatenate([item[1] for item in items], axis=1)
            segs = jnp.concatenate([item[2] for item in items], axis=1)
            kv_positions = jnp.tile(positions, (1, len(items)))
            return k_all, v_all, kv_positions, segs, q_segments

        return read

    def _cache_reader(self, entries, layer, repeat, positions, active, visible):
        """Keys/values from the cache: writes this repeat's at slots ``positions`` first."""

        def read(k, v):
            entry = entries[layer]
            starts = positions[:, 0]

            def write(buffer, update):
                return jax.vmap(
                    lambda buf, upd, s: jax.lax.dynamic_update_slice(
                        buf, upd[None], (repeat, s) + (0,) * (buf.ndim - 2)
                    )
                )(buffer, update, starts)

            entry = RepeatCache(
                write(entry.k, k.astype(entry.k.dtype)),
                write(entry.v, v.astype(entry.v.dtype)),
                write(entry.reached, active),
            )
            entries[layer] = entry
            batch, n_repeat, max_len = entry.reached.shape
            flat = (batch, n_repeat * max_len, *entry.k.shape[3:])
            seen = entry.reached & visible[None, :, None]
            kv_segments = jnp.where(seen, 0, _HIDDEN).reshape(batch, n_repeat * max_len)
            kv_positions = jnp.broadcast_to(
                jnp.tile(jnp.arange(max_len, dtype=jnp.int32), n_repeat), kv_segments.shape
            )
            q_segments = jnp.zeros(positions.shape, jnp.int32)
            return (
                entry.k.reshape(flat),
                entry.v.reshape(flat),
                kv_positions,
                kv_segments,
                q_segments,
            )

        return read


def macs(config: CoTFormerConfig, seq_len: int, budget=None) -> int:
    """Multiply-accumulates of one forward pass over ``seq_len`` tokens (one row), as a model
    that drops exited tokens does them (the authors' perplexity-vs-MACs accounting).

    Counted: the q/k/v/o projections, the attention scores and weighted sums (every query
    against every key of the repeats it may see, ``r * seq_len`` keys at repeat ``r`` of a
    CoTFormer: the rectangle, not its causal half, as a dense kernel computes it), the SwiGLU
    MLP, the routers and the output head. Not counted: norms, rotary embeddings, softmax and the
    embedding lookup (no multiply-accumulates).

    Args:
      config: the model.
      seq_len: tokens in the row, >= 1.
      budget: ``n_repeat - 1`` fractions (an adaptive model's budget, see :func:`budget_counts`);
        None for full depth.
    """
    c = config
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"macs: seq_len must be a positive int, got {seq_len!r}")
    if budget is not None and (not c.adaptive or len(budget) != c.n_repeat - 1):
        raise ValueError(
            f"macs: budget needs an adaptive config and {c.n_repeat - 1} fractions, got "
            f"budget={budget!r} with adaptive={c.adaptive}"
        )
    counts = [seq_len] * c.n_repeat
    if budget is not None:
        counts = [int(n) for n in np.asarray(budget_counts(budget, seq_len))]
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_token = 2 * c.hidden_size * (q_width + kv_width) + 3 * c.hidden_size * c.intermediate_size
    per_pair = 2 * q_width  # scores and weighted values, over every query head

    def blocks(n_blocks, queries, keys):
        return n_blocks * (queries * per_token + queries * keys * per_pair)

    total = blocks(c.n_layer_begin + c.n_layer_end, seq_len, seq_len)
    for repeat, queries in enumerate(counts):
        keys = sum(counts[: repeat + 1]) if c.cross_repeat else queries
        total += blocks(c.n_layer_mid, queries, keys)
        if c.adaptive and repeat < c.n_repeat - 1:
            total += queries * c.hidden_size  # the router scores the tokens that ran this repeat
    return total + seq_len * c.hidden_size * c.vocab_size
