"""Symmetric encodings between model-space arrays and CKKS slot vectors.

The model card names an input encoding and an output decoding; the client SDK and the server's
tests call these same functions, so a layout change is made in exactly one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from he_service.protocol.errors import ProtocolError

__all__ = ["decode_output", "encode_input", "preprocess"]


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


def encode_input(x: np.ndarray, encoding: Mapping[str, Any]) -> list[np.ndarray]:
    """Lay one preprocessed sample out in CKKS slots as the card's ``input_encoding`` says.

    The ``gather`` encoding lists, per ciphertext, the input element each slot of one period
    carries (-1: zero); the period repeats to fill the ciphertext. The server's first layer is
    then plaintext products and a few folds, with no rotation of the input.

    Args:
        x: the preprocessed sample in the model's input shape.
        encoding: the card's ``input_encoding``.

    Returns:
        One float64 vector of ``slot_count`` values per ciphertext to encrypt.

    Raises:
        ProtocolError: unknown kind, or a sample that does not fit the encoding.
    """
    if encoding.get("kind") != "gather":
        raise ProtocolError(f"unknown input encoding {encoding.get('kind')!r}")
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    if flat.size != int(encoding["length"]):
        raise ProtocolError(f"input has {flat.size} values, the card expects {encoding['length']}")
    slots, period = int(encoding["slot_count"]), int(encoding["period"])
    index = np.asarray(encoding["index"], dtype=np.int64)
    if index.ndim != 2 or index.shape[1] != period or slots % period:
        raise ProtocolError("input encoding index does not match its period and slot count")
    padded = np.concatenate([flat, [0.0]])  # index -1 reads the trailing zero
    return [np.tile(padded[row], slots // period) for row in index]


def decode_output(slots: np.ndarray, decoding: Mapping[str, Any]) -> np.ndarray:
    """Read the model's outputs from decrypted slots as the card's ``output_decoding`` says.

    Output ``o`` sits at slot ``o`` (and, when the plan's last fold is cyclic, at every slot
    ``o + k * period``); every other slot is zero.
    """
    if decoding.get("kind") != "prefix":
        raise ProtocolError(f"unknown output decoding {decoding.get('kind')!r}")
    length = int(decoding["length"])
    return np.asarray(slots[:length], dtype=np.float64)
