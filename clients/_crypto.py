"""The client's CKKS keys: generated locally, secret key never leaves unless saved on purpose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal

from he_service.protocol import (
    CkksParams,
    KeyBundle,
    decode_key_bundle,
    encode_key_bundle,
    galois_element,
    load_seal,
    save_seal,
    save_seeded,
    seal_context,
)

__all__ = ["KeySet"]


@dataclass
class KeySet:
    """A secret key and the public evaluation keys derived from it for one parameter set."""

    params: CkksParams
    galois_steps: tuple[int, ...]
    secret_key: seal.SecretKey
    public_context: bytes

    @classmethod
    def generate(cls, params: CkksParams, galois_steps: tuple[int, ...]) -> KeySet:
        """Make fresh keys: relinearization keys and Galois keys for exactly these steps."""
        context = seal_context(params)
        keygen = seal.KeyGenerator(context)
        sections = {"relin_keys": save_seal(keygen.create_relin_keys())}
        if galois_steps:
            elements = [galois_element(s, params.poly_modulus_degree) for s in galois_steps]
            sections["galois_keys"] = save_seal(keygen.create_galois_keys(elements))
        public = encode_key_bundle(KeyBundle(params, tuple(galois_steps), sections))
        return cls(params, tuple(galois_steps), keygen.secret_key(), public)

    def save(self, path: Path | str) -> None:
        """Write all keys, secret key included, to a local file readable only by the owner."""
        public = decode_key_bundle(self.public_context)
        sections = {**public.sections, "secret_key": save_seal(self.secret_key)}
        data = encode_key_bundle(KeyBundle(self.params, self.galois_steps, sections))
        target = Path(path)
        target.touch(mode=0o600, exist_ok=True)
        target.chmod(0o600)
        target.write_bytes(data)

    @classmethod
    def load(cls, path: Path | str) -> KeySet:
        """Read keys written by ``save``."""
        bundle = decode_key_bundle(Path(path).read_bytes(), allow_secret_key=True)
        if not bundle.has_secret_key:
            raise ValueError(f"{path} holds no secret key")
        context = seal_context(bundle.params)
        secret = load_seal(
            seal.SecretKey, bundle.sections.pop("secret_key"), context, what="secret key"
        )
        public = encode_key_bundle(bundle)
        return cls(bundle.params, bundle.galois_steps, secret, public)

    def encrypt(self, slots: np.ndarray) -> bytes:
        """Encrypt a slot vector symmetrically at the top level (seeded: half the bytes)."""
        context = seal_context(self.params)
        plain = seal.Plaintext()
        seal.CKKSEncoder(context).encode(
            np.asarray(slots, dtype=np.float64).tolist(), self.params.scale, plain
        )
        return save_seeded(seal.Encryptor(context, self.secret_key).encrypt_symmetric(plain))

    def _decrypt_slots(self, data: bytes) -> np.ndarray:
        """Decrypt a ciphertext from the server and decode all its slots as complex numbers.

        Raw CKKS decryptions leak the secret key (Li and Micciancio): only
        ``clients._release`` may call this, and it never lets the raw values out.
        """
        context = seal_context(self.params)
        ct = load_seal(seal.Ciphertext, data, context, what="response ciphertext")
        plain = seal.Plaintext()
        seal.Decryptor(context, self.secret_key).decrypt(ct, plain)
        return np.asarray(seal.CKKSEncoder(context).decode_complex(plain))
