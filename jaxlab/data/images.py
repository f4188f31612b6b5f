"""Image-classification datasets from local files (nothing is downloaded).

* ``load_mnist(path, split)``: MNIST or Fashion-MNIST (same format) from a directory holding the
  original IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...``, each
  optionally ``.gz``), or from an ``.npz`` with ``x_train, y_train, x_test, y_test`` (Keras' file).
* ``load_cifar10(path, split)``: the "python version" directory (``data_batch_1..5``,
  ``test_batch`` pickles).

Both return ``(images uint8 [n, H, W, C], labels int32 [n])``.
"""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

_SPLITS = ("train", "test")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _check_split(split: str):
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def read_idx(path: str) -> np.ndarray:
    """One IDX file (optionally gzipped): magic ``0 0 type ndim``, big-endian int32 sizes, data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"read_idx: {path!r} is not an IDX file (magic bytes {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, ">i4", ndim, offset=4))
    data = np.frombuffer(raw, _IDX_TYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"read_idx: {path!r} holds {data.size} values for shape {shape}")
    return data.reshape(shape)


def _find(directory: str, stem: str) -> str:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"load_mnist: no {stem}[.gz] in {directory!r}")


def load_mnist(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST / Fashion-MNIST from IDX files in a directory or from an ``.npz`` (module doc)."""
    _check_split(split)
    if os.path.isfile(path) and path.endswith(".npz"):
        with np.load(path) as archive:
            key = "train" if split == "train" else "test"
            images, labels = archive[f"x_{key}"], archive[f"y_{key}"]
    elif os.path.isdir(path):
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_find(path, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(path, f"{prefix}-labels-idx1-ubyte"))
    else:
        raise FileNotFoundError(f"load_mnist: path must be a directory of IDX files or an .npz "
                                f"file, got {path!r}")  # fmt: skip
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"load_mnist: expected images [n, H, W] and labels [n], got "
                         f"{images.shape} and {labels.shape}")  # fmt: skip
    return images.astype(np.uint8)[..., None], labels.astype(np.int32)


def load_cifar10(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the python-version batch pickles in ``path``."""
    _check_split(split)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"load_cifar10: no {name} in {path!r}")
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], np.int32))
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)
