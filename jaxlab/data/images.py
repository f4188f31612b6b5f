"""Image-classification datasets from local files (nothing is downloaded).

* ``load_mnist(path, split)``: MNIST or Fashion-MNIST (same format) from a directory holding the
  original IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...``, each
  optionally ``.gz``), or from an ``.npz`` with ``x_train, y_train, x_test, y_test`` (Keras' file).
* ``load_cifar10(path, split)``: the CIFAR-10 "binary version" directory
  (``cifar-10-batches-bin``: ``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``;
  each record is one label byte and 3072 pixel bytes, the red, green and blue 32 x 32 planes in
  row-major order), or an ``.npz`` with ``x_train [n, 32, 32, 3], y_train, x_test, y_test``
  (Keras' arrays). The "python version" (pickled batches) is refused without being opened:
  unpickling a file can run arbitrary code.

Both return ``(images uint8 [n, H, W, C], labels int32 [n])``. Files are never unpickled:
``.npz`` archives are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import os
import zipfile

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
        key = "train" if split == "train" else "test"
        images, labels = _read_npz(path, f"x_{key}", f"y_{key}", "load_mnist")
    elif os.path.isdir(path):
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_find(path, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(path, f"{prefix}-labels-idx1-ubyte"))
    else:
        raise FileNotFoundError(
            f"load_mnist: path must be a directory of IDX files or an .npz file, got {path!r}"
        )
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"load_mnist: expected images [n, H, W] and labels [n], got "
            f"{images.shape} and {labels.shape}"
        )
    return images.astype(np.uint8)[..., None], labels.astype(np.int32)


def _read_npz(path: str, x_key: str, y_key: str, caller: str) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays of an ``.npz``, never unpickled (object arrays are refused)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{caller}: {path!r} is not a readable .npz archive ({e})") from e
    with archive:
        found = sorted(archive.files)
        arrays = []
        for key in (x_key, y_key):
            if key not in found:
                raise ValueError(f"{caller}: {path!r} has no array {key!r}; it holds {found}")
            try:
                arrays.append(archive[key])
            except ValueError as e:  # an object array: reading it would unpickle
                raise ValueError(
                    f"{caller}: {path}: array {key!r} is stored as pickled "
                    f"objects, which are never loaded; expected a numeric "
                    f"array ({e})"
                ) from e
    return arrays[0], arrays[1]


_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then the R, G, B planes of 32 x 32 bytes
_CIFAR_PICKLES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_CIFAR_FORMATS = (
    "the binary version (cifar-10-binary.tar.gz, unpacked: a cifar-10-batches-bin directory "
    "with data_batch_1.bin .. data_batch_5.bin and test_batch.bin) or an .npz with x_train "
    "[n, 32, 32, 3] uint8, y_train, x_test, y_test"
)


def _cifar_directory(path: str, names: list[str]) -> str:
    """``path`` or its ``cifar-10-batches-bin`` subdirectory, whichever holds the batches."""
    for directory in (path, os.path.join(path, "cifar-10-batches-bin")):
        if any(os.path.isfile(os.path.join(directory, n)) for n in names):
            return directory
    for directory in (path, os.path.join(path, "cifar-10-batches-py")):
        pickles = [n for n in _CIFAR_PICKLES if os.path.isfile(os.path.join(directory, n))]
        if pickles:
            raise ValueError(
                f"load_cifar10: {directory!r} holds the CIFAR-10 python version (pickled "
                f"batches {pickles}), which is refused and never unpickled: unpickling a file "
                f"can run arbitrary code. Use {_CIFAR_FORMATS}."
            )
    return path


def _read_cifar_binary(file: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(file, np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise ValueError(
            f"load_cifar10: {file}: expected CIFAR-10 binary records of {_CIFAR_RECORD} bytes "
            f"(1 label byte + 3072 pixel bytes), but the file holds {raw.size} bytes, not a "
            f"positive multiple of {_CIFAR_RECORD}"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise ValueError(
            f"load_cifar10: {file}: record {int(bad[0])} has label {int(labels[bad[0]])}, "
            f"expected a class 0..9 (is this a CIFAR-10 binary batch? CIFAR-100's binary "
            f"records have two label bytes)"
        )
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> HWC
    return images, labels.astype(np.int32)


def load_cifar10(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the binary-version batches in a directory, or from an ``.npz``.

    Args:
      path: the ``cifar-10-batches-bin`` directory (or the directory holding it), or an
        ``.npz`` with ``x_train, y_train, x_test, y_test`` (images ``[n, 32, 32, 3]``).
      split: ``"train"`` (the five data batches, in order) or ``"test"``.

    Returns:
      ``(images uint8 [n, 32, 32, 3], labels int32 [n])``.

    Raises:
      ValueError: the directory holds the pickled "python version" (refused, never opened), a
        batch is not whole records or has a label outside 0..9, or an array has the wrong shape.
      FileNotFoundError: a batch file is missing.
    """
    _check_split(split)
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(
                f"load_cifar10: path must be a directory of binary batches or an "
                f".npz file, got the file {path!r}; use {_CIFAR_FORMATS}"
            )
        key = "train" if split == "train" else "test"
        images, labels = _read_npz(path, f"x_{key}", f"y_{key}", "load_cifar10")
        if images.shape[1:] != (32, 32, 3) or images.ndim != 4:
            raise ValueError(
                f"load_cifar10: {path}: x_{key} must be images [n, 32, 32, 3] "
                f"(height, width, channels), got shape {images.shape}"
            )
        if labels.ndim == 2 and labels.shape[1] == 1:  # Keras stores labels as [n, 1]
            labels = labels[:, 0]
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"load_cifar10: {path}: y_{key} must be {images.shape[0]} integer "
                f"labels, got {labels.dtype} {labels.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(
                f"load_cifar10: {path}: y_{key} must be classes 0..9, got values "
                f"in [{labels.min()}, {labels.max()}]"
            )
        if images.dtype != np.uint8:
            raise ValueError(
                f"load_cifar10: {path}: x_{key} must be uint8 pixels, got {images.dtype}"
            )
        return images, labels.astype(np.int32)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"load_cifar10: path must be a directory of binary batches or "
            f"an .npz file, got {path!r}"
        )
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    directory = _cifar_directory(path, names)
    images, labels = [], []
    for name in names:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"load_cifar10: no {name} in {directory!r}; expected {_CIFAR_FORMATS}"
            )
        x, y = _read_cifar_binary(file)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)
