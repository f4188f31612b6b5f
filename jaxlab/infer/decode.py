"""Autoregressive decoding with a preallocated KV cache, compiled once per shape.

``generate`` runs prefill and every decode step inside one jitted function: the per-token loop is
a ``lax.while_loop`` (it exits early once every row has emitted a stop token), so there is no
Python work per token. Prompts of different lengths are right-padded; row ``b`` continues at
position ``prompt_lengths[b]``, overwriting its padding slots in the cache before they could ever
be attended to (attention is causal on positions).

``num_samples=n`` draws ``n`` completions per prompt from one prefill: the batch of prompts is
prefilled once, then the cache (KV caches and recurrent states) and the last logits are repeated
``n`` times along the batch (``jnp.repeat``, so the copies of one prompt are adjacent) and
``batch * n`` rows are decoded. Each step draws from one key for all rows;
``jax.random.categorical`` uses independent noise per row, so the copies are independent samples.

Stop tokens are handled on the device (the loop exits once every row has stopped). Stop strings
are handled on the host after the loop: each row is decoded with the tokenizer and cut after the
first token at which its decoded text contains a stop string (see :func:`generate`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlab import models
from jaxlab.infer.sampling import SamplingConfig, sample_with_logprobs
from jaxlab.models.transformer import KVCache, Transformer

if TYPE_CHECKING:
    from jaxlab.data.tokenizers import Tokenizer


class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Rows are ``batch * num_samples``, prompt-major: row ``b * num_samples + i`` is sample ``i`` of
    prompt ``b`` (``reshape(batch, num_samples, ...)`` groups them); with the default
    ``num_samples=1`` rows are the prompts.

    Attributes:
      tokens: [rows, max_new_tokens] int32 generated ids; ``pad_id`` after a row stopped.
      lengths: [rows] int32 number of generated tokens per row, the stop token (or the token that
        completed a stop string) included.
      logprobs: [rows, max_new_tokens] float32 log-probability of each generated token under the
        model's raw softmax, ``log softmax(logits)[token]`` (temperature 1, no top-k/top-p), the
        quantity :func:`jaxlab.infer.score` sums; 0 after a row stopped.
      sampling_logprobs: [rows, max_new_tokens] float32 log-probability of each generated token
        under the distribution it was actually drawn from (after temperature, top-k, top-p); 0
        when greedy (a point mass) and after a row stopped.
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array


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


def _validate(model, prompts, prompt_lengths, max_new_tokens, num_samples, stop_strings, tokenizer):
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
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise TypeError(f"generate: num_samples must be an int >= 1, got {num_samples!r}")
    if num_samples < 1:
        raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
    for i, text in enumerate(stop_strings):
        if not isinstance(text, str) or not text:
            raise ValueError(f"generate: stop_strings[{i}] must be a non-empty str, got {text!r}")
    if stop_strings and tokenizer is None:
        raise ValueError(
            f"generate: stop_strings={tuple(stop_strings)!r} need a tokenizer to decode the "
            "generated ids, got tokenizer=None"
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
    num_samples: int = 1,
    stop_strings: Sequence[str] = (),
    tokenizer: Tokenizer | None = None,
) -> GenerateOutput:
    """Generates up to ``max_new_tokens`` tokens after each prompt, ``num_samples`` times.

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
      num_samples: completions per prompt, all from one prefill of ``prompts`` (the cache and the
        last logits are repeated along the batch). The output has ``batch * num_samples`` rows,
        prompt-major (see :class:`GenerateOutput`); sample with a temperature > 0 to make them
        differ.
      stop_strings: strings that end a row, checked on the host after generation: row ``r`` is
        cut after its first token ``k`` (1-based) such that ``tokenizer.decode(tokens[r, :k])``
        contains one of them. Tokens ``k:`` become ``pad_id`` (log-probabilities 0) and
        ``lengths[r] = k``. The token that completes the stop string is kept, as a stop token
        is, so the text may run past the stop string inside that last token. Only generated
        text is searched (not the prompt). The device loop does not stop early for them.
      tokenizer: decodes rows for ``stop_strings`` (a :class:`jaxlab.data.tokenizers.Tokenizer`).

    Returns:
      A :class:`GenerateOutput`: tokens, lengths and log-probabilities of ``batch * num_samples``
      rows (``batch`` with the default ``num_samples=1``).
    """
    prompts = jnp.asarray(prompts, jnp.int32)
    if prompt_lengths is None:
        prompt_lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
    if isinstance(stop_strings, str):
        raise TypeError(
            f"generate: stop_strings must be a sequence of strings such as ({stop_strings!r},), "
            f"got the str {stop_strings!r}"
        )
    stop_strings = tuple(stop_strings)
    _validate(model, prompts, prompt_lengths, max_new_tokens, num_samples, stop_strings,
              tokenizer)  # fmt: skip
    if stop_tokens is None:
        eos = getattr(model.config, "eos_token_id", None)
        stop_tokens = () if eos is None else (eos,) if isinstance(eos, int) else eos
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        prompts,
        jnp.asarray(prompt_lengths, jnp.int32),
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingConfig(),
        stop_tokens=tuple(int(t) for t in stop_tokens),
        pad_id=pad_id,
        num_samples=int(num_samples),
    )
    if stop_strings:
        out = truncate_at_stop_strings(out, stop_strings, tokenizer, pad_id=pad_id)
    return out


def truncate_at_stop_strings(
    out: GenerateOutput, stop_strings: Sequence[str], tokenizer: Tokenizer, *, pad_id: int = 0
) -> GenerateOutput:
    """Cuts each row after the first token at which its decoded text contains a stop string.

    Row ``r`` keeps its first ``k`` tokens for the smallest ``k <= lengths[r]`` such that
    ``tokenizer.decode(tokens[r, :k])`` contains one of ``stop_strings`` (rows that never contain
    one are unchanged); the rest become ``pad_id`` with log-probabilities 0, and
    ``lengths[r] = k``. Runs on the host (NumPy); :func:`generate` calls it for ``stop_strings``.
    """
    tokens = np.array(out.tokens)
    lengths = np.array(out.lengths)
    logprobs = np.array(out.logprobs)
    sampling_logprobs = np.array(out.sampling_logprobs)

    def contains(ids):
        text = tokenizer.decode(ids)
        return any(s in text for s in stop_strings)

    changed = False
    for r in range(tokens.shape[0]):
        n = int(lengths[r])
        if n == 0 or not contains(tokens[r, :n]):
            continue
        # Decoding is not prefix-monotone in general (bytes of a multi-byte character, a
        # tokenizer's leading-space rule), so the first hit is found by scanning prefixes.
        k = next(k for k in range(1, n + 1) if contains(tokens[r, :k]))
        if k < n:
            changed = True
            tokens[r, k:] = pad_id
            logprobs[r, k:] = 0.0
            sampling_logprobs[r, k:] = 0.0
            lengths[r] = k
    if not changed:
        return out
    return GenerateOutput(
        jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(logprobs),
        jnp.asarray(sampling_logprobs),
    )  # fmt: skip


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef", "max_new_tokens", "sampling", "stop_tokens", "pad_id", "num_samples",
    ),
)  # fmt: skip
def _generate(
    graphdef, state, prompts, prompt_lengths, rng, *, max_new_tokens, sampling, stop_tokens, pad_id,
    num_samples,
):  # fmt: skip
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompts.shape
    cache = models.make_cache(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = prefill(model, prompts, cache, logits_at=prompt_lengths - 1,
                            lengths=prompt_lengths)  # fmt: skip
    last = logits[:, 0]
    if num_samples > 1:
        # One prefill, n copies: rows b*n .. b*n + n-1 continue prompt b.
        last, cache, prompt_lengths = jax.tree.map(
            lambda x: jnp.repeat(x, num_samples, axis=0), (last, cache, prompt_lengths)
        )
    rows = batch * num_samples
    rng, key = jax.random.split(rng)
    first, first_lp, first_slp = sample_with_logprobs(last, key, sampling)
    stop = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    class Carry(NamedTuple):
        step: jax.Array
        token: jax.Array  # [rows] the token emitted at this step
        logprob: jax.Array  # [rows] its raw model log-probability
        sampling_logprob: jax.Array  # [rows] its log-probability under the sampling rule
        done: jax.Array  # [rows] a stop token was emitted before this step
        out: jax.Array
        out_logprobs: jax.Array
        out_sampling_logprobs: jax.Array
        lengths: jax.Array
        cache: KVCache
        rng: jax.Array

    def cond(c: Carry):
        return (c.step < max_new_tokens) & ~jnp.all(c.done)

    def body(c: Carry):
        emitted = jnp.where(c.done, pad_id, c.token)
        out = c.out.at[:, c.step].set(emitted)
        out_lp = c.out_logprobs.at[:, c.step].set(jnp.where(c.done, 0.0, c.logprob))
        out_slp = c.out_sampling_logprobs.at[:, c.step].set(
            jnp.where(c.done, 0.0, c.sampling_logprob)
        )
        lengths = c.lengths + (~c.done).astype(jnp.int32)
        done = c.done | jnp.isin(c.token, stop)
        logits, cache = decode_step(model, c.token, prompt_lengths + c.step, c.cache)
        rng, key = jax.random.split(c.rng)
        token, lp, slp = sample_with_logprobs(logits, key, sampling)
        return Carry(c.step + 1, token, lp, slp, done, out, out_lp, out_slp, lengths, cache, rng)

    init = Carry(
        step=jnp.int32(0),
        token=first,
        logprob=first_lp,
        sampling_logprob=first_slp,
        done=jnp.zeros((rows,), bool),
        out=jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
        out_logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
        out_sampling_logprobs=jnp.zeros((rows, max_new_tokens), jnp.float32),
        lengths=jnp.zeros((rows,), jnp.int32),
        cache=cache,
        rng=rng,
    )
    final = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(final.out, final.lengths, final.out_logprobs, final.out_sampling_logprobs)
