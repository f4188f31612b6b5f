"""Autoregressive decoding with a preallocated KV cache, compiled once per shape.

``generate`` runs prefill and every decode step inside one jitted function: the per-token loop is
a ``lax.while_loop`` (it exits early once every row has emitted a stop token), so there is no
Python work per token. Prompts of different lengths are right-padded; row ``b`` continues at
position ``prompt_lengths[b]``, overwriting its padding slots in the cache before they could ever
be attended to (attention is causal on positions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import models
from jaxlab.infer.sampling import SamplingConfig, sample
from jaxlab.models.transformer import KVCache, Transformer


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
      tokens: [batch, max_new_tokens] int32 generated ids; ``pad_id`` after a row stopped.
      lengths: [batch] int32 number of generated tokens per row, the stop token included.
    """

    tokens: jax.Array
    lengths: jax.Array


def prefill(
    model: Transformer,
    tokens: jax.Array,
    cache: KVCache,
    logits_at: jax.Array | None = None,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Runs ``tokens: [batch, seq]`` at positions ``0..seq-1`` and fills the cache.

    ``lengths: [batch]`` marks right padding: recurrent layers stop their state at each row's
    length (attention needs nothing more than positions).

    Returns:
      logits [batch, seq, vocab] (or [batch, 1, vocab] at ``logits_at: [batch]``) and the cache.
    """
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return model(tokens, positions=positions, cache=cache, logits_at=logits_at, lengths=lengths)


def decode_step(
    model: Transformer, tokens: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """One token per row: ``tokens: [batch]`` at ``positions: [batch]``.

    Returns:
      logits [batch, vocab] and the cache.
    """
    logits, cache = model(tokens[:, None], positions=positions[:, None], cache=cache)
    return logits[:, 0], cache


def _validate(model, prompts, prompt_lengths, max_new_tokens):
    if prompts.ndim != 2:
        raise ValueError(f"generate: prompts must be [batch, prompt_len], got {prompts.shape}")
    batch, prompt_len = prompts.shape
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (batch,):
        raise ValueError(f"generate: prompt_lengths must be [{batch}], got shape {lengths.shape}")
    if lengths.min() < 1 or lengths.max() > prompt_len:
        raise ValueError(
            f"generate: prompt_lengths must lie in [1, {prompt_len}], got {lengths.tolist()}"
        )
    ids = np.asarray(prompts)
    vocab = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(
            f"generate: prompt token ids must lie in [0, {vocab}), got min {ids.min()} and "
            f"max {ids.max()}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"generate: prompt_len + max_new_tokens = {total} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )


def generate(
    model: Transformer,
    prompts: jax.Array,
    prompt_lengths: jax.Array | Sequence[int] | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    rng: jax.Array | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: the decoder (a Transformer, a Mamba or hybrid LM: any model in jaxlab.models).
      prompts: [batch, prompt_len] int ids, right-padded.
      prompt_lengths: [batch] true lengths; default all ``prompt_len``.
      max_new_tokens: tokens to generate per row (fewer if a row stops).
      sampling: the sampling rule; default greedy.
      rng: PRNG key for sampling; default ``PRNGKey(0)``.
      stop_tokens: ids that end a row (the stop token is emitted); default the model config's
        ``eos_token_id``. Pass ``()`` to never stop early.
      pad_id: fills the output after a row stopped.
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompt_lengths is None:
        prompt_lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
    _validate(model, prompts, prompt_lengths, max_new_tokens)
    if stop_tokens is None:
        eos = getattr(model.config, "eos_token_id", None)
        stop_tokens = () if eos is None else (eos,) if isinstance(eos, int) else eos
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        prompts,
        jnp.asarray(prompt_lengths, jnp.int32),
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingConfig(),
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=pad_id,
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "sampling", "stop_tokens", "pad_id"),
)
def _generate(
    graphdef, state, prompts, prompt_lengths, rng, *, max_new_tokens, sampling, stop_tokens, pad_id
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompts.shape
    cache = models.make_cache(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = prefill(model, prompts, cache, logits_at=prompt_lengths - 1,
                            lengths=prompt_lengths)  # fmt: skip
    last = logits[:, 0]
    rng, key = jax.random.split(rng)
    first = sample(last, key, sampling)
    stop = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    class Carry(NamedTuple):
        step: jax.Array
        token: jax.Array  # [batch] the token emitted at this step
        done: jax.Array  # [batch] a stop token was emitted before this step
        out: jax.Array
        lengths: jax.Array
        cache: KVCache
        rng: jax.Array

    def cond(c: Carry):
        return (c.step < max_new_tokens) & ~jnp.all(c.done)

    def body(c: Carry):
        emitted = jnp.where(c.done, pad_id, c.token)
        out = c.out.at[:, c.step].set(emitted)
        lengths = c.lengths + (~c.done).astype(jnp.int32)
        done = c.done | jnp.isin(c.token, stop)
        logits, cache = decode_step(model, c.token, prompt_lengths + c.step, c.cache)
        rng, key = jax.random.split(c.rng)
        return Carry(c.step + 1, sample(logits, key, sampling), done, out, lengths, cache, rng)

    init = Carry(
        step=jnp.int32(0),
        token=first,
        done=jnp.zeros((batch,), bool),
        out=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        cache=cache,
        rng=rng,
    )
    final = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(final.out, final.lengths)
