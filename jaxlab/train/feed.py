"""Getting training batches onto the devices: a background thread builds the next host batches
while the devices train, and each batch is placed on the mesh's batch sharding."""

from __future__ import annotations

import json
import queue
import threading

import jax
import numpy as np
from absl import logging

from jaxlab.data import pipeline
from jaxlab.train import sharding
from jaxlab.train.step import MODEL_INPUTS


def on_devices(batch: dict[str, np.ndarray], mesh, keys=MODEL_INPUTS) -> dict[str, jax.Array]:
    """Places a host-side global batch (every process holds all rows)."""
    return sharding.global_batch_to_devices({k: batch[k] for k in keys}, mesh)


def local_rows(mesh, batch_size: int) -> range | None:
    """The rows of a ``batch_size`` global batch that this process's devices hold under the
    batch sharding, when they are one contiguous block (None otherwise)."""
    indices = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    held = sorted({i for index in indices.values() for i in range(batch_size)[index[0]]})
    if not held or held != list(range(held[0], held[-1] + 1)):
        return None
    return range(held[0], held[-1] + 1)


def local_on_devices(
    batch: dict[str, np.ndarray], mesh, batch_size: int, keys=MODEL_INPUTS
) -> dict[str, jax.Array]:
    """Places this process's rows (:func:`local_rows`) of a ``batch_size`` global batch."""
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding, batch[k], (batch_size, *batch[k].shape[1:])
        )
        for k in keys
    }


def process_feed(mesh, batch_size: int):
    """``(process_index, process_count, place)`` for the training iterator: each process builds
    only the rows its devices hold when those are the block :func:`pipeline.process_rows` gives
    it; otherwise (a mesh whose batch rows interleave across processes) every process builds
    the global batch, as before."""
    index, count = jax.process_index(), jax.process_count()
    if (
        count > 1
        and batch_size % count == 0
        and local_rows(mesh, batch_size) == pipeline.process_rows(batch_size, index, count)
    ):
        rows = pipeline.process_rows(batch_size, index, count)
        logging.info(
            "data: process %d of %d builds rows [%d, %d) of %d",
            index,
            count,
            rows.start,
            rows.stop,
            batch_size,
        )

        def place(batch, keys=MODEL_INPUTS):
            return local_on_devices(batch, mesh, batch_size, keys)

        return index, count, place
    if count > 1:
        logging.warning(
            "data: this mesh does not give process %d a contiguous block of batch rows; every "
            "process builds the whole global batch of %d rows",
            index,
            batch_size,
        )

    def place_global(batch, keys=MODEL_INPUTS):
        return on_devices(batch, mesh, keys)

    return 0, 1, place_global


class Prefetcher:
    """Builds the next batches on a background thread while the devices train.

    Each batch comes with the iterator state *after* it, so a checkpoint stores the position of
    the batches consumed, not of those merely prefetched.
    """

    def __init__(self, iterator: pipeline.DataIterator, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.state = iterator.get_state()

        def produce():
            try:
                while not self._stop.is_set():
                    item = (next(iterator), iterator.get_state())
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
            except BaseException as e:  # surfaced in the training thread
                self._queue.put(e)

        self._thread = threading.Thread(target=produce, daemon=True, name="jaxlab-data")
        self._thread.start()

    def next(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.state = item
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def gather_data_state(state: dict, process_count: int) -> dict:
    """Every process's data state merged into one (:func:`pipeline.merge_states`), for the
    checkpoint. Only process 0's state is written, and alone it would make every other process
    re-read its lanes' documents from the start of the run on resume; the merged state holds
    each lane where the process that built it left it. A collective: every process calls it
    at the same step."""
    if process_count == 1 or "streams" not in state:  # one process, or qa: (global) batches
        return state
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([encoded.size]))).ravel()
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: encoded.size] = encoded
    rows = np.asarray(multihost_utils.process_allgather(padded))
    states = [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths, strict=True)]
    return pipeline.merge_states(states)
