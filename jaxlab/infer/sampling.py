"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), composable."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token from logits.

    Attributes:
      temperature: a finite real >= 0. 0 means greedy (argmax); otherwise logits are divided by
        it before sampling.
      top_k: an int >= 1; if set, sample only among the ``top_k`` most likely tokens.
      top_p: a real in (0, 1]; if set, sample only from the smallest set of most likely tokens
        whose probability reaches ``top_p`` (applied after temperature and top-k).

    Raises:
      TypeError: a field of the wrong type (``top_k=2.0``, a string, a bool, an array).
      ValueError: a value out of range (negative or non-finite temperature, ``top_k < 1``,
        ``top_p`` outside (0, 1] or NaN).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        # Checked (and normalised to Python scalars, so the config hashes as a static jit
        # argument) before anything is traced: NaN or inf would silently give garbage tokens.
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(
                f"SamplingConfig.temperature must be a real number >= 0 (0 = greedy), got {t!r}"
            )
        if not math.isfinite(t) or t < 0:
            raise ValueError(
                f"SamplingConfig.temperature must be finite and >= 0 (0 = greedy), got {t!r}"
            )
        object.__setattr__(self, "temperature", float(t))
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"SamplingConfig.top_k must be an int >= 1 or None, got {k!r}")
            if k < 1:
                raise ValueError(f"SamplingConfig.top_k must be an int >= 1 or None, got {k!r}")
            object.__setattr__(self, "top_k", int(k))
        p = self.top_p
        if p is not None:
            if isinstance(p, bool) or not isinstance(p, numbers.Real):
                raise TypeError(
                    f"SamplingConfig.top_p must be a real number in (0, 1] or None, got {p!r}"
                )
            if not 0 < p <= 1:  # also refuses NaN
                raise ValueError(f"SamplingConfig.top_p must be in (0, 1] or None, got {p!r}")
            object.__setattr__(self, "top_p", float(p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Applies temperature, top-k, top-p to ``logits: [batch, vocab]``; dropped tokens get -inf."""
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if config.top_p is not None and config.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the mass of strictly more likely tokens is below top_p.
        keep = mass_before < config.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, _NEG_INF, logits)
    return logits


def greedy(logits: jax.Array) -> jax.Array:
    """``argmax`` over the last axis (first index on ties, first NaN if any), as int32.

    Written as max, compare, min-index because XLA:CPU's argmax reduction is ~4x slower at
    vocabulary sizes (2.3 ms vs 0.3 ms on [16, 32000]), a large share of a decode step.
    """
    best = jnp.max(logits, axis=-1, keepdims=True)
    hit = (logits == best) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def sample(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    """Picks one token per row.

    Args:
      logits: [batch, vocab] float.
      rng: PRNG key (unused when greedy).
      config: the sampling rule.

    Returns:
      [batch] int32 token ids.
    """
    if config.greedy:
        return greedy(logits)
    return jax.random.categorical(rng, filter_logits(logits, config), axis=-1).astype(jnp.int32)


def sample_with_logprobs(
    logits: jax.Array, rng: jax.Array, config: SamplingConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Picks one token per row (as :func:`sample`, same draws) and returns its log-probabilities.

    Args:
      logits: [batch, vocab] float.
      rng: PRNG key (unused when greedy).
      config: the sampling rule.

    Returns:
      ``(tokens, logprobs, sampling_logprobs)``: [batch] int32 token ids; [batch] float32
      ``log softmax(logits)[token]``, the model's own log-probability (temperature 1, nothing
      filtered); [batch] float32 the log-probability under the distribution the token was drawn
      from (after temperature, top-k and top-p; 0 when greedy, a point mass).
    """
    logits = logits.astype(jnp.float32)
    if config.greedy:
        tokens = greedy(logits)
        sampling_logprobs = jnp.zeros(tokens.shape, jnp.float32)
    else:
        filtered = filter_logits(logits, config)
        tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
        sampling_logprobs = _gather(filtered, tokens) - jax.nn.logsumexp(filtered, axis=-1)
    logprobs = _gather(logits, tokens) - jax.nn.logsumexp(logits, axis=-1)
    return tokens, logprobs, sampling_logprobs


def _gather(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]


def check_token_ids(ids: np.ndarray, vocab: int, what: str, array_name: str) -> None:
    """Raises unless every id of the integer array ``ids`` lies in ``[0, vocab)`` (checked before
    any cast, so huge ids cannot wrap), naming ``what`` and the first offending
    ``array_name[position]``."""
    if ids.min() < 0 or ids.max() >= vocab:
        bad = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= vocab))[0])
        raise ValueError(
            f"{what} ids must lie in [0, {vocab}) (the model's vocab_size), got "
            f"{array_name}{list(bad)} = {ids[bad]} (min {ids.min()}, max {ids.max()})"
        )
