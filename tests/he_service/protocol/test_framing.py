import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from he_service.protocol import ProtocolError, decode_frames, encode_frames, read_frames


@pytest.mark.parametrize("items", [[b"x"], [b"", b"abc"], [bytes(range(256)) * 10] * 3])
def test_round_trip(items: list[bytes]) -> None:
    assert decode_frames(encode_frames(items), max_items=10) == items


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a framed message"),
        (b"garbage!", "not a framed message"),
        (b"HEF1" + struct.pack("<I", 0), "no items"),
        (b"HEF1" + struct.pack("<I", 99), "at most 4"),
        (b"HEF1" + struct.pack("<I", 1) + b"\x01", "truncated in the header"),
        (b"HEF1" + struct.pack("<IQ", 1, 10) + b"abc", "declares 10 bytes"),
        (encode_frames([b"ok"]) + b"extra", "trailing"),
    ],
)
def test_malformed_messages_are_refused_precisely(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_frames(data, max_items=4)


def test_huge_declared_length_does_not_allocate() -> None:
    data = b"HEF1" + struct.pack("<IQ", 1, 2**63) + b"x"
    with pytest.raises(ProtocolError, match="truncated"):
        decode_frames(data, max_items=1)


def _streamed(data: bytes, *, max_items: int = 4, max_item_bytes: int = 1 << 20) -> list[bytes]:
    """Read ``data`` as a socket delivers it: at most 7 bytes per read."""
    stream = io.BytesIO(data)
    count, items = read_frames(
        lambda n: stream.read(min(n, 7)),
        len(data),
        max_items=max_items,
        max_item_bytes=max_item_bytes,
    )
    found = list(items)
    assert len(found) == count
    return found


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.binary(max_size=40), min_size=1, max_size=5),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
)
def test_reading_in_short_pieces_agrees_with_decoding_in_memory(
    items: list[bytes], cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(encode_frames(items))
    for position, value in flips:
        if position < len(data):
            data[position] = value
    message = bytes(data[: len(data) - cut % (len(data) + 1)])
    try:
        expected: list[bytes] | None = decode_frames(message, max_items=4)
    except ProtocolError:
        expected = None
    try:
        found: list[bytes] | None = _streamed(message)
    except ProtocolError:
        found = None
    assert found == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"HEF1" + struct.pack("<IQ", 1, 10) + b"abc", "declares 10 bytes"),
        (encode_frames([b"ok"]) + b"extra", "trailing"),
        (encode_frames([b"x" * 100]), "at most 64 allowed"),
        (b"HEF1" + struct.pack("<I", 9), "at most 4"),
    ],
)
def test_streamed_reading_refuses_precisely(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        _streamed(data, max_item_bytes=64)


def test_streamed_reading_stops_at_a_short_stream() -> None:
    data = encode_frames([b"abc", b"def"])
    count, items = read_frames(io.BytesIO(data[:-2]).read, len(data), max_items=4, max_item_bytes=8)
    assert count == 2 and next(items) == b"abc"
    with pytest.raises(ProtocolError, match="ends early"):
        next(items)
