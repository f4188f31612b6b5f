"""Placing training batches: this process's rows of the batch sharding, and per-process
placement equal to placing the global batch."""

import numpy as np

from jaxlab.train import feed, sharding


def test_one_process_holds_every_row_and_both_placements_agree():
    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    batch_size = 8
    assert feed.local_rows(mesh, batch_size) == range(batch_size)
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(0, 100, (batch_size, 5)),
        "targets": rng.integers(0, 100, (batch_size, 5)),
    }
    keys = ("inputs", "targets")
    index, count, place = feed.process_feed(mesh, batch_size)
    assert (index, count) == (0, 1)
    placed = place(batch, keys)
    local = feed.local_on_devices(batch, mesh, batch_size, keys)
    reference = feed.on_devices(batch, mesh, keys)
    for k in keys:
        np.testing.assert_array_equal(np.asarray(placed[k]), batch[k])
        np.testing.assert_array_equal(np.asarray(local[k]), batch[k])
        assert local[k].sharding == reference[k].sharding
        for a, b in zip(local[k].addressable_shards, reference[k].addressable_shards, strict=True):
            assert a.index == b.index and a.device == b.device
            np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
