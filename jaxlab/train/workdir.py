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
* :func:`restore_newest_intact`: the newest checkpoint that restores; newer ones that do not are
  moved to ``WORKDIR/corrupt_checkpoints/STEP`` (never deleted) once an older one has restored,
  named in a one-line warning, their tracebacks in ``WORKDIR/restore_errors.log``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

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
    "model.remat",  # recomputation and kernels: the same function, computed differently
    "model.attention_impl",
    "model.scan_impl",
    "allow_changes",
    "init_from",  # read only by a fresh start
    "init_from_mode",
    "init_from_map",
    "export_hf",  # written after the last step
    "export_hf_dtype",
)


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


class ConfigChangedError(ValueError):
    """A resume whose config differs from the run's stored config in fields that matter."""


@contextlib.contextmanager
def hold(workdir: str):
    """The workdir lock for a run of any number of processes: process 0 takes it and tells the
    others, so every process of a second launch stops before touching the workdir."""
    lock = WorkdirLock(workdir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.__enter__()
        except WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            error = WorkdirLockedError(
                f"{lock.path} is held by a running trainer (seen by process 0 of this run)"
            )
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        lock.__exit__()


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


def allowed_fields(value) -> tuple[str, ...]:
    """``config.allow_changes`` as field names, splitting entries on commas
    (``--config.allow_changes=num_steps,seq_len`` gives ``("num_steps,seq_len",)``)."""
    entries = [value] if isinstance(value, str) else list(value)
    return tuple(n.strip() for entry in entries for n in str(entry).split(",") if n.strip())


def config_changes(stored: dict, current: dict, allowed: Sequence[str] = ()) -> list[str]:
    """``"field: stored -> current"`` for every field that differs, other than
    :data:`FREE_FIELDS` and the ``allowed`` dotted names (a name also allows its subfields).
    A field the stored config lacks (added to the configs after the run started) is not a
    change."""
    free = tuple(FREE_FIELDS) + tuple(allowed)
    a, b = _flatten(_normalise(stored)), _flatten(_normalise(current))
    changes = []
    for name in sorted(set(a) | set(b)):
        if any(name == f or name.startswith(f + ".") for f in free) or name not in a:
            continue
        if a[name] != b.get(name, "<absent>"):
            changes.append(f"{name}: {a[name]!r} -> {b.get(name, '<absent>')!r}")
    return changes


def restore_newest_intact(
    checkpointer: Checkpointer,
    workdir: str,
    restore: Callable[[Checkpointer, int], Any],
    check_config: Callable[[int, dict], None],
) -> tuple[Checkpointer, int, Any]:
    """``(checkpointer, step, restored)`` from the newest checkpoint that restores.

    ``check_config(step, stored_config)`` may raise (a refused resume is not a corruption);
    ``restore(checkpointer, step)`` restores the state. When the newest checkpoint fails, the
    older ones are tried; only once one of them has restored are the newer, unreadable ones moved
    to ``WORKDIR/corrupt_checkpoints/STEP`` (never deleted), each named in a one-line warning with
    its traceback in ``WORKDIR/restore_errors.log``. If none restores, nothing is moved and the
    newest checkpoint's error is raised: a failure that hits every checkpoint (out of memory, an
    unreadable filesystem) is not corruption. A multi-process run does not fall back (each
    process would decide alone): it raises the error.
    """
    log = os.path.join(workdir, "restore_errors.log")
    steps = sorted(checkpointer.all_steps(), reverse=True)
    failed: list[tuple[int, BaseException]] = []
    for step in steps:
        try:
            stored = checkpointer.restore_config(step)
        except Exception as e:  # noqa: BLE001  (an unreadable config: try the previous one)
            failed.append((step, e))
        else:
            check_config(step, stored)
            try:
                restored = restore(checkpointer, step)
            except Exception as e:  # noqa: BLE001
                failed.append((step, e))
            else:
                break
        if jax.process_count() > 1:
            raise failed[0][1]
    else:
        raise failed[0][1]
    if not failed:
        return checkpointer, step, restored
    for bad, error in failed:
        with open(log, "a") as f:
            f.write(f"checkpoint {bad} in {checkpointer.directory}:\n")
            f.write("".join(traceback.format_exception(error)) + "\n")
        aside = os.path.join(workdir, "corrupt_checkpoints", str(bad))
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        if os.path.exists(aside):
            aside += "-" + datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        shutil.move(checkpointer.path(bad), aside)
        lines = str(error).strip().splitlines()
        logging.warning(
            "checkpoint %d does not restore (%s: %s); moved to %s and resumed from checkpoint "
            "%d; the traceback is in %s",
            bad,
            type(error).__name__,
            lines[0][:300] if lines else "",
            aside,
            step,
            log,
        )
    directory, keep = checkpointer.directory, checkpointer.keep
    checkpointer.close()
    return Checkpointer(directory, keep=keep), step, restored
