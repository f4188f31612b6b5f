"""Optimizers as optax transformations, chosen by name from ``config.optim``.

``build_optimizer(config.optim, total_steps)`` returns
``chain(clip_by_global_norm, <optimizer with a warm-up/decay learning-rate schedule>)``.
Weight decay applies to matrices only (not to norm scales or biases). Later modules register
their optimizers (e.g. AdEMAMix) with :func:`register_optimizer`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import optax

from jaxlab.optim._ademamix import (
    ScaleByAdemamixState,
    ademamix,
    alpha_schedule,
    beta3_schedule,
    scale_by_ademamix,
)
from jaxlab.optim.schedules import staged_schedule, warmup_decay_schedule
from jaxlab.registry import Registry

OptimizerFactory = Callable[[Any, optax.Schedule], optax.GradientTransformation]
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer", field="config.optim.name")


def register_optimizer(name: str, factory: OptimizerFactory, *, replace: bool = False) -> None:
    """``factory(optim_config, learning_rate_schedule) -> GradientTransformation``;
    ``replace=True`` to override a registered optimizer."""
    OPTIMIZERS.register(name, factory, replace=replace)


def available_optimizers() -> tuple[str, ...]:
    return OPTIMIZERS.names()


def decay_mask(params, *, decay_dwa: bool = False) -> Any:
    """True for parameters that get weight decay: matrices, not biases or norm scales.

    A parameter is decayed if it has two or more dimensions and its name does not end in
    ``bias`` (attention biases are stored as ``[heads, head_dim]``). The leading axis of layers
    stacked by ``scan_layers`` (``layers/<name>``, not ``layers/<i>/<name>``) does not count, so
    stacked norm scales stay undecayed as in the unrolled model. DenseFormer's
    depth-weighted-average weights (under ``dwa``) are decayed only if ``decay_dwa``.
    """

    def decays(path, p):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        if "dwa" in names:
            return decay_dwa
        after_layers = names[names.index("layers") + 1 :][:1] if "layers" in names else []
        stacked = bool(after_layers) and not after_layers[0].isdigit()
        return p.ndim - stacked >= 2 and not (names and names[-1].endswith("bias"))

    return jax.tree_util.tree_map_with_path(decays, params)


def _decay_mask(config):
    """The weight-decay mask a config asks for (``dwa_weight_decay``, default off)."""
    return functools.partial(decay_mask, decay_dwa=bool(_get(config, "dwa_weight_decay", False)))


def _get(config, name, default):
    return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)


register_optimizer(
    "adamw",
    lambda c, lr: optax.adamw(
        lr,
        b1=_get(c, "b1", 0.9),
        b2=_get(c, "b2", 0.999),
        eps=_get(c, "eps", 1e-8),
        weight_decay=_get(c, "weight_decay", 0.0),
        mask=_decay_mask(c),
    ),
)
register_optimizer(
    "adam",
    lambda c, lr: optax.adam(
        lr, b1=_get(c, "b1", 0.9), b2=_get(c, "b2", 0.999), eps=_get(c, "eps", 1e-8)
    ),
)
register_optimizer(
    "sgd",
    lambda c, lr: optax.sgd(
        lr, momentum=_get(c, "momentum", 0.0) or None, nesterov=_get(c, "nesterov", False)
    ),
)
register_optimizer(
    "lion",
    lambda c, lr: optax.lion(
        lr,
        b1=_get(c, "b1", 0.9),
        b2=_get(c, "b2", 0.99),
        weight_decay=_get(c, "weight_decay", 0.0),
        mask=_decay_mask(c),
    ),
)


def _ademamix_from_config(c, lr):
    """AdEMAMix with the paper's alpha/beta3 warm-ups over ``warmup_alpha_b3`` steps (0 = off)."""
    b1, warmup = _get(c, "b1", 0.9), _get(c, "warmup_alpha_b3", 0)
    return ademamix(
        lr,
        b1=b1,
        b2=_get(c, "b2", 0.999),
        b3=beta3_schedule(b1, _get(c, "b3", 0.9999), warmup),
        alpha=alpha_schedule(_get(c, "alpha", 5.0), warmup),
        eps=_get(c, "eps", 1e-8),
        weight_decay=_get(c, "weight_decay", 0.0),
        mask=_decay_mask(c),
        mu_dtype=_get(c, "mu_dtype", None) or None,
    )


register_optimizer("ademamix", _ademamix_from_config)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
    """The schedule described by ``config.optim`` (see :func:`warmup_decay_schedule`).

    ``config.stage_steps`` (step counts summing to ``total_steps``) restarts the whole schedule,
    warm-up included, at the start of every stage."""
    stages = tuple(_get(config, "stage_steps", ()) or ())
    if stages and sum(stages) != total_steps:
        raise ValueError(
            f"config.optim.stage_steps {list(stages)} must sum to the run's {total_steps} steps"
        )

    def one(steps):
        return warmup_decay_schedule(
            config.learning_rate,
            total_steps=steps,
            warmup_steps=_get(config, "warmup_steps", 0),
            decay=_get(config, "schedule", "cosine"),
            final_fraction=_get(config, "final_lr_fraction", 0.1),
            decay_steps=(_get(config, "decay_steps", None) or None) if not stages else None,
            wsd_decay_fraction=_get(config, "wsd_decay_fraction", 0.2),
            wsd_shape=_get(config, "wsd_shape", "linear"),
        )

    try:
        if stages:
            return staged_schedule([one(n) for n in stages], stages)
        return one(total_steps)
    except ValueError as e:  # name the config section the values came from
        raise ValueError(f"config.optim: {e}") from None


def param_path(path) -> str:
    """``a/b/c`` for a parameter's pytree key path: how config patterns name parameters."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def params_matching(params, patterns, field: str, *, strict: bool = True) -> Any:
    """A pytree of bools like ``params``: True where the parameter's path (``a/b/c``) contains
    one of ``patterns``; with ``strict``, patterns that match nothing are an error naming
    ``field``."""
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: any(p in param_path(path) for p in patterns), params
    )
    if strict and patterns and not any(jax.tree.leaves(mask)):
        raise ValueError(f"{field} {list(patterns)} match no parameter")
    return mask


def build_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """The optimizer named ``config.name``, with its schedule and gradient clipping.

    Args:
      config: ``config.optim``: ``name``, ``learning_rate`` and optional ``warmup_steps``,
        ``schedule``, ``final_lr_fraction``, ``decay_steps``, ``clip_norm`` (0 = off),
        ``weight_decay``, ``b1``, ``b2``, ``eps``, ``momentum``, ``nesterov``; for ``ademamix``
        also ``b3``, ``alpha``, ``warmup_alpha_b3`` and ``mu_dtype``; ``frozen``: path
        patterns of parameters that are not trained (see :func:`params_matching`);
        ``stage_steps``, ``wsd_decay_fraction``, ``wsd_shape``: see
        :func:`learning_rate_schedule`.
      total_steps: training steps, the schedule's horizon.
    """
    factory = OPTIMIZERS.get(config.name)
    lr = config.learning_rate
    if not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ValueError(f"config.optim.learning_rate must be a finite positive number, got {lr!r}")
    clip = _get(config, "clip_norm", 0.0)
    if clip < 0:
        raise ValueError(f"config.optim.clip_norm must be >= 0 (0 = off), got {clip}")
    if _get(config, "weight_decay", 0.0) < 0:
        raise ValueError(
            f"config.optim.weight_decay must be >= 0, got {_get(config, 'weight_decay', 0.0)}"
        )
    optimizer = factory(config, learning_rate_schedule(config, total_steps))
    if clip > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(clip), optimizer)
    frozen = tuple(_get(config, "frozen", ()) or ())
    if frozen:
        # Frozen leaves get zero updates and no optimizer state (no moments are allocated for
        # them); clipping sees only the trained leaves. Not strict: optax also calls the labels
        # on placeholders; the engine checks the patterns against the parameters.
        def labels(params):
            return jax.tree.map(
                lambda f: "frozen" if f else "trained",
                params_matching(params, frozen, "config.optim.frozen", strict=False),
            )

        optimizer = optax.multi_transform(
            {"trained": optimizer, "frozen": optax.set_to_zero()}, labels
        )
    return optimizer


__all__ = [
    "OPTIMIZERS",
    "ScaleByAdemamixState",
    "ademamix",
    "alpha_schedule",
    "beta3_schedule",
    "scale_by_ademamix",
    "available_optimizers",
    "build_optimizer",
    "decay_mask",
    "learning_rate_schedule",
    "param_path",
    "params_matching",
    "staged_schedule",
    "register_optimizer",
    "warmup_decay_schedule",
]
