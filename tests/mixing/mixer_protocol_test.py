"""Every registered mixer satisfies one protocol: ``update(Observation, state) -> (weights,
state)``, with each field meaning the same for every mixer (checked against the NumPy rules of
doge_test.py), fields a mixer does not read leaving its result unchanged, and a missing field it
needs named in the error."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import mixing
from tests.mixing.doge_test import random_grads

K = 3
HYPER = {
    "doge": dict(mu=0.5, lr_schedule=0.1, smoothing=0.01),
    "doremi": dict(step_size=0.5, smoothing=0.01),
}


def full_observation(seed=0):
    """Every field the protocol has, for ``K`` domains (domain 2 absent from the batch)."""
    rng = np.random.default_rng(seed)
    grads = random_grads(rng, K)
    grads = jax.tree.map(lambda g: g.at[2].set(0.0), grads)
    return mixing.Observation(
        domain_grads=grads,
        excess=jnp.asarray([0.3, 1.2, 0.0], jnp.float32),
        present=jnp.asarray([True, True, False]),
    )


def expected_weights(name, observation):
    """The rule each mixer's brief gives, in float64 NumPy, from the observation's fields."""
    log_w = np.log(np.full(K, 1.0 / K))
    if name == "doge":  # universal scores; the mean norm is over the domains present
        leaves = jax.tree.leaves(observation.domain_grads)
        g = np.concatenate([np.asarray(x, np.float64).reshape(K, -1) for x in leaves], axis=1)
        gram = g @ g.T
        norms = np.linalg.norm(g, axis=1)
        scores = 0.1 * (gram.sum(1) - np.diag(gram)) / (norms[norms > 0].mean() + 1e-6)
        step = np.clip(scores, 0.0, 0.1 * 5.0) / 0.5
    else:
        step = 0.5 * np.asarray(observation.excess, np.float64) * np.asarray(observation.present)
    z = log_w + step
    w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    return 0.99 * w + 0.01 / K


def test_both_mixers_are_registered():
    assert mixing.MIXERS.names() == ("doge", "doremi")
    assert mixing.MIXERS.get("doge") is mixing.doge
    assert mixing.MIXERS.get("doremi") is mixing.doremi


@pytest.mark.parametrize("name", ["doge", "doremi"])
def test_mixer_satisfies_the_protocol(name):
    mixer = mixing.MIXERS.get(name)(num_domains=K, **HYPER[name])
    assert isinstance(mixer, mixing.Mixer)
    assert list(inspect.signature(mixer.update).parameters) == ["observation", "state"]
    state = mixer.init()
    observation = full_observation()
    weights, new_state = jax.jit(mixer.update)(observation, state)
    assert weights.shape == (K,) and float(jnp.sum(weights)) == pytest.approx(1.0, abs=1e-6)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(mixing.current_weights(new_state), weights, rtol=1e-6)
    # The fields a mixer does not read change nothing: each reads only its own.
    unread = {"doge": ("excess", "present"), "doremi": ("domain_grads",)}[name]
    alone, _ = mixer.update(observation._replace(**dict.fromkeys(unread)), state)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(weights))


@pytest.mark.parametrize("name", ["doge", "doremi"])
def test_fields_mean_the_same_for_every_mixer(name):
    observation = full_observation(seed=1)
    mixer = mixing.MIXERS.get(name)(num_domains=K, **HYPER[name])
    weights, _ = mixer.update(observation, mixer.init())
    np.testing.assert_allclose(np.asarray(weights), expected_weights(name, observation), rtol=1e-5)


@pytest.mark.parametrize("name, field", [("doge", "domain_grads"), ("doremi", "excess")])
def test_a_missing_field_is_named(name, field):
    mixer = mixing.MIXERS.get(name)(num_domains=K, **HYPER[name])
    with pytest.raises(ValueError, match=rf"{name}: update needs observation.{field}, got None"):
        mixer.update(mixing.Observation(), mixer.init())
