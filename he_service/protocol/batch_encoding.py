"""The batch (throughput) layout: one sample per CKKS slot, one ciphertext per feature.

A group of up to ``slot_count`` samples becomes an array (features, slot_count): row ``f`` is
what the client encrypts as ciphertext ``f``, slot ``j`` holds sample ``j``. The server answers
one ciphertext per model output, laid out the same way. Both sides call these functions.
"""

from __future__ import annotations

import numpy as np

from he_service.protocol.errors import ProtocolError

__all__ = ["decode_batch", "encode_batch"]


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
