"""Symmetric encodings between model-space arrays and CKKS slot vectors (latency plan).

The model card names an input encoding and an output decoding; the client SDK and the server's
tests call these same classes, so a layout change is made in exactly one place. Every encoding
lays out *units* (see ``plans``): here one sample per unit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from he_service.protocol._fields import read_int, read_object
from he_service.protocol.errors import ProtocolError

__all__ = ["GatherEncoding", "PrefixDecoding", "decode_output", "encode_input", "preprocess"]


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
    result: np.ndarray = preprocess_rows(array.reshape(1, -1), spec, shape)[0]
    return result


def preprocess_rows(
    rows: np.ndarray, spec: Mapping[str, Any], shape: tuple[int, ...]
) -> np.ndarray:
    """Apply ``preprocess`` to every row of ``rows`` at once (the same numbers, row by row).

    Args:
        rows: raw samples, one per row, each with ``prod(shape)`` elements.
        spec, shape: as ``preprocess``.

    Returns:
        The preprocessed samples as float64, shape ``(len(rows), *shape)``.

    Raises:
        ProtocolError: rows of another size, or non-finite values.
    """
    array = np.asarray(rows, dtype=np.float64)
    size = int(np.prod(shape))
    values = array[0].size if array.ndim and len(array) else 0
    if array.ndim == 0 or array.size != len(array) * size:
        raise ProtocolError(f"input has {values} values; the model expects shape {shape}")
    if not np.all(np.isfinite(array)):
        raise ProtocolError("input holds NaN or infinity")
    array = array.reshape((len(array), *shape)) * float(spec.get("scale", 1.0))
    channel_shape = (-1,) + (1,) * (len(shape) - 1)
    mean = np.asarray(spec.get("mean", [0.0]), dtype=np.float64).reshape(channel_shape)
    std = np.asarray(spec.get("std", [1.0]), dtype=np.float64).reshape(channel_shape)
    if len(shape) == 1:
        mean, std = mean.reshape(-1), std.reshape(-1)
    result: np.ndarray = (array - mean) / std
    return result


@dataclass(frozen=True)
class GatherEncoding:
    """Per ciphertext, the input element each slot of one period carries (-1: zero).

    The period repeats to fill the ciphertext. The server's first layer is then plaintext
    products and a few folds, with no rotation of the input.
    """

    kind: ClassVar[str] = "gather"
    slot_count: int
    ciphertexts: int
    period: int
    length: int
    index: tuple[tuple[int, ...], ...]

    @property
    def ciphertexts_per_unit(self) -> int:
        return self.ciphertexts

    @property
    def samples_per_unit(self) -> int:
        return 1

    @functools.cached_property
    def _index(self) -> np.ndarray:
        return np.asarray(self.index, dtype=np.int64).reshape(self.ciphertexts, self.period)

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """Lay one preprocessed sample out in slots.

        Args:
            x: the preprocessed sample in the model's input shape.

        Returns:
            One float64 vector of ``slot_count`` values per ciphertext to encrypt.

        Raises:
            ProtocolError: a sample of the wrong size.
        """
        flat = np.asarray(x, dtype=np.float64).reshape(-1)
        if flat.size != self.length:
            raise ProtocolError(f"input has {flat.size} values, the card expects {self.length}")
        padded = np.concatenate([flat, [0.0]])  # index -1 reads the trailing zero
        return [np.tile(padded[row], self.slot_count // self.period) for row in self._index]

    def units(self, samples: np.ndarray) -> Iterator[list[np.ndarray]]:
        """Yield, per sample of ``samples`` (count, *input_shape), its slot vectors."""
        for x in samples:
            yield self.encode(x)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "slot_count": self.slot_count,
            "ciphertexts": self.ciphertexts,
            "period": self.period,
            "length": self.length,
            "index": [list(row) for row in self.index],
        }

    @classmethod
    def from_json(cls, doc: Any) -> GatherEncoding:
        """Read and check a gather encoding.

        Raises:
            ProtocolError: another kind, a missing field, or an index that does not fit.
        """
        where = "input_encoding"
        doc = read_object(doc, where)
        if doc.get("kind") != cls.kind:
            raise ProtocolError(f"unknown input encoding {doc.get('kind')!r:.40}")
        slots = read_int(doc, "slot_count", where, minimum=1)
        count = read_int(doc, "ciphertexts", where, minimum=1)
        period = read_int(doc, "period", where, minimum=1)
        length = read_int(doc, "length", where, minimum=1)
        index = doc.get("index")
        if (
            slots % period
            or not isinstance(index, list)
            or len(index) != count
            or not all(isinstance(row, list) and len(row) == period for row in index)
            or not all(type(v) is int and -1 <= v < length for row in index for v in row)
        ):
            raise ProtocolError(
                "input encoding index must be ciphertexts x period entries in [-1, length), "
                "with the period dividing the slot count"
            )
        return cls(slots, count, period, length, tuple(tuple(row) for row in index))


@dataclass(frozen=True)
class PrefixDecoding:
    """Output ``o`` sits at slot ``o`` (and, when the last fold is cyclic, ``o + k * period``).

    Every other slot is zero. One output ciphertext per sample.
    """

    kind: ClassVar[str] = "prefix"
    length: int
    period: int

    @property
    def ciphertexts_per_unit(self) -> int:
        return 1

    def read(self, slots: np.ndarray) -> np.ndarray:
        """Return one sample's outputs from the decrypted slots of its output ciphertext."""
        return np.asarray(slots[: self.length], dtype=np.float64)

    def decode(self, outputs: Sequence[np.ndarray], count: int) -> np.ndarray:
        """Return the outputs of ``count`` samples from their decrypted output ciphertexts.

        Raises:
            ProtocolError: not one output ciphertext per sample.
        """
        if len(outputs) != count:
            raise ProtocolError(
                f"{count} samples need {count} output ciphertexts, got {len(outputs)}"
            )
        return np.stack([self.read(slots) for slots in outputs])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "length": self.length, "period": self.period}

    @classmethod
    def from_json(cls, doc: Any) -> PrefixDecoding:
        """Read and check a prefix decoding.

        Raises:
            ProtocolError: another kind or a missing field.
        """
        where = "output_decoding"
        doc = read_object(doc, where)
        if doc.get("kind") != cls.kind:
            raise ProtocolError(f"unknown output decoding {doc.get('kind')!r:.40}")
        return cls(
            read_int(doc, "length", where, minimum=1), read_int(doc, "period", where, minimum=1)
        )


def encode_input(x: np.ndarray, encoding: GatherEncoding | Mapping[str, Any]) -> list[np.ndarray]:
    """Lay one preprocessed sample out in CKKS slots as the card's ``input_encoding`` says.

    Args:
        x: the preprocessed sample in the model's input shape.
        encoding: the card's ``input_encoding``, parsed or as JSON.

    Returns:
        One float64 vector of ``slot_count`` values per ciphertext to encrypt.

    Raises:
        ProtocolError: unknown kind, or a sample that does not fit the encoding.
    """
    if not isinstance(encoding, GatherEncoding):
        encoding = GatherEncoding.from_json(encoding)
    return encoding.encode(x)


def decode_output(slots: np.ndarray, decoding: PrefixDecoding | Mapping[str, Any]) -> np.ndarray:
    """Read one sample's outputs from decrypted slots as the card's ``output_decoding`` says.

    Raises:
        ProtocolError: unknown kind or a malformed decoding.
    """
    if not isinstance(decoding, PrefixDecoding):
        decoding = PrefixDecoding.from_json(decoding)
    return decoding.read(slots)
