"""Sampling rules against their closed-form distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.infer import SamplingConfig, sample, sample_with_logprobs

LOGITS = np.log(np.array([0.05, 0.30, 0.10, 0.25, 0.02, 0.28]))


def _expected(config: SamplingConfig) -> np.ndarray:
    """The distribution each rule defines, computed directly in float64."""
    p = np.exp(LOGITS / config.temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    if config.top_k is not None:
        keep[order[: config.top_k]] = True
    else:
        keep[:] = True
    p = np.where(keep, p, 0)
    p /= p.sum()
    if config.top_p is not None:
        nucleus = np.zeros_like(keep)
        mass = 0.0
        for i in np.argsort(-p):
            if mass >= config.top_p or p[i] == 0:
                break
            nucleus[i] = True
            mass += p[i]
        p = np.where(nucleus, p, 0)
        p /= p.sum()
    return p


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.5),
        SamplingConfig(temperature=1.0, top_k=3),
        SamplingConfig(temperature=1.0, top_p=0.6),
        SamplingConfig(temperature=2.0, top_k=4, top_p=0.7),
    ],
)
def test_empirical_distribution_matches_closed_form(config):
    n = 40_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, LOGITS.size))
    # logits is an argument: closed over, XLA would constant-fold the sampling (15-19 s compiles).
    draws = np.asarray(jax.jit(lambda x, k: sample(x, k, config))(logits, jax.random.PRNGKey(0)))
    freq = np.bincount(draws, minlength=LOGITS.size) / n
    expected = _expected(config)
    assert (freq[expected == 0] == 0).all()
    # 4.5 standard errors of a binomial proportion.
    np.testing.assert_array_less(np.abs(freq - expected), 4.5 * np.sqrt(0.25 / n) + 1e-12)


def test_greedy_is_numpy_argmax_with_ties_and_nan():
    logits = np.array(jax.random.normal(jax.random.PRNGKey(1), (6, 50)))
    logits[1, [7, 30]] = logits[1].max() + 1.0  # tie: the first index wins
    logits[2, 11] = np.nan  # NaN wins, as in NumPy
    got = sample(jnp.asarray(logits), jax.random.PRNGKey(0), SamplingConfig())
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1.0), "temperature must be finite and >= 0"),
        (dict(top_k=0), "top_k must be an int >= 1"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_sampling_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(),
        SamplingConfig(temperature=0.5, top_k=4),
        SamplingConfig(top_p=0.6, temperature=1.0),
    ],
)
def test_sample_with_logprobs_draws_as_sample_and_scores_in_float64(config):
    logits = jax.random.normal(jax.random.PRNGKey(2), (64, 6)) * 2
    key = jax.random.PRNGKey(5)
    tokens, logprobs, sampling_logprobs = sample_with_logprobs(logits, key, config)
    np.testing.assert_array_equal(tokens, sample(logits, key, config))
    x = np.asarray(logits, np.float64)
    raw = x - x.max(-1, keepdims=True)
    raw = raw - np.log(np.exp(raw).sum(-1, keepdims=True))
    rows = np.arange(64)
    np.testing.assert_allclose(logprobs, raw[rows, np.asarray(tokens)], atol=1e-5)
    if config.greedy:
        np.testing.assert_array_equal(sampling_logprobs, 0.0)
        return
    for r in range(64):  # the rule's distribution, built as in _expected above
        p = np.exp(x[r] / config.temperature)
        p /= p.sum()
        order = np.argsort(-p)
        keep = np.zeros(6, bool)
        keep[order[: config.top_k or 6]] = True
        p = np.where(keep, p, 0) / p[keep].sum()
        if config.top_p is not None:
            nucleus, mass = np.zeros(6, bool), 0.0
            for i in np.argsort(-p):
                if mass >= config.top_p or p[i] == 0:
                    break
                nucleus[i], mass = True, mass + p[i]
            p = np.where(nucleus, p, 0) / p[nucleus].sum()
        np.testing.assert_allclose(sampling_logprobs[r], np.log(p[int(tokens[r])]), atol=1e-5)
