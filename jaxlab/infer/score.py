"""Log-likelihood of given token sequences under a model (teacher forcing, one forward pass).

``token_logprobs(model, tokens)[b, t]`` is ``log p(tokens[b, t] | tokens[b, :t])`` under the
model's raw softmax (temperature 1, nothing filtered), in float32, for every ``t >= 1``; column 0
is 0 because the first token has no prefix and is never scored. ``token_logprobs_and_greedy``
adds, from the same forward pass, whether each token is the model's argmax after its prefix (the
token greedy decoding would have picked; lm-eval's ``is_greedy``). ``score(model, tokens, mask)``
sums those columns where ``mask`` is 1, so ``mask`` is aligned with ``tokens``: it marks the tokens
whose log-probability is counted, and ``mask[:, 0]`` is ignored. For likelihood-scored multiple
choice, ``tokens`` holds context + answer and ``mask`` the answer tokens; right-padded rows put 0
in ``mask`` on their padding (every jaxlab model is causal, so padding after a token never changes
its log-probability).

Both run the model once over ``[batch, seq]`` at positions ``0..seq-1`` (no segment ids), inside
one ``jax.jit`` compiled per shape; they work for any model in :mod:`jaxlab.models`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab.infer.sampling import check_token_ids


def token_logprobs(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    """Per-token log-probabilities of ``tokens`` given their prefixes.

    Args:
      model: any jaxlab language model (``model(tokens) -> [batch, seq, vocab]`` logits).
      tokens: [batch, seq] int ids in ``[0, vocab_size)``, ``batch >= 1``, ``seq >= 2``.

    Returns:
      [batch, seq] float32: column ``t >= 1`` is ``log softmax(logits[:, t - 1])[tokens[:, t]]``;
      column 0 is 0.
    """
    tokens = _check_tokens("token_logprobs", model, tokens)
    graphdef, state = nnx.split(model)
    return _token_logprobs(graphdef, state, jnp.asarray(tokens, jnp.int32))


def token_logprobs_and_greedy(model: nnx.Module, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`token_logprobs` and, from the same forward pass, where each token is the argmax.

    Args:
      model: any jaxlab language model (``model(tokens) -> [batch, seq, vocab]`` logits).
      tokens: [batch, seq] int ids in ``[0, vocab_size)``, ``batch >= 1``, ``seq >= 2``.

    Returns:
      ``(logprobs, greedy)``: [batch, seq] float32 as :func:`token_logprobs` returns, and
      [batch, seq] bool, column ``t >= 1`` true where ``tokens[:, t]`` is the argmax of
      ``logits[:, t - 1]`` (ties go to the lowest id, as ``argmax`` breaks them); column 0 is
      false.
    """
    tokens = _check_tokens("token_logprobs_and_greedy", model, tokens)
    graphdef, state = nnx.split(model)
    return _token_logprobs_and_greedy(graphdef, state, jnp.asarray(tokens, jnp.int32))


def score(model: nnx.Module, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Summed log-probability of the masked tokens of each row given their prefixes.

    Args:
      model: any jaxlab language model (``model(tokens) -> [batch, seq, vocab]`` logits).
      tokens: [batch, seq] int ids in ``[0, vocab_size)``, ``batch >= 1``, ``seq >= 2``.
      mask: [batch, seq] bool or 0/1 numbers, aligned with ``tokens``: 1 where that token's
        log-probability is counted. ``mask[:, 0]`` is ignored (the first token has no prefix).
        Default: every token after the first.

    Returns:
      [batch] float32 ``sum_{t >= 1} mask[:, t] * log p(tokens[:, t] | tokens[:, :t])``.
    """
    tokens = _check_tokens("score", model, tokens)
    if mask is None:
        mask = np.ones(tokens.shape, np.float32)
    else:
        mask = _check_mask(mask, tokens.shape)
    graphdef, state = nnx.split(model)
    return _score(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.float32))


def _check_tokens(fn: str, model: nnx.Module, tokens) -> np.ndarray:
    """[batch, seq] integer ids in the vocabulary, checked before any cast to int32."""
    array = np.asarray(tokens)
    if array.ndim != 2:
        hint = " (for one sequence, pass tokens[None])" if array.ndim == 1 else ""
        raise ValueError(f"{fn}: tokens must be [batch, seq] (2-D), got shape {array.shape}{hint}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{fn}: tokens must be integer ids, got dtype {array.dtype}")
    if array.shape[0] < 1:
        raise ValueError(f"{fn}: tokens must hold at least one row, got shape {array.shape}")
    if array.shape[1] < 2:
        raise ValueError(
            f"{fn}: tokens must have seq >= 2 (the first token is never scored), got shape "
            f"{array.shape}"
        )
    check_token_ids(array, model.config.vocab_size, f"{fn}: token", "tokens")
    max_len = getattr(model.config, "max_seq_len", None)
    if max_len is not None and array.shape[1] > max_len:
        raise ValueError(
            f"{fn}: tokens have seq={array.shape[1]}, more than the model's max_seq_len={max_len}"
        )
    return array.astype(np.int32)


def _check_mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(f"score: mask must have the tokens' shape {shape}, got {array.shape}")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise TypeError(f"score: mask must be bool or 0/1 numbers, got dtype {array.dtype}")
    bad = (array != 0) & (array != 1)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"score: mask values must be 0 or 1, got mask{list(where)} = {array[where]}"
        )
    return array


def _gathered_logprobs(model, tokens):
    """[batch, seq] float32 log p(tokens[:, t] | tokens[:, :t]) and bool "tokens[:, t] is the
    argmax", for t >= 1; zero and false at t = 0. Callers that drop the flags leave XLA to
    remove the argmax."""
    logits = model(tokens).astype(jnp.float32)[:, :-1]
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    logprobs = picked - jax.nn.logsumexp(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1) == tokens[:, 1:]
    return jnp.pad(logprobs, ((0, 0), (1, 0))), jnp.pad(greedy, ((0, 0), (1, 0)))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, state, tokens):
    return _gathered_logprobs(nnx.merge(graphdef, state), tokens)[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs_and_greedy(graphdef, state, tokens):
    return _gathered_logprobs(nnx.merge(graphdef, state), tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, state, tokens, mask):
    logprobs = _gathered_logprobs(nnx.merge(graphdef, state), tokens)[0]
    return jnp.sum(jnp.where(mask[:, 1:] != 0, logprobs[:, 1:], 0.0), axis=-1)
