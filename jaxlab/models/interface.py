"""What every model family shares: one calling convention and one decoding-cache pytree.

Calling convention (:class:`LanguageModel`; the return type depends only on the method called
and on the two static inspection flags, never on array arguments):

* ``model(tokens, positions=..., segment_ids=..., logits_at=...)`` -> ``logits``: the forward
  pass of training, scoring and evaluation;
* ``model.decode(tokens, cache, positions=..., logits_at=..., lengths=...)`` ->
  ``(logits, cache)``: runs the tokens from the state in ``cache`` and returns the updated cache
  (a prompt, then one token per step);
* ``return_hidden=True`` or ``return_attention=True`` (Python bools, fixed at the call site)
  append one :class:`~jaxlab.models.layers.HiddenStates` to either result: ``(logits, hidden)``
  and ``(logits, cache, hidden)``.

Cache: a :class:`Cache` for every family, holding one entry per layer: a :class:`LayerCache` (keys
and values) for an attention layer, a :class:`MixerCache` (conv tail and scan state) for a Mamba
layer. All three are registered pytree dataclasses, so ``jax.tree`` functions, ``jit`` arguments,
``lax.while_loop`` carries and ``jnp.repeat`` over the batch treat every family alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxlab.models.layers import HiddenStates


@struct.dataclass
class LayerCache:
    """Keys and values of one attention layer for every cache slot.

    Attributes:
      k: [batch, max_len, kv_heads, head_dim]
      v: [batch, max_len, kv_heads, head_dim]
    """

    k: jax.Array
    v: jax.Array


@struct.dataclass
class MixerCache:
    """State of one Mamba mixer.

    Attributes:
      conv: [batch, conv_kernel - 1, conv channels] the conv's last inputs.
      ssm: the scan state (float32): [batch, inner, state] (mamba1, mamba1_qkv) or [batch, heads,
        head_dim, state] (mamba2s).
    """

    conv: jax.Array
    ssm: jax.Array


@struct.dataclass
class Cache:
    """The decoding cache of a model: ``layers[i]`` is layer ``i``'s :class:`LayerCache` or
    :class:`MixerCache`. ``len(cache)`` and ``cache[i]`` read the layers."""

    layers: tuple[LayerCache | MixerCache, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerCache | MixerCache:
        return self.layers[layer]


def check_cache(owner: str, cache, kinds: tuple[type, ...]) -> None:
    """Raises unless ``cache`` is a :class:`Cache` whose layer ``i`` is a ``kinds[i]``.

    Args:
      owner: who checks, for the message (``"Transformer.decode"``).
      cache: the argument as given.
      kinds: the expected entry type of every layer of the model.
    """
    if not isinstance(cache, Cache):
        raise TypeError(
            f"{owner}: cache must be a jaxlab.models.interface.Cache (from init_cache or "
            f"jaxlab.models.make_cache), got {type(cache).__name__}"
        )
    if len(cache) != len(kinds):
        raise ValueError(f"{owner}: cache has {len(cache)} layers, the model has {len(kinds)}")
    for i, (entry, kind) in enumerate(zip(cache.layers, kinds, strict=True)):
        if not isinstance(entry, kind):
            raise TypeError(
                f"{owner}: cache.layers[{i}] must be a {kind.__name__} for this model's layer "
                f"{i}, got {type(entry).__name__}"
            )


def config_values(cls: type, values) -> dict[str, Any]:
    """``values`` (a mapping, e.g. an ``ml_collections.ConfigDict``) as a dict for the config
    dataclass ``cls``; unknown keys are an error rather than silently ignored."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; known: {sorted(known)}")
    return values


def checked_positions(
    owner: str, tokens, positions, *, max_seq_len: int | None = None, cached: bool = False
):
    """``positions`` for ``tokens`` [batch, seq] (default ``arange(seq)`` per row), after the
    input checks every family makes: tokens are 2-D, positions have their shape, and a forward
    pass without a cache is at most ``max_seq_len`` long. ``owner`` names the model in errors."""
    if tokens.ndim != 2:
        raise ValueError(f"{owner}: tokens must be [batch, seq], got shape {tokens.shape}")
    batch, seq = tokens.shape
    if max_seq_len is not None and not cached and seq > max_seq_len:
        raise ValueError(f"{owner}: sequence length {seq} exceeds max_seq_len={max_seq_len}")
    if positions is None:
        return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    if positions.shape != tokens.shape:
        raise ValueError(
            f"{owner}: positions shape {positions.shape} must equal tokens shape {tokens.shape}"
        )
    return positions


class LanguageModel(nnx.Module):
    """The calling convention of every language model family (see the module docstring).

    A family defines ``_run(tokens, positions, segment_ids, cache, logits_at, lengths,
    return_hidden, return_attention) -> (logits, new cache or None, HiddenStates or None)``, the
    one loop behind both methods, and ``_cache_kinds() -> tuple[type, ...]``, the :class:`Cache`
    entry type of each layer.
    """

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        return_hidden: bool = False,
        return_attention: bool = False,
    ) -> jax.Array | tuple[jax.Array, HiddenStates]:
        """The forward pass.

        Args:
          tokens: [batch, seq] int token ids.
          positions: [batch, seq] int positions; default ``arange(seq)`` per row.
          segment_ids: [batch, seq] ints; tokens attend only within their segment (packing).
          logits_at: [batch] int; if given, logits only at that position of each row (e.g. the
            last prompt token), which skips the vocabulary projection everywhere else.
          return_hidden: also return a :class:`HiddenStates` with the residual stream:
            ``num_layers + 1`` arrays [batch, seq, embed] (the embedding output, then each
            layer's output), always over the whole sequence, even with ``logits_at``.
          return_attention: also return, in the same :class:`HiddenStates`, each layer's
            attention probabilities [batch, heads, seq, seq] float32 (``None`` for a layer
            without attention). Implies the residuals too.

        Returns:
          logits [batch, seq, vocab] float32 ([batch, 1, vocab] with ``logits_at``), or
          ``(logits, hidden)`` when ``return_hidden`` or ``return_attention`` is set.
        """
        logits, _, hidden = self._run(
            tokens, positions, segment_ids, None, logits_at, None, return_hidden, return_attention
        )
        return logits if hidden is None else (logits, hidden)

    def decode(
        self,
        tokens: jax.Array,
        cache: Cache,
        *,
        positions: jax.Array | None = None,
        logits_at: jax.Array | None = None,
        lengths: jax.Array | None = None,
        return_hidden: bool = False,
        return_attention: bool = False,
    ) -> tuple[jax.Array, Cache] | tuple[jax.Array, Cache, HiddenStates]:
        """Runs ``tokens`` from the state in ``cache``.

        Args:
          tokens: [batch, seq] int token ids.
          cache: a :class:`Cache` from the family's ``init_cache`` (or
            :func:`jaxlab.models.make_cache`) or from an earlier ``decode``.
          positions: [batch, seq] int positions, contiguous per row; they are also the KV-cache
            slots written. Default ``arange(seq)`` per row.
          logits_at: as for the forward pass.
          lengths: [batch] valid tokens of right-padded rows: recurrent states and conv tails
            stop at each row's length (attention needs only positions: decoding overwrites the
            padded slots before any query can see them).
          return_hidden, return_attention: as for the forward pass; attention probabilities are
            [batch, heads, seq, max_len] over the cache slots.

        Returns:
          ``(logits, cache)``, the updated cache a :class:`Cache` of the same structure, or
          ``(logits, cache, hidden)`` when ``return_hidden`` or ``return_attention`` is set.
        """
        check_cache(f"{type(self).__name__}.decode", cache, self._cache_kinds())
        logits, cache, hidden = self._run(
            tokens, positions, None, cache, logits_at, lengths, return_hidden, return_attention
        )
        return (logits, cache) if hidden is None else (logits, cache, hidden)
