"""Symmetric encodings between model-space arrays and CKKS slot vectors.

The model card names an input encoding and an output decoding; the client SDK and the server's
tests call these same functions, so a layout change is made in exactly one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from he_service.protocol.errors import ProtocolError

__all__ = ["decode_output", "encode_input", "im2col", "preprocess"]


def preprocess(x: np.ndarray, spec: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """Apply the card's preprocessing: ``(x * scale - mean) / std`` per channel.

    Args:
        x: one raw sample, any shape with ``prod(shape)`` elements.
        spec: the card's ``input.preprocessing`` (scale, mean, std).
        shape: the model's input shape.

    Returns:
        The preprocessed sample as float64 in ``shape``.

    Raises:
        ProtocolError: wrong number of elements or non-finite values.
    """
    array = np.asarray(x, dtype=np.float64)
    if array.size != int(np.prod(shape)):
        raise ProtocolError(f"input has {array.size} values; the model expects shape {shape}")
    if not np.all(np.isfinite(array)):
        raise ProtocolError("input holds NaN or infinity")
    array = array.reshape(shape) * float(spec.get("scale", 1.0))
    channel_shape = (-1,) + (1,) * (len(shape) - 1)
    mean = np.asarray(spec.get("mean", [0.0]), dtype=np.float64).reshape(channel_shape)
    std = np.asarray(spec.get("std", [1.0]), dtype=np.float64).reshape(channel_shape)
    if len(shape) == 1:
        mean, std = mean.reshape(-1), std.reshape(-1)
    return (array - mean) / std


def im2col(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> np.ndarray:
    """Return the (C*kh*kw, windows) patch matrix of a (C, H, W) image, torch's weight order."""
    channels, height, width = x.shape
    kh, kw = kernel
    padded = np.pad(x, ((0, 0), (padding[0],) * 2, (padding[1],) * 2))
    out_h = (height + 2 * padding[0] - kh) // stride[0] + 1
    out_w = (width + 2 * padding[1] - kw) // stride[1] + 1
    rows = np.empty((channels, kh, kw, out_h, out_w))
    for i in range(kh):
        for j in range(kw):
            rows[:, i, j] = padded[
                :, i : i + stride[0] * out_h : stride[0], j : j + stride[1] * out_w : stride[1]
            ]
    return rows.reshape(channels * kh * kw, out_h * out_w)


def encode_input(x: np.ndarray, encoding: Mapping[str, Any]) -> np.ndarray:
    """Lay one preprocessed sample out in CKKS slots as the card's ``input_encoding`` says.

    Args:
        x: the preprocessed sample in the model's input shape.
        encoding: ``{"kind": "im2col", ...}`` or ``{"kind": "replicated", ...}``.

    Returns:
        A float64 vector of ``slot_count`` values.

    Raises:
        ProtocolError: unknown kind, or a sample that does not fit the encoding.
    """
    slots = int(encoding["slot_count"])
    kind = encoding.get("kind")
    vector = np.zeros(slots)
    if kind == "im2col":
        patches = im2col(
            np.asarray(x, dtype=np.float64),
            tuple(encoding["kernel"]),
            tuple(encoding["stride"]),
            tuple(encoding["padding"]),
        )
        rows, windows, block = encoding["rows"], encoding["windows"], encoding["block"]
        if patches.shape != (rows, windows):
            raise ProtocolError(f"im2col gives {patches.shape}, the card expects {(rows, windows)}")
        grid = vector.reshape(slots // block, block)
        grid[:rows, :windows] = patches
        return vector
    if kind == "replicated":
        flat = np.asarray(x, dtype=np.float64).reshape(-1)
        length, period = encoding["length"], encoding["period"]
        if flat.size != length:
            raise ProtocolError(f"input has {flat.size} values, the card expects {length}")
        copy = np.zeros(period)
        copy[:length] = flat
        return np.tile(copy, slots // period)
    raise ProtocolError(f"unknown input encoding {kind!r}")


def decode_output(slots: np.ndarray, decoding: Mapping[str, Any]) -> np.ndarray:
    """Read the model's outputs from decrypted slots as the card's ``output_decoding`` says."""
    if decoding.get("kind") != "prefix":
        raise ProtocolError(f"unknown output decoding {decoding.get('kind')!r}")
    length = int(decoding["length"])
    return np.asarray(slots[:length], dtype=np.float64)
