"""Local image datasets: IDX (plain and gzipped), Keras .npz and the CIFAR-10 binary version,
written here byte by byte from the formats' specifications and read back; CIFAR-10's pickled
"python version" is refused without being unpickled."""

import gzip
import pathlib
import pickle
import struct

import numpy as np
import pytest

from jaxlab.data import images


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_files_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", 7), ("t10k", 3)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        data[prefix] = (x, y)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = images.load_mnist(str(tmp_path), split)
        assert x.shape == data[prefix][0].shape + (1,) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[..., 0], data[prefix][0])
        np.testing.assert_array_equal(y, data[prefix][1])


def test_int32_idx_and_bad_files(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    write_idx(tmp_path / "a.idx", values, type_code=0x0C)
    np.testing.assert_array_equal(images.read_idx(str(tmp_path / "a.idx")), values)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        images.read_idx(str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        images.load_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of"):
        images.load_mnist(str(tmp_path), "validation")


def test_mnist_npz(tmp_path):
    rng = np.random.default_rng(1)
    x_train, x_test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (5, 2))
    y_train, y_test = rng.integers(0, 10, 5), rng.integers(0, 10, 2)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    x, y = images.load_mnist(str(tmp_path / "mnist.npz"), "test")
    np.testing.assert_array_equal(x[..., 0], x_test)
    np.testing.assert_array_equal(y, y_test)


CIFAR_BIN_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_cifar_binary(directory, rng, per_file=3):
    """The binary distribution, from its documentation: per record one label byte, then 1024
    red, 1024 green and 1024 blue bytes, each plane row-major over the 32 x 32 image."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in CIFAR_BIN_NAMES:
        hwc = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_file).astype(np.uint8)
        payload = b"".join(
            bytes([labels[i]]) + b"".join(hwc[i, :, :, c].tobytes() for c in range(3))
            for i in range(per_file)
        )
        (directory / name).write_bytes(payload)
        written[name] = (hwc, labels)
    return written


def test_cifar_binary_batches_give_hwc_images_and_labels(tmp_path):
    written = write_cifar_binary(tmp_path / "cifar-10-batches-bin", np.random.default_rng(2))
    for path in (tmp_path / "cifar-10-batches-bin", tmp_path):  # the folder or its parent
        x, y = images.load_cifar10(str(path), "train")
        assert x.shape == (15, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (15,) and y.dtype == np.int32
        train = [written[f"data_batch_{i}.bin"] for i in range(1, 6)]
        np.testing.assert_array_equal(x, np.concatenate([hwc for hwc, _ in train]))
        np.testing.assert_array_equal(y, np.concatenate([labels for _, labels in train]))
        x, y = images.load_cifar10(str(path), "test")
        np.testing.assert_array_equal(x, written["test_batch.bin"][0])
        np.testing.assert_array_equal(y, written["test_batch.bin"][1])
    # One pixel by the documented offsets: image 4 is the second of batch 2; (row 5, col 7, G).
    raw = (tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").read_bytes()
    x, y = images.load_cifar10(str(tmp_path), "train")
    assert x[4, 5, 7, 1] == raw[3073 + 1 + 1024 + 5 * 32 + 7] and y[4] == raw[3073]


def test_cifar_binary_damage_is_named(tmp_path):
    directory = tmp_path / "bin"
    write_cifar_binary(directory, np.random.default_rng(3))
    (directory / "data_batch_3.bin").write_bytes(b"\x01" * 3074)
    with pytest.raises(ValueError, match=r"data_batch_3.bin.*3074 bytes.*multiple of 3073"):
        images.load_cifar10(str(directory))
    (directory / "data_batch_3.bin").write_bytes(b"\x0b" + b"\x00" * 3072)
    with pytest.raises(ValueError, match=r"data_batch_3.bin: record 0 has label 11.*0\.\.9"):
        images.load_cifar10(str(directory))
    (directory / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no test_batch.bin"):
        images.load_cifar10(str(directory), "test")


class _Marker:
    """Unpickling this creates a file: what a hostile batch could do with any code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_cifar_python_pickles_are_refused_unopened(tmp_path):
    marker = tmp_path / "marker"
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": _Marker(marker), b"labels": [0]}, f)
    for path, split in ((directory, "train"), (directory, "test"), (tmp_path, "train")):
        message = r"python version.*never unpickled.*cifar-10-batches-bin.*data_batch_1.bin"
        with pytest.raises(ValueError, match=message):
            images.load_cifar10(str(path), split)
    # A pickle renamed to the binary names is read as bytes and fails the format checks.
    for name in CIFAR_BIN_NAMES:
        (directory / name).write_bytes((directory / name.removesuffix(".bin")).read_bytes())
    with pytest.raises(ValueError, match=r"data_batch_1.bin"):
        images.load_cifar10(str(directory))
    # An .npz holding a pickled object array is refused by np.load(allow_pickle=False).
    np.savez(
        tmp_path / "cifar.npz",
        x_train=np.array([_Marker(marker)], dtype=object),
        y_train=np.zeros(1, np.int64),
        x_test=np.zeros((0, 32, 32, 3), np.uint8),
        y_test=np.zeros(0, np.int64),
    )
    with pytest.raises(ValueError, match=r"cifar.npz.*x_train.*pickle"):
        images.load_cifar10(str(tmp_path / "cifar.npz"))
    assert not marker.exists()
    with open(directory / "data_batch_1", "rb") as f:  # the test's own pickles do run code
        pickle.load(f)
    assert marker.exists()


def test_cifar_npz(tmp_path):
    rng = np.random.default_rng(4)
    arrays = dict(
        x_train=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, (4, 1)),
        x_test=rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 2),
    )
    np.savez(tmp_path / "cifar.npz", **arrays)
    x, y = images.load_cifar10(str(tmp_path / "cifar.npz"), "train")
    np.testing.assert_array_equal(x, arrays["x_train"])
    np.testing.assert_array_equal(y, arrays["y_train"][:, 0])
    assert x.dtype == np.uint8 and y.dtype == np.int32
    x, y = images.load_cifar10(str(tmp_path / "cifar.npz"), "test")
    np.testing.assert_array_equal(y, arrays["y_test"])
    np.savez(
        tmp_path / "chw.npz",
        x_train=arrays["x_train"].transpose(0, 3, 1, 2),
        y_train=arrays["y_train"],
    )
    with pytest.raises(
        ValueError,
        match=r"chw.npz: x_train must be.*\[n, 32, 32, 3\].*"
        r"\(4, 3, 32, 32\)",
    ):
        images.load_cifar10(str(tmp_path / "chw.npz"))
