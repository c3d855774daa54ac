"""CKKS parameters as the model card states them, and the SEAL context they define."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tenseal.sealapi as seal

from he_service.protocol.errors import ProtocolError

__all__ = [
    "MAX_COEFF_BITS_128",
    "CkksParams",
    "galois_element",
    "new_seal_context",
    "seal_context",
]

# SEAL's object headers and parms ids, and the key bundle's JSON header and framing.
_SEAL_OVERHEAD_BYTES = 256
_BUNDLE_OVERHEAD_BYTES = 4096
# Largest total coefficient-modulus size per ring degree at 128-bit classical security
# (HomomorphicEncryption.org standard, the table SEAL enforces with sec_level_type.tc128).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParams:
    """Ring degree, coefficient-modulus prime sizes (last one special) and encoding scale."""

    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int

    @property
    def slot_count(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    @property
    def depth(self) -> int:
        """Return how many rescales a fresh ciphertext can take."""
        return len(self.coeff_modulus_bits) - 2

    @property
    def data_primes(self) -> int:
        """Return the primes a fresh ciphertext carries (all but the special prime)."""
        return len(self.coeff_modulus_bits) - 1

    def ciphertext_bytes(self, primes: int | None = None, *, seeded: bool = False) -> int:
        """Return the serialized size bound of a 2-polynomial ciphertext with ``primes`` limbs.

        A seeded ciphertext (fresh, symmetric encryption) stores one polynomial and a seed.
        SEAL's zstd saves a few percent on top; this is the uncompressed bound plus headers.
        """
        limbs = self.data_primes if primes is None else primes
        polys = 1 if seeded else 2
        return polys * limbs * self.poly_modulus_degree * 8 + _SEAL_OVERHEAD_BYTES

    def key_switch_key_bytes(self, *, seeded: bool = True) -> int:
        """Return the serialized size bound of one Galois key or the relinearization keys.

        A key-switching key holds one ciphertext over all primes (special included) per data
        prime: ``(L - 1) * L * N`` words seeded, twice that loaded, with ``L`` all primes; each
        of those ciphertexts has its own headers (60-bit primes leave zstd nothing to save).
        """
        primes = len(self.coeff_modulus_bits)
        polys = 1 if seeded else 2
        words = polys * (primes - 1) * primes * self.poly_modulus_degree
        return words * 8 + (primes + 1) * _SEAL_OVERHEAD_BYTES

    def public_context_bytes(self, galois_keys: int) -> int:
        """Return the size bound of a public context: relinearization plus Galois keys."""
        return (galois_keys + 1) * self.key_switch_key_bytes() + _BUNDLE_OVERHEAD_BYTES

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": "ckks",
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": list(self.coeff_modulus_bits),
            "scale_bits": self.scale_bits,
            "security_bits": 128,
        }

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> CkksParams:
        """Read and check parameters sent by the other side.

        Raises:
            ProtocolError: a field is missing, out of range, or not 128-bit secure.
        """
        try:
            degree = spec["poly_modulus_degree"]
            bits = spec["coeff_modulus_bits"]
            scale_bits = spec["scale_bits"]
        except (KeyError, TypeError):
            raise ProtocolError(
                "CKKS parameters need poly_modulus_degree, coeff_modulus_bits, scale_bits"
            ) from None
        if type(degree) is not int or degree not in MAX_COEFF_BITS_128:
            raise ProtocolError(f"poly_modulus_degree {degree!r} is not a supported ring degree")
        if not (
            isinstance(bits, list)
            and 2 <= len(bits) <= 64
            and all(type(b) is int and 17 <= b <= 60 for b in bits)
        ):
            raise ProtocolError("coeff_modulus_bits must be 2-64 prime sizes of 17-60 bits")
        if sum(bits) > MAX_COEFF_BITS_128[degree]:
            raise ProtocolError(
                f"coeff_modulus_bits sum to {sum(bits)} bits; N={degree} allows "
                f"{MAX_COEFF_BITS_128[degree]} at 128-bit security"
            )
        if not (type(scale_bits) is int and 10 <= scale_bits <= 60):
            raise ProtocolError("scale_bits must be an integer in [10, 60]")
        return cls(degree, tuple(bits), scale_bits)


@functools.lru_cache(maxsize=16)
def seal_context(params: CkksParams) -> seal.SEALContext:
    """Return the (cached, shared) SEAL context for these parameters at 128-bit security."""
    return new_seal_context(params)


def new_seal_context(params: CkksParams, *, prng_seed: int | None = None) -> seal.SEALContext:
    """Build a fresh SEAL context; ``prng_seed`` makes its keys and noise reproducible.

    A seeded context is for measurements only: anyone who knows the seed knows the keys.
    """
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    parms.set_coeff_modulus(
        seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_modulus_bits))
    )
    if prng_seed is not None:
        parms.set_random_generator(seal.Blake2xbPRNGFactory([prng_seed, 0, 0, 0, 0, 0, 0, 1]))
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise ProtocolError(f"SEAL refuses these parameters: {context.parameters_error_message()}")
    return context


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """Return SEAL's Galois element for a left rotation of the CKKS slots by ``step`` > 0."""
    return pow(3, step, 2 * poly_modulus_degree)
