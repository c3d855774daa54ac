import struct

import pytest
import tenseal.sealapi as seal
import zstandard

from he_service.protocol import (
    CkksParams,
    KeyBundle,
    ProtocolError,
    decode_key_bundle,
    encode_key_bundle,
    load_seal,
    seal_context,
)

PARAMS = CkksParams(4096, (39, 30, 39), 30)


def test_bundle_round_trip_keeps_order_and_fields() -> None:
    bundle = KeyBundle(PARAMS, (1, 2), {"galois_keys": b"g", "relin_keys": b"r"})
    decoded = decode_key_bundle(encode_key_bundle(bundle))
    assert decoded == bundle
    assert not decoded.has_secret_key


def test_bundle_with_secret_key_is_refused_unless_local() -> None:
    data = encode_key_bundle(KeyBundle(PARAMS, (), {"relin_keys": b"r", "secret_key": b"s"}))
    with pytest.raises(ProtocolError, match="holds a secret key.*public context"):
        decode_key_bundle(data)
    assert decode_key_bundle(data, allow_secret_key=True).has_secret_key


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"poly_modulus_degree": 1000, "coeff_modulus_bits": [30, 30], "scale_bits": 20},
            "not a supported ring degree",
        ),
        (
            {"poly_modulus_degree": 4096, "coeff_modulus_bits": [60, 60, 60], "scale_bits": 40},
            "128-bit security",
        ),
        ({"poly_modulus_degree": 4096}, "need"),
    ],
)
def test_params_outside_the_128_bit_table_are_refused(spec: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        CkksParams.from_json(spec)


def _header(compr: int, size: int) -> bytes:
    return struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, compr, 0, size)


def test_seal_loader_refuses_garbage_and_truncation() -> None:
    context = seal_context(PARAMS)
    for data, message in [
        (b"", "too short"),
        (b"\x00" * 64, "bad header"),
        (_header(0, 100) + b"\x00" * 10, "declares 100 bytes"),
        (_header(0, 26) + b"\x00" * 10, "not valid"),
        (_header(1, 26) + b"\x00" * 10, "compression mode 1"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            load_seal(seal.Ciphertext, data, context, what="input")


def test_seal_loader_refuses_a_compression_bomb_without_inflating_it() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 << 20))
    data = _header(2, 16 + len(bomb)) + bomb
    with pytest.raises(ProtocolError, match="inflates beyond"):
        load_seal(seal.Ciphertext, data, seal_context(PARAMS), what="input")
