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
from jaxlab.infer.sampling import SamplingConfig, check_token_ids, sample_with_logprobs
from jaxlab.models.interface import Cache, LanguageModel

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
    model: LanguageModel,
    tokens: jax.Array,
    cache: Cache,
    logits_at: jax.Array | None = None,
    lengths: jax.Array | None = None,
) -> tuple[jax.Array, Cache]:
    """Runs ``tokens: [batch, seq]`` at positions ``0..seq-1`` and fills the cache.

    ``lengths: [batch]`` marks right padding: recurrent layers stop their state at each row's
    length (attention needs nothing more than positions).

    Returns:
      logits [batch, seq, vocab] (or [batch, 1, vocab] at ``logits_at: [batch]``) and the cache.
    """
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return model.decode(tokens, cache, positions=positions, logits_at=logits_at, lengths=lengths)


def decode_step(
    model: LanguageModel, tokens: jax.Array, positions: jax.Array, cache: Cache
) -> tuple[jax.Array, Cache]:
    """One token per row: ``tokens: [batch]`` at ``positions: [batch]``.

    Returns:
      logits [batch, vocab] and the cache.
    """
    logits, cache = model.decode(tokens[:, None], cache, positions=positions[:, None])
    return logits[:, 0], cache


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_int(name: str, value, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"generate: {name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"generate: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_prompts(model, prompts) -> np.ndarray:
    """[batch, prompt_len] integer ids in the vocabulary, checked before any cast to int32."""
    ids = np.asarray(prompts)
    if ids.ndim != 2:
        hint = " (for one prompt, pass prompts[None])" if ids.ndim == 1 else ""
        raise ValueError(
            f"generate: prompts must be [batch, prompt_len] (2-D), got shape {ids.shape}{hint}"
        )
    if ids.dtype == bool or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"generate: prompts must be integer token ids, got dtype {ids.dtype}")
    batch, prompt_len = ids.shape
    if batch < 1 or prompt_len < 1:
        raise ValueError(
            f"generate: prompts must hold at least one prompt of at least one token, got shape "
            f"{ids.shape}"
        )
    check_token_ids(ids, model.config.vocab_size, "generate: prompt token", "prompts")
    return ids.astype(np.int32)


def _check_prompt_lengths(prompt_lengths, batch: int, prompt_len: int) -> np.ndarray:
    if prompt_lengths is None:
        return np.full((batch,), prompt_len, np.int32)
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (batch,):
        raise ValueError(
            f"generate: prompt_lengths must be [{batch}] (one length per prompt), got shape "
            f"{lengths.shape}"
        )
    if lengths.dtype == bool or not np.issubdtype(lengths.dtype, np.integer):
        raise TypeError(
            f"generate: prompt_lengths must be integers, got dtype {lengths.dtype}: "
            f"{lengths.tolist()}"
        )
    if lengths.min() < 1 or lengths.max() > prompt_len:
        raise ValueError(
            f"generate: prompt_lengths must lie in [1, {prompt_len}] (prompt_len), got "
            f"{lengths.tolist()}"
        )
    return lengths.astype(np.int32)


def _check_token_ids(name: str, value, vocab: int, source: str = "") -> tuple[int, ...]:
    """A sequence of ids in [0, vocab) (``source`` says where a default came from)."""
    what = f"{name}{source}"
    if _is_int(value) or isinstance(value, str | bytes):
        raise TypeError(
            f"generate: {what} must be a sequence of int token ids such as ({value!r},), got "
            f"{value!r}"
        )
    if isinstance(value, np.ndarray | jax.Array):
        if value.ndim != 1:
            raise TypeError(
                f"generate: {what} must be a 1-D sequence of int token ids, got an array of "
                f"shape {value.shape}"
            )
        items = np.asarray(value).tolist()
    else:
        try:
            items = list(value)
        except TypeError as e:
            raise TypeError(
                f"generate: {what} must be a sequence of int token ids, got {value!r}"
            ) from e
    for i, token in enumerate(items):
        if not _is_int(token):
            raise TypeError(
                f"generate: {what}[{i}] must be an int token id in [0, {vocab}), got {token!r}"
            )
        if not 0 <= token < vocab:
            raise ValueError(
                f"generate: {what}[{i}] must lie in [0, {vocab}) (the model's vocab_size), got "
                f"{token}"
            )
    return tuple(int(t) for t in items)


def _validate(
    model,
    prompts,
    prompt_lengths,
    max_new_tokens,
    sampling,
    stop_tokens,
    pad_id,
    num_samples,
    stop_strings,
    tokenizer,
):
    """Checks every argument of :func:`generate` before anything is traced.

    Returns:
      ``(prompts, prompt_lengths, max_new_tokens, stop_tokens, pad_id, num_samples)``: int32
      NumPy arrays and Python ints.
    """
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise TypeError(
            f"generate: sampling must be a jaxlab.infer.SamplingConfig or None (greedy), got "
            f"{sampling!r}"
        )
    vocab = model.config.vocab_size
    ids = _check_prompts(model, prompts)
    batch, prompt_len = ids.shape
    lengths = _check_prompt_lengths(prompt_lengths, batch, prompt_len)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    total = prompt_len + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"generate: prompt_len + max_new_tokens = {total} exceeds the model's "
            f"max_seq_len={model.config.max_seq_len}"
        )
    num_samples = _check_int("num_samples", num_samples, 1)
    if stop_tokens is None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = () if eos is None else (eos,) if _is_int(eos) else eos
        source = f" (default: model.config.eos_token_id={eos!r})"
        stop_tokens = _check_token_ids("stop_tokens", eos, vocab, source)
    else:
        stop_tokens = _check_token_ids("stop_tokens", stop_tokens, vocab)
    # pad_id only fills the int32 output, so any int32 works; one outside the vocabulary (-1)
    # cannot be mistaken for a generated token.
    if not _is_int(pad_id):
        raise TypeError(f"generate: pad_id must be an int (an int32 value), got {pad_id!r}")
    if not _INT32_MIN <= pad_id <= _INT32_MAX:
        raise ValueError(
            f"generate: pad_id must fit the int32 output, [{_INT32_MIN}, {_INT32_MAX}], got "
            f"{pad_id}"
        )
    for i, text in enumerate(stop_strings):
        if not isinstance(text, str) or not text:
            raise ValueError(f"generate: stop_strings[{i}] must be a non-empty str, got {text!r}")
    if stop_strings and tokenizer is None:
        raise ValueError(
            f"generate: stop_strings={tuple(stop_strings)!r} need a tokenizer to decode the "
            "generated ids, got tokenizer=None"
        )
    return ids, lengths, max_new_tokens, stop_tokens, int(pad_id), num_samples


def generate(
    model: LanguageModel,
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
      prompts: [batch, prompt_len] int ids in ``[0, vocab_size)``, right-padded; ``batch`` and
        ``prompt_len`` >= 1 (a single prompt is ``prompts[None]``).
      prompt_lengths: [batch] int true lengths in ``[1, prompt_len]``; default all ``prompt_len``.
      max_new_tokens: int >= 1, tokens to generate per row (fewer if a row stops).
      sampling: a :class:`SamplingConfig`; default greedy.
      rng: PRNG key for sampling; default ``PRNGKey(0)``.
      stop_tokens: a sequence of int ids in ``[0, vocab_size)`` that end a row (the stop token is
        emitted); default the model config's ``eos_token_id``. Pass ``()`` to never stop early.
      pad_id: an int32 value that fills the output after a row stopped; one outside the
        vocabulary (such as -1) cannot be mistaken for a generated token.
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

    Raises:
      TypeError, ValueError: every argument is checked on the host before anything is traced;
        the message names the argument, what was expected and what was given (ids are checked
        before the cast to int32, so nothing wraps or truncates).
    """
    if isinstance(stop_strings, str):
        raise TypeError(
            f"generate: stop_strings must be a sequence of strings such as ({stop_strings!r},), "
            f"got the str {stop_strings!r}"
        )
    stop_strings = tuple(stop_strings)
    prompts, prompt_lengths, max_new_tokens, stop_tokens, pad_id, num_samples = _validate(
        model,
        prompts,
        prompt_lengths,
        max_new_tokens,
        sampling,
        stop_tokens,
        pad_id,
        num_samples,
        stop_strings,
        tokenizer,
    )
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        jnp.asarray(prompts),
        jnp.asarray(prompt_lengths),
        jax.random.PRNGKey(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingConfig(),
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        num_samples=num_samples,
    )
    if stop_strings:
        out = truncate_at_stop_strings(out, stop_strings, tokenizer, pad_id=pad_id)
    return out


def generate_in_batches(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int | Sequence[int],
    width: int | None = None,
    pad_id: int = 0,
    **options,
) -> list[np.ndarray]:
    """:func:`generate` over a list of prompts of any lengths, ``batch_size`` at a time.

    Every call gets the same shape, so it compiles once: the prompts are right-padded with
    ``pad_id`` to ``width`` (default the longest prompt) and the last call is filled up with
    copies of its first prompt, whose outputs are dropped.

    Args:
      prompts: token id lists, each at least one token and at most ``width``.
      batch_size: prompts per call (calls have ``min(batch_size, len(prompts))`` rows).
      max_new_tokens: one budget for every call, or one per call (``ceil(len(prompts) /
        batch_size)`` of them).
      options: the rest of :func:`generate`'s keywords (``stop_tokens``, ``stop_strings``,
        ``tokenizer``, ``sampling``, ...).

    Returns:
      Per prompt, its generated tokens up to its length (a stop token included).
    """
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"generate_in_batches: batch_size must be an int >= 1, got {batch_size!r}")
    if not prompts:
        raise ValueError("generate_in_batches: prompts must hold at least one prompt, got none")
    calls = -(-len(prompts) // batch_size)
    budgets = [max_new_tokens] * calls if _is_int(max_new_tokens) else list(max_new_tokens)
    if len(budgets) != calls:
        raise ValueError(
            f"generate_in_batches: max_new_tokens must be one int or one per call ({calls} calls "
            f"of {batch_size} prompts), got {len(budgets)} budgets"
        )
    longest = max(len(p) for p in prompts)
    width = longest if width is None else width
    if longest > width:
        raise ValueError(
            f"generate_in_batches: width must hold the longest prompt ({longest} tokens), got "
            f"{width}"
        )
    rows_per_call, outputs = min(batch_size, len(prompts)), []
    for call, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (rows_per_call - real)
        ids = np.full((rows_per_call, width), pad_id, np.int32)
        for row, prompt in enumerate(chunk):
            ids[row, : len(prompt)] = prompt
        out = generate(
            model,
            ids,
            [len(p) for p in chunk],
            max_new_tokens=int(budgets[call]),
            pad_id=pad_id,
            **options,
        )
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        outputs += [tokens[r, : lengths[r]] for r in range(real)]
    return outputs


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
        jnp.asarray(tokens),
        jnp.asarray(lengths),
        jnp.asarray(logprobs),
        jnp.asarray(sampling_logprobs),
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "sampling",
        "stop_tokens",
        "pad_id",
        "num_samples",
    ),
)
def _generate(
    graphdef,
    state,
    prompts,
    prompt_lengths,
    rng,
    *,
    max_new_tokens,
    sampling,
    stop_tokens,
    pad_id,
    num_samples,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompts.shape
    cache = models.make_cache(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = prefill(
        model, prompts, cache, logits_at=prompt_lengths - 1, lengths=prompt_lengths
    )
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
        cache: Cache
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
