"""Length-prefixed framing of binary messages (ciphertexts, key sections).

Layout: magic ``b"HEF1"``, ``uint32`` item count, then per item ``uint64`` length + bytes, all
little-endian. Limits are checked before any item is sliced, so a hostile header cannot make the
reader allocate more than the body it already holds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from he_service.protocol.errors import ProtocolError

__all__ = [
    "CONTEXT_HEADER",
    "MAGIC",
    "MEDIA_TYPE",
    "decode_frames",
    "encode_frames",
    "frame_count",
    "framed_size",
]

MAGIC = b"HEF1"
MEDIA_TYPE = "application/vnd.he-inference.frames"
# The predict request names the uploaded context (sha256 of its bytes) in this header.
CONTEXT_HEADER = "X-Context-Id"
_COUNT = struct.Struct("<I")
_LENGTH = struct.Struct("<Q")


def encode_frames(items: Sequence[bytes]) -> bytes:
    """Frame byte strings into one message.

    Args:
        items: the payloads, in order.

    Returns:
        The framed message.
    """
    parts = [MAGIC, _COUNT.pack(len(items))]
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(bytes(item))
    return b"".join(parts)


def framed_size(items: int, payload_bytes: int) -> int:
    """Return the size of a framed message of ``items`` payloads totalling ``payload_bytes``."""
    return len(MAGIC) + _COUNT.size + items * _LENGTH.size + payload_bytes


def frame_count(data: bytes) -> int:
    """Return the item count a framed message declares, reading only its header.

    Raises:
        ProtocolError: not a framed message.
    """
    header = len(MAGIC) + _COUNT.size
    if len(data) < header or data[: len(MAGIC)] != MAGIC:
        raise ProtocolError(
            "body is not a framed message (expected magic 'HEF1'); build it with "
            "he_service.protocol.encode_frames or the HEClient SDK"
        )
    (count,) = _COUNT.unpack_from(data, len(MAGIC))
    return int(count)


def decode_frames(data: bytes, *, max_items: int) -> list[bytes]:
    """Split a framed message into its payloads.

    Args:
        data: the whole message.
        max_items: the largest item count accepted.

    Returns:
        The payloads, in order.

    Raises:
        ProtocolError: wrong magic, too many items, truncated or trailing bytes.
    """
    count = frame_count(data)
    if count == 0:
        raise ProtocolError("framed message holds no items")
    if count > max_items:
        raise ProtocolError(f"framed message holds {count} items; at most {max_items} allowed")
    items: list[bytes] = []
    offset = len(MAGIC) + _COUNT.size
    for index in range(count):
        if offset + _LENGTH.size > len(data):
            raise ProtocolError(f"framed message truncated in the header of item {index}")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if length > len(data) - offset:
            raise ProtocolError(
                f"framed message truncated: item {index} declares {length} bytes, "
                f"{len(data) - offset} remain"
            )
        items.append(data[offset : offset + length])
        offset += length
    if offset != len(data):
        raise ProtocolError(f"framed message has {len(data) - offset} trailing bytes")
    return items
