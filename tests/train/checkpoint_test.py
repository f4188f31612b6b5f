"""jaxlab.train.checkpoint's state handler against orbax's standard one."""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.train.checkpoint import Checkpointer


def sharded_state(seed=0):
    """Replicated and partly sharded arrays on a 4 x 2 mesh of the 8 test devices, shaped so that
    orbax's replica-parallel writing would slice them (shards of a multiple of 1024 elements and
    of 128 columns)."""
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    rng = np.random.default_rng(seed)
    return {
        "w": jax.device_put(
            rng.standard_normal((8, 256), np.float32), NamedSharding(mesh, P(None, "tensor"))
        ),
        "emb": jax.device_put(rng.standard_normal((16, 128), np.float32), NamedSharding(mesh, P())),
        "step": jax.device_put(np.int32(seed + 3), NamedSharding(mesh, P())),
    }


def abstract(state):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def files(directory):
    """Relative paths of the files under ``directory``, OCDBT's data files as their folder (each
    write names them at random and may split the data among more or fewer of them)."""
    paths = set()
    for root, _, names in os.walk(directory):
        rel = os.path.relpath(root, directory)
        paths |= {rel + "/*" if os.path.basename(root) == "d" else f"{rel}/{n}" for n in names}
    return paths


def assert_restores(checkpointer, step, state, data, config):
    """Checkpoint ``step`` restores ``state`` bit-exactly onto its shardings, with ``data`` and
    ``config``."""
    restored, got_data, got_config = checkpointer.restore(step, abstract(state))
    assert (got_data, got_config) == (data, config)
    for name, value in state.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(value))
        assert restored[name].sharding == value.sharding


def test_a_save_in_one_process_compiles_nothing_and_restores_exactly(tmp_path, caplog):
    state = sharded_state(seed=1)
    checkpointer = Checkpointer(str(tmp_path / "ckpt"))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        checkpointer.save(1, state, {"pos": 5}, {"lr": 0.1})
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []  # orbax's replica-parallel write compiled a slice per array here

    assert_restores(checkpointer, 1, state, {"pos": 5}, {"lr": 0.1})
    checkpointer.close()


def test_checkpoints_written_by_orbaxs_standard_handler_restore_and_have_the_same_files(
    tmp_path,
):
    # What jaxlab wrote before its own state handler: orbax's StandardSave of the state.
    state = sharded_state()
    standard = ocp.CheckpointManager(
        str(tmp_path / "standard"),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_names=("state", "data", "config"),
    )
    standard.save(
        2,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"pos": 7}),
            config=ocp.args.JsonSave({"lr": 0.5}),
        ),
    )
    standard.wait_until_finished()
    standard.close()
    ours = Checkpointer(str(tmp_path / "ours"))
    ours.save(2, state, {"pos": 7}, {"lr": 0.5})
    ours.close()

    assert files(tmp_path / "standard") == files(tmp_path / "ours")
    reader = Checkpointer(str(tmp_path / "standard"), create=False)
    assert_restores(reader, 2, state, {"pos": 7}, {"lr": 0.5})
    reader.close()


def test_restoring_onto_a_leaf_without_a_sharding_is_an_error_naming_it(tmp_path):
    state = sharded_state()
    checkpointer = Checkpointer(str(tmp_path))
    checkpointer.save(1, state, {}, {})
    target = dict(abstract(state), emb=jax.ShapeDtypeStruct((16, 128), np.float32))
    with pytest.raises(ValueError, match=r"needs a sharding.*none: \['emb'\]$"):
        checkpointer.restore(1, target)
    checkpointer.close()
