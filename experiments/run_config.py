"""The config an experiment entrypoint runs: ``--config=FILE`` with ``--config.x=`` overrides."""

from __future__ import annotations

import os

import ml_collections
from absl import flags
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


TEACHER_WORKDIR_HELP = (
    "The teacher's run directory (default WORKDIR/teacher); a finished run there is reused, a "
    "partial one resumed. Its stored config must equal --config's without the experiment block."
)


def define_flags(name: str, config_help: str, *, teacher_workdir: bool = False) -> None:
    """An experiment's flags: ``--workdir`` (default ``runs/NAME``), ``--config`` (default
    ``configs/NAME.py``, with ``--config.x=`` overrides) and, for an experiment that trains a
    teacher, ``--teacher_workdir``. Call it only when the experiment runs as a program, so that
    tests and other experiments can import the module beside another defining the same names."""
    flags.DEFINE_string("workdir", f"runs/{name}", "Output directory.")
    if teacher_workdir:
        flags.DEFINE_string("teacher_workdir", "", TEACHER_WORKDIR_HELP)
    config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"),
        config_help,
        lock_config=True,
    )
