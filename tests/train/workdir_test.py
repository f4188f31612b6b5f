"""The workdir's guards, each reproducing a failure first seen by hand: a second trainer, a
killed trainer's lock, a changed config on restart, a corrupt newest checkpoint, a full disk."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxlab.train import loop, workdir
from jaxlab.train.checkpoint import Checkpointer, CheckpointSaveError
from tests.train.loop_test import tiny_config


def hold_lock(path):
    """A process that takes the workdir lock and waits; returns it once the lock is held."""
    code = textwrap.dedent(f"""
        import sys, time
        from jaxlab.train.workdir import WorkdirLock
        with WorkdirLock({str(path)!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def params_of(summary):
    return [np.asarray(x) for x in jax.tree.leaves(summary.state.params)]


def test_a_second_trainer_is_refused_and_the_first_ones_files_stay(tmp_path):
    loop.train_and_evaluate(tiny_config(), str(tmp_path), stop_at=4)
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(
            workdir.WorkdirLockedError,
            match=rf"\.lock is held by a running trainer \(host .*, pid "
            rf"{holder.pid}",
        ):
            loop.train_and_evaluate(tiny_config(), str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4]


def test_a_killed_trainers_lock_does_not_block_its_restart(tmp_path):
    loop.train_and_evaluate(tiny_config(), str(tmp_path), stop_at=4)
    holder = hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)  # as kill -9 of a trainer: the lock file stays behind
    holder.wait()
    assert (tmp_path / workdir.LOCK_FILE).exists()
    resumed = loop.train_and_evaluate(tiny_config(), str(tmp_path))
    assert resumed.start_step == 4 and resumed.step == 8


def test_a_changed_config_is_refused_naming_the_fields_and_allowed_by_override(tmp_path):
    loop.train_and_evaluate(tiny_config(), str(tmp_path), stop_at=4)
    changed = tiny_config(seq_len=16, **{"optim.learning_rate": 1e-3, "data.seed": 3})
    with pytest.raises(workdir.ConfigChangedError) as error:
        loop.train_and_evaluate(changed, str(tmp_path))
    message = str(error.value)
    for field in (
        "seq_len: 32 -> 16",
        "optim.learning_rate: 0.003 -> 0.001",
        "data.seed: 0 -> 3",
        "config.allow_changes",
    ):
        assert field in message
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4]  # nothing moved

    # Scheduling fields change freely; num_steps only when allowed.
    longer = tiny_config(num_steps=12, eval_every=6, checkpoint_every=6)
    with pytest.raises(workdir.ConfigChangedError, match="num_steps: 8 -> 12"):
        loop.train_and_evaluate(longer, str(tmp_path))
    longer.allow_changes = ("num_steps,optim.warmup_steps",)  # what the command line gives
    resumed = loop.train_and_evaluate(longer, str(tmp_path))
    assert resumed.start_step == 4 and resumed.step == 12
    history = [json.loads(line) for line in open(tmp_path / "config_history.jsonl")]
    assert [h["start_step"] for h in history] == [0, 4]
    assert [h["config"]["num_steps"] for h in history] == [8, 12]


@pytest.mark.parametrize("damage", ["state", "data"])
def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, damage):
    full = loop.train_and_evaluate(tiny_config(), str(tmp_path / "full"))
    split = tmp_path / "split"
    loop.train_and_evaluate(tiny_config(), str(split))  # checkpoints 4 and 8
    if damage == "state":  # the array store of checkpoint 8
        for name in os.listdir(split / "checkpoints/8/state"):
            path = split / "checkpoints/8/state" / name
            if path.is_file() and name.startswith(("manifest", "_METADATA")):
                path.write_bytes(b"\x00garbage")
    else:  # the data iterator's JSON
        (split / "checkpoints/8/data/metadata").write_text("{not json")
    resumed = loop.train_and_evaluate(tiny_config(), str(split))
    assert resumed.start_step == 4 and resumed.step == 8
    assert (split / "corrupt_checkpoints/8").is_dir()  # kept, not deleted
    assert "checkpoint 8" in (split / "restore_errors.log").read_text()
    for a, b in zip(params_of(full), params_of(resumed), strict=True):
        np.testing.assert_array_equal(a, b)  # the retrained steps repeat the lost ones exactly


def test_a_failed_save_is_one_line_naming_the_cause_and_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
    save = Checkpointer._save

    def full_disk(self, step, *args):
        if step == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args)

    monkeypatch.setattr(Checkpointer, "_save", full_disk)
    with pytest.raises(CheckpointSaveError) as error:
        loop.train_and_evaluate(tiny_config(), str(tmp_path))
    message = str(error.value)
    assert "saving checkpoint 8" in message and "No space left on device" in message
    assert "the last good checkpoint is step 4" in message and "\n" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert "No space left" in (tmp_path / "checkpoint_errors.log").read_text()


def test_a_failure_every_checkpoint_shares_moves_nothing(tmp_path, monkeypatch):
    """Out of memory (or an unreadable filesystem) hits every checkpoint alike: that is not
    corruption, so no checkpoint is moved aside and the error surfaces."""
    loop.train_and_evaluate(tiny_config(), str(tmp_path))  # checkpoints 4 and 8

    def out_of_memory(self, step, abstract):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 80 GiB")

    monkeypatch.setattr(Checkpointer, "restore", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        loop.train_and_evaluate(tiny_config(num_steps=8), str(tmp_path))
    monkeypatch.undo()
    assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [4, 8]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_config_changes_ignore_new_fields_and_free_ones():
    stored = {"seq_len": 32, "model": {"remat": False, "hidden_size": 8}, "mesh": {"data": 1}}
    current = {
        "seq_len": 32,
        "model": {"remat": True, "hidden_size": 8, "new_field": 1},
        "mesh": {"data": 8},
        "added_later": {"x": 1},
    }
    assert workdir.config_changes(stored, current) == []
    current["model"]["hidden_size"] = 16
    assert workdir.config_changes(stored, current) == ["model.hidden_size: 8 -> 16"]
    assert workdir.config_changes(stored, current, workdir.allowed_fields("model")) == []
    assert workdir.allowed_fields(" num_steps, seq_len ") == ("num_steps", "seq_len")
