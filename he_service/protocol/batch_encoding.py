"""The batch (throughput) layout: one sample per CKKS slot, one ciphertext per feature.

A group of up to ``slot_count`` samples becomes an array (features, slot_count): row ``f`` is
what the client encrypts as ciphertext ``f``, slot ``j`` holds sample ``j``. The server answers
one ciphertext per model output, laid out the same way. Both sides call these functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from he_service.protocol._fields import read_int, read_object
from he_service.protocol.errors import ProtocolError

__all__ = ["BatchDecoding", "BatchEncoding", "decode_batch", "encode_batch"]


@dataclass(frozen=True)
class BatchEncoding:
    """One sample per slot: a unit is a group of ``slot_count`` samples, one row per feature."""

    kind: ClassVar[str] = "batch"
    features: int
    slot_count: int

    @property
    def ciphertexts_per_unit(self) -> int:
        return self.features

    @property
    def samples_per_unit(self) -> int:
        return self.slot_count

    def units(self, samples: np.ndarray) -> Iterator[list[np.ndarray]]:
        """Yield, per group of preprocessed ``samples`` (count, *input_shape), its slot rows.

        Raises:
            ProtocolError: samples with another number of features than the card's.
        """
        for group in encode_batch(samples, self.slot_count):
            if group.shape[0] != self.features:
                raise ProtocolError(
                    f"samples have {group.shape[0]} features, the card expects {self.features}"
                )
            yield list(group)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": self.features, "slot_count": self.slot_count}

    @classmethod
    def from_json(cls, doc: Any) -> BatchEncoding:
        """Read and check a batch encoding.

        Raises:
            ProtocolError: another kind, a missing field, or a slot count not a power of two.
        """
        where = "input_encoding"
        doc = read_object(doc, where)
        if doc.get("kind") != cls.kind:
            raise ProtocolError(f"unknown input encoding {doc.get('kind')!r:.40}")
        slots = read_int(doc, "slot_count", where, minimum=1)
        _check_slot_count(slots)
        return cls(read_int(doc, "features", where, minimum=1), slots)


@dataclass(frozen=True)
class BatchDecoding:
    """One output ciphertext per model output, sample ``j`` of a group in slot ``j``."""

    kind: ClassVar[str] = "batch"
    outputs: int

    @property
    def ciphertexts_per_unit(self) -> int:
        return self.outputs

    def decode(self, outputs: Sequence[np.ndarray], count: int) -> np.ndarray:
        """Return the outputs of ``count`` samples from the decrypted output ciphertexts.

        Args:
            outputs: the decrypted slots of every output ciphertext, group after group.
            count: the number of samples that were encoded (padding is dropped).

        Raises:
            ProtocolError: not ``outputs`` ciphertexts per group, or inconsistent shapes.
        """
        if not outputs or len(outputs) % self.outputs:
            raise ProtocolError(
                f"a group has {self.outputs} output ciphertexts, got {len(outputs)} in all"
            )
        groups = [
            np.stack(outputs[first : first + self.outputs])
            for first in range(0, len(outputs), self.outputs)
        ]
        return decode_batch(groups, count)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "outputs": self.outputs}

    @classmethod
    def from_json(cls, doc: Any) -> BatchDecoding:
        """Read and check a batch decoding.

        Raises:
            ProtocolError: another kind or a missing field.
        """
        where = "output_decoding"
        doc = read_object(doc, where)
        if doc.get("kind") != cls.kind:
            raise ProtocolError(f"unknown output decoding {doc.get('kind')!r:.40}")
        return cls(read_int(doc, "outputs", where, minimum=1))


def encode_batch(samples: np.ndarray, slot_count: int) -> list[np.ndarray]:
    """Lay preprocessed samples out as slot vectors, one group per ``slot_count`` samples.

    Args:
        samples: an array (count, *input_shape), already preprocessed.
        slot_count: CKKS slots per ciphertext (N/2 of the card's parameters).

    Returns:
        One float64 array (features, slot_count) per group; the last group is zero-padded.

    Raises:
        ProtocolError: no samples, a bad slot count, or non-finite values.
    """
    _check_slot_count(slot_count)
    array = np.asarray(samples)
    if array.ndim < 2 or array.shape[0] == 0 or array.size == 0:
        raise ProtocolError(
            f"samples must be an array (count, *input_shape) with count >= 1, got shape "
            f"{array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ProtocolError(f"samples must be real numbers, got dtype {array.dtype}")
    values = array.astype(np.float64, copy=False).reshape(array.shape[0], -1)
    if not np.all(np.isfinite(values)):
        raise ProtocolError("samples hold NaN or infinity")
    count, features = values.shape
    groups: list[np.ndarray] = []
    for start in range(0, count, slot_count):
        chunk = values[start : start + slot_count]
        group = np.zeros((features, slot_count))
        group[:, : chunk.shape[0]] = chunk.T
        groups.append(group)
    return groups


def decode_batch(outputs: list[np.ndarray], count: int) -> np.ndarray:
    """Collect decrypted output slot vectors back into one row per sample.

    Args:
        outputs: per group, an array (n_outputs, slot_count) of decrypted slots, in the order
            ``encode_batch`` produced the groups.
        count: the number of samples that were encoded (padding is dropped).

    Returns:
        An array (count, n_outputs).

    Raises:
        ProtocolError: inconsistent shapes, too few slots for ``count``, or non-finite values.
    """
    if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
        raise ProtocolError(f"count must be a positive integer, got {count!r}")
    if not isinstance(outputs, list | tuple) or not outputs:
        raise ProtocolError("outputs must be a non-empty list of (n_outputs, slot_count) arrays")
    arrays = [np.asarray(group) for group in outputs]
    first = arrays[0].shape
    if len(first) != 2 or first[0] < 1 or first[1] < 1:
        raise ProtocolError(f"each output group must be (n_outputs, slot_count), got {first}")
    for index, group in enumerate(arrays):
        if group.shape != first:
            raise ProtocolError(
                f"output group {index} has shape {group.shape}; group 0 has {first}"
            )
        if not np.issubdtype(group.dtype, np.number) or np.iscomplexobj(group):
            raise ProtocolError(f"output group {index} is not real numbers ({group.dtype})")
    slot_count = first[1]
    needed = -(-int(count) // slot_count)
    if len(arrays) != needed:
        raise ProtocolError(
            f"{count} samples in groups of {slot_count} make {needed} group(s); got {len(arrays)}"
        )
    values = np.concatenate([group.astype(np.float64).T for group in arrays])[: int(count)]
    if not np.all(np.isfinite(values)):
        raise ProtocolError("decoded outputs hold NaN or infinity (wrong key or parameters?)")
    return values


def _check_slot_count(slot_count: int) -> None:
    if (
        isinstance(slot_count, bool)
        or not isinstance(slot_count, int | np.integer)
        or slot_count < 1
        or slot_count & (slot_count - 1)
    ):
        raise ProtocolError(f"slot_count must be a positive power of two, got {slot_count!r}")
