"""Local image datasets: IDX (plain and gzipped), Keras .npz and CIFAR-10 pickles, written here
byte by byte from the formats' specifications and read back."""

import gzip
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


def test_mnist_npz_and_cifar_pickles(tmp_path):
    rng = np.random.default_rng(1)
    x_train, x_test = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for n in (5, 2))
    y_train, y_test = rng.integers(0, 10, 5), rng.integers(0, 10, 2)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test)  # fmt: skip
    x, y = images.load_mnist(str(tmp_path / "mnist.npz"), "test")
    np.testing.assert_array_equal(x[..., 0], x_test)
    np.testing.assert_array_equal(y, y_test)

    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (2, 3072), dtype=np.uint8)  # rows: R plane, G, B; row-major
        labels = rng.integers(0, 10, 2).tolist()
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels}, f)
        batches[name] = (pixels, labels)
    x, y = images.load_cifar10(str(tmp_path), "train")
    assert x.shape == (10, 32, 32, 3) and y.shape == (10,)
    pixels, labels = batches["data_batch_3"]
    # Image 4 is the first of batch 3; pixel (row 5, col 7) channel G is at 1024 + 5 * 32 + 7.
    assert x[4, 5, 7, 1] == pixels[0, 1024 + 5 * 32 + 7]
    assert y[5] == labels[1]
    x, y = images.load_cifar10(str(tmp_path), "test")
    assert x.shape == (2, 32, 32, 3) and list(y) == batches["test_batch"][1]
