"""What guards a run's workdir: one trainer at a time, resumes checked against the stored config,
and a corrupt newest checkpoint that does not block resuming.

* :class:`WorkdirLock`: an exclusive ``fcntl.flock`` on ``WORKDIR/.lock``. The kernel drops the
  lock when the holding process exits for any reason (``kill -9`` included), so a stale lock
  cannot exist: a restart after a crash takes it at once. The file records the holder's host, pid
  and start time for the error a second trainer gets. (``flock`` is per host: two trainers on
  different hosts of a shared filesystem are not excluded.)
* :func:`config_changes`: the fields that change what a run means (data, model, batch, sequence,
  seed, optimizer, objective, ...) in which a restart's config differs from the config stored with
  the checkpoint it resumes; the engine refuses such a resume unless the fields are listed in
  ``config.allow_changes`` (e.g. ``("num_steps",)`` to extend a run).
* :func:`restore_newest_intact`: the newest checkpoint that restores; a corrupt one is moved to
  ``WORKDIR/corrupt_checkpoints/STEP`` (never deleted), named in a one-line warning, and its
  traceback goes to ``WORKDIR/restore_errors.log``.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from jaxlab.train.checkpoint import Checkpointer

LOCK_FILE = ".lock"
# Top-level config fields a resumed run may change freely: they schedule evaluation, logging and
# checkpointing or place the same computation on devices, without changing what is computed.
FREE_FIELDS = (
    "eval_every",
    "eval_batches",
    "eval_per_source",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "mesh",
    "logical_axis_rules",
    "allow_changes",
    "init_from",  # read only by a fresh start
    "init_from_mode",
    "init_from_map",
)


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


class ConfigChangedError(ValueError):
    """A resume whose config differs from the run's stored config in fields that matter."""


class NoIntactCheckpointError(RuntimeError):
    """Every checkpoint in the workdir failed to restore."""


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds the workdir for one trainer (see the module doc)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._file = None

    def __enter__(self) -> WorkdirLock:
        file = open(self.path, "a+")  # noqa: SIM115  (held open while the lock lives)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise WorkdirLockedError(
                f"{self.path} is held by a running trainer ({holder}); wait for it to finish or "
                "stop it (the lock is released when that process exits)"
            ) from None
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now().isoformat(timespec="seconds")
        file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n")
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


def _normalise(value):
    return json.loads(json.dumps(value))  # tuples and lists compare equal, as JSON stores them


def config_changes(stored: dict, current: dict, allowed: Sequence[str] = ()) -> list[str]:
    """``"field: stored -> current"`` for every field that differs, other than
    :data:`FREE_FIELDS` and the ``allowed`` dotted names (a name also allows its subfields)."""
    free = tuple(FREE_FIELDS) + tuple(allowed)
    a, b = _flatten(_normalise(stored)), _flatten(_normalise(current))
    changes = []
    for name in sorted(set(a) | set(b)):
        if any(name == f or name.startswith(f + ".") for f in free):
            continue
        if a.get(name, "<absent>") != b.get(name, "<absent>"):
            changes.append(f"{name}: {a.get(name, '<absent>')!r} -> {b.get(name, '<absent>')!r}")
    return changes


def restore_newest_intact(
    checkpointer: Checkpointer,
    workdir: str,
    restore: Callable[[Checkpointer, int], Any],
    check_config: Callable[[int, dict], None],
) -> tuple[Checkpointer, int, Any]:
    """``(checkpointer, step, restored)`` from the newest checkpoint that restores.

    ``check_config(step, stored_config)`` may raise (a refused resume is not a corruption);
    ``restore(checkpointer, step)`` restores the state. A checkpoint whose config or state cannot
    be read is moved to ``WORKDIR/corrupt_checkpoints/STEP`` and the next older one is tried; the
    returned checkpointer no longer lists it.

    Raises:
      NoIntactCheckpointError: no checkpoint restores (the message names them and the log).
    """
    log = os.path.join(workdir, "restore_errors.log")
    corrupt = []
    while True:
        steps = sorted(checkpointer.all_steps(), reverse=True)
        if not steps:
            raise NoIntactCheckpointError(
                f"no checkpoint in {checkpointer.directory} restores: steps {corrupt} are "
                f"corrupt (moved to {os.path.join(workdir, 'corrupt_checkpoints')}; tracebacks "
                f"in {log})"
            )
        step = steps[0]
        try:
            stored = checkpointer.restore_config(step)
        except Exception as e:  # noqa: BLE001  (any failure to read means this one is unusable)
            error = e
        else:
            check_config(step, stored)
            try:
                return checkpointer, step, restore(checkpointer, step)
            except Exception as e:  # noqa: BLE001
                error = e
        with open(log, "a") as f:
            f.write(f"checkpoint {step} in {checkpointer.directory}:\n")
            f.write("".join(traceback.format_exception(error)) + "\n")
        aside = os.path.join(workdir, "corrupt_checkpoints", str(step))
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        if os.path.exists(aside):
            aside += "-" + datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        shutil.move(checkpointer.path(step), aside)
        cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        logging.warning(
            "checkpoint %d is corrupt (%s: %s); moved to %s, trying the previous one; the "
            "traceback is in %s", step, type(error).__name__, cause, aside, log
        )  # fmt: skip
        corrupt.append(step)
        directory, keep = checkpointer.directory, checkpointer.keep
        checkpointer.close()
        checkpointer = Checkpointer(directory, keep=keep)
