"""The config an experiment entrypoint runs: ``--config=FILE`` with ``--config.x=`` overrides."""

from __future__ import annotations

import ml_collections
from ml_collections import config_flags

from configs import lm_tiny


def rescaled(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """``config`` with an overridden ``num_steps`` rescaling the run as
    :func:`configs.lm_tiny.with_num_steps` does (evaluations, final checkpoint, warm-ups), except
    for the fields ``overrides`` (flattened, ``{"optim.warmup_steps": 5}``) sets itself."""
    if "num_steps" in overrides:
        lm_tiny.with_num_steps(config, config.num_steps)
        config.update_from_flattened_dict(overrides)
    return config


def from_flag(flag, defaults: dict | None = None) -> ml_collections.ConfigDict:
    """The value of a ``config_flags`` flag (``FLAGS["config"]``), rescaled by :func:`rescaled`.

    ``defaults`` (flattened, ``{"model.num_layers": 2}``): an entrypoint's own settings (a
    benchmark's ``--quick`` shapes), applied over the config file but under the explicit
    ``--config.`` overrides, which keep their values."""
    overrides = config_flags.get_override_values(flag)
    config = rescaled(flag.value, overrides)
    if defaults:
        config.update_from_flattened_dict(defaults)
        config.update_from_flattened_dict(overrides)
    return config
