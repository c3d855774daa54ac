"""``save_seeded`` writes SEAL's own bytes, uncompressed, for every ring the engine uses."""

import numpy as np
import pytest
import tenseal.sealapi as seal
import zstandard

from he_service.protocol import CkksParams, load_seal, save_seal, save_seeded, seal_context
from he_service.protocol.seal_memory import seeded_layout_ok


@pytest.mark.parametrize(
    "params",
    [
        CkksParams(4096, (30, 30, 40), 25),
        CkksParams(8192, (38, 50, 38, 39, 53), 24),
        CkksParams(16384, (50, 40, 40, 40, 40, 40, 40, 60), 40),
    ],
)
def test_seeded_bytes_equal_seal_serialization_and_decrypt(params: CkksParams) -> None:
    assert seeded_layout_ok() is not None  # else the slow path is all this would test
    context = seal_context(params)
    keygen = seal.KeyGenerator(context)
    encoder = seal.CKKSEncoder(context)
    values = np.random.default_rng(0).uniform(-2, 2, params.slot_count)
    plain = seal.Plaintext()
    encoder.encode(values.tolist(), params.scale, plain)
    ct = seal.Encryptor(context, keygen.secret_key()).encrypt_symmetric(plain)

    fast, slow = save_seeded(ct), save_seal(ct)
    assert fast[5] == 0 and slow[5] == 2  # compression mode: none, zstd
    inflated = zstandard.ZstdDecompressor().decompress(slow[16:], 1 << 24)
    assert fast[16:] == inflated and len(fast) == 16 + len(inflated)

    loaded = load_seal(seal.Ciphertext, fast, context, what="ciphertext")
    decrypted = seal.Plaintext()
    seal.Decryptor(context, keygen.secret_key()).decrypt(loaded, decrypted)
    assert np.allclose(encoder.decode_double(decrypted), values, atol=1e-3)


def test_each_encryption_gets_its_own_seed() -> None:
    params = CkksParams(4096, (30, 30, 40), 25)
    context = seal_context(params)
    plain = seal.Plaintext()
    seal.CKKSEncoder(context).encode([0.5] * params.slot_count, params.scale, plain)
    encryptor = seal.Encryptor(context, seal.KeyGenerator(context).secret_key())
    first, second = (save_seeded(encryptor.encrypt_symmetric(plain)) for _ in range(2))
    assert first[-64:] != second[-64:]  # the seed ends the serialization
    assert first[:113] == second[:113]  # headers, metadata and the length are the same
