import struct

import pytest

from he_service.protocol import ProtocolError, decode_frames, encode_frames


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
