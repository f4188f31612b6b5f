"""Getting training batches onto the devices: a background thread builds the next host batches
while the devices train, and each batch is placed on the mesh's batch sharding."""

from __future__ import annotations

import queue
import threading

import jax
import numpy as np

from jaxlab.data import pipeline
from jaxlab.train import sharding
from jaxlab.train.step import MODEL_INPUTS


def on_devices(batch: dict[str, np.ndarray], mesh, keys=MODEL_INPUTS) -> dict[str, jax.Array]:
    return sharding.global_batch_to_devices({k: batch[k] for k in keys}, mesh)


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
