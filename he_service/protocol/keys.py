"""The key bundle: public evaluation keys for upload, or a local key file with the secret key.

A bundle is a framed message: a JSON header, then one section per key kind it lists. The same
container serves the public context (``relin_keys``, ``galois_keys``) and the client's local key
file (adds ``secret_key``); the server refuses any bundle that lists a secret key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from he_service.protocol.errors import ProtocolError
from he_service.protocol.framing import decode_frames, encode_frames
from he_service.protocol.params import CkksParams

__all__ = ["KEYS_FORMAT", "KeyBundle", "decode_key_bundle", "encode_key_bundle"]

KEYS_FORMAT = "he-inference-keys"
_PUBLIC_SECTIONS = ("relin_keys", "galois_keys")
_ALL_SECTIONS = (*_PUBLIC_SECTIONS, "secret_key")
_MAX_HEADER_BYTES = 1 << 16


@dataclass(frozen=True)
class KeyBundle:
    """Parameters, the rotation steps the Galois keys cover, and serialized SEAL keys."""

    params: CkksParams
    galois_steps: tuple[int, ...]
    sections: dict[str, bytes]

    @property
    def has_secret_key(self) -> bool:
        return "secret_key" in self.sections

    def max_section_bytes(self, name: str) -> int:
        """Return the most bytes section ``name`` can hold uncompressed for these parameters.

        Relinearization keys are one key-switching key, Galois keys one per listed step, both
        bounded unseeded (a client may send either form); a secret key is one polynomial over
        all primes.
        """
        params = self.params
        if name == "relin_keys":
            return params.key_switch_key_bytes(seeded=False)
        if name == "galois_keys":
            return max(1, len(self.galois_steps)) * params.key_switch_key_bytes(seeded=False)
        return params.ciphertext_bytes(len(params.coeff_modulus_bits))


def encode_key_bundle(bundle: KeyBundle) -> bytes:
    """Serialize a bundle; sections appear in a fixed order so equal keys give equal bytes."""
    names = [name for name in _ALL_SECTIONS if name in bundle.sections]
    header = {
        "format": KEYS_FORMAT,
        "version": 1,
        "ckks": bundle.params.to_json(),
        "galois_steps": list(bundle.galois_steps),
        "sections": names,
    }
    encoded = json.dumps(header, sort_keys=True).encode()
    return encode_frames([encoded, *(bundle.sections[name] for name in names)])


def decode_key_bundle(data: bytes, *, allow_secret_key: bool = False) -> KeyBundle:
    """Parse a bundle; only the local key file may carry a secret key.

    Args:
        data: the serialized bundle.
        allow_secret_key: True only when reading the user's own key file.

    Returns:
        The bundle with raw (not yet SEAL-loaded) sections, each no larger than its keys can
        be (``KeyBundle.max_section_bytes``).

    Raises:
        ProtocolError: malformed bundle, a secret key where none is allowed, or a section
            larger than its keys can be.
    """
    frames = decode_frames(data, max_items=1 + len(_ALL_SECTIONS))
    if len(frames[0]) > _MAX_HEADER_BYTES:
        raise ProtocolError("key bundle header is too large")
    try:
        header = json.loads(frames[0])
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, 5000-digit ints, deep nesting
        raise ProtocolError("key bundle header is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != KEYS_FORMAT:
        raise ProtocolError(f"not a key bundle (expected format {KEYS_FORMAT!r})")
    names = header.get("sections")
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(names) != len(frames) - 1
        or len(set(names)) != len(names)
    ):
        raise ProtocolError("key bundle sections do not match its frames")
    unknown = sorted(set(map(str, names)) - set(_ALL_SECTIONS))
    if unknown:
        raise ProtocolError(f"key bundle has unknown sections {unknown}")
    if "secret_key" in names and not allow_secret_key:
        raise ProtocolError(
            "this context holds a secret key: never send it. Send the public context instead "
            "(HEClient does: ModelSession.public_context())"
        )
    steps = header.get("galois_steps", [])
    if not isinstance(steps, list) or not all(isinstance(s, int) and s > 0 for s in steps):
        raise ProtocolError("galois_steps must be a list of positive integers")
    params = CkksParams.from_json(header.get("ckks") or {})
    if any(step >= params.slot_count for step in steps):
        raise ProtocolError(f"galois_steps must be below the slot count {params.slot_count}")
    if len(set(steps)) != len(steps):
        raise ProtocolError("galois_steps lists a step twice")
    if "relin_keys" not in names:
        raise ProtocolError("key bundle lacks relin_keys")
    bundle = KeyBundle(params, tuple(steps), dict(zip(names, frames[1:], strict=True)))
    for name, section in bundle.sections.items():
        # Before any inflation: a section cannot be larger than its keys even uncompressed.
        bound = bundle.max_section_bytes(name)
        if len(section) > bound:
            raise ProtocolError(
                f"key bundle section {name} is {len(section)} bytes; its keys hold at most "
                f"{bound} with these parameters"
            )
    return bundle
