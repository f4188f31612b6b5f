"""The mixer protocol: what every data mixer (DoGE, DoReMi, ...) takes and gives.

A mixer is an ``init``/``update`` pair over a NamedTuple state, like an optax transformation::

    state = mixer.init()
    weights, state = mixer.update(Observation(domain_grads=grads), state)

``update(observation, state) -> (weights [k], state)`` always takes one :class:`Observation`:
its fields mean the same for every mixer, and each mixer reads the fields its rule needs (a
missing one is an error naming it). Mixers are registered by name in :data:`MIXERS`
(``MIXERS.get("doge")(num_domains=..., ...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from jaxlab.registry import Registry


class Observation(NamedTuple):
    """What a mixer sees at one step, for the ``k`` training domains (a pytree: it crosses
    ``jit``).

    Attributes:
      domain_grads: per-domain gradients, a pytree with a leading axis of ``k`` on every leaf
        (DoGE scores them); a domain absent from the batch has a zero gradient.
      target_grads: the target domains' gradients, leading axis ``m`` (DoGE's OOD objective).
      excess: ``[k]`` each domain's mean clipped excess loss over a reference model (DoReMi).
      present: ``[k]`` bool, the domain had counted tokens in the batch (None: all did); a
        mixer that reads it gives absent domains no step.
    """

    domain_grads: Any = None
    target_grads: Any = None
    excess: jax.Array | None = None
    present: jax.Array | None = None


def _identity(domain_grads):
    return domain_grads


class Mixer(NamedTuple):
    """``init() -> state``; ``update(observation, state) -> (weights, state)``;
    ``prepare(domain_grads)`` gives the per-domain gradients the model steps on (DoGE's
    per-domain clipping; identity otherwise); ``reads``: a pytree of bools like the gradients,
    the leaves of ``domain_grads`` and ``target_grads`` that ``update`` and ``prepare`` read
    (None: all), so a caller may pass zeros for the others instead of computing them."""

    init: Callable[[], Any]
    update: Callable[[Observation, Any], tuple[jax.Array, Any]]
    prepare: Callable[[Any], Any] = _identity
    reads: Any = None


def required(mixer: str, observation: Observation, field: str):
    """``observation.<field>``, or an error naming the mixer and the field it needs."""
    value = getattr(observation, field)
    if value is None:
        raise ValueError(f"{mixer}: update needs observation.{field}, got None")
    return value


# name -> factory ``(*, num_domains, **hyperparameters) -> Mixer``
MIXERS: Registry[Callable[..., Mixer]] = Registry("mixer", field="mixer")
