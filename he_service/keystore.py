"""Bounded in-memory store of uploaded public contexts (evaluation keys).

Keys are parsed and checked by SEAL once, at upload; a context is addressed by the sha256 of
the uploaded bytes, so a re-upload is recognised without parsing. The store is bounded by
entry count and by the memory the loaded keys take, and every entry expires.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import tenseal.sealapi as seal

from he_service.errors import BadRequest, ParameterMismatch, PayloadTooLarge
from he_service.protocol import (
    CkksParams,
    ProtocolError,
    decode_key_bundle,
    galois_element,
    load_seal,
    seal_context,
)

__all__ = ["KeyStore", "StoredContext", "loaded_key_bytes"]


@dataclass(frozen=True)
class StoredContext:
    """A checked public context: parameters, keys loaded into SEAL, and bookkeeping."""

    context_id: str
    params: CkksParams
    galois_steps: frozenset[int]
    relin_keys: seal.RelinKeys
    galois_keys: seal.GaloisKeys | None
    memory_bytes: int
    expires_at: float

    def missing_steps(self, needed: tuple[int, ...]) -> list[int]:
        if self.galois_keys is None:
            return list(needed)
        degree = self.params.poly_modulus_degree
        return [s for s in needed if not self.galois_keys.has_key(galois_element(s, degree))]


def loaded_key_bytes(params: CkksParams, key_count: int) -> int:
    """Estimate the memory of ``key_count`` loaded key-switching keys.

    Each key holds one 2-polynomial ciphertext per data prime, over all primes.
    """
    primes = len(params.coeff_modulus_bits)
    return key_count * (primes - 1) * 2 * params.poly_modulus_degree * primes * 8


class KeyStore:
    """Thread-safe LRU store with byte, count and time-to-live bounds."""

    def __init__(
        self,
        *,
        max_bytes: int,
        max_entries: int,
        ttl_seconds: float,
        accepts: Callable[[CkksParams], str | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entries: OrderedDict[str, StoredContext] = OrderedDict()
        self._lock = threading.Lock()
        self._max_bytes, self._max_entries, self._ttl = max_bytes, max_entries, ttl_seconds
        self._accepts = accepts
        self._clock = clock

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(e.memory_bytes for e in self._entries.values())

    def put(self, data: bytes) -> tuple[StoredContext, bool]:
        """Check, load and store a public context.

        Args:
            data: the uploaded key bundle.

        Returns:
            The stored context and whether it was new (False: already stored, TTL refreshed).

        Raises:
            BadRequest: malformed bundle, secret key present, keys SEAL refuses.
            ParameterMismatch: no served model uses these parameters (from ``accepts``).
            PayloadTooLarge: the loaded keys alone exceed the store's byte bound.
        """
        context_id = hashlib.sha256(data).hexdigest()
        with self._lock:
            existing = self._entries.get(context_id)
            if existing is not None and existing.expires_at > self._clock():
                refreshed = replace(existing, expires_at=self._clock() + self._ttl)
                self._entries[context_id] = refreshed
                self._entries.move_to_end(context_id)
                return refreshed, False
        stored = self._load(context_id, data)
        with self._lock:
            self._entries.pop(context_id, None)
            self._evict(stored.memory_bytes)
            self._entries[context_id] = stored
        return stored, True

    def get(self, context_id: str) -> StoredContext | None:
        with self._lock:
            entry = self._entries.get(context_id)
            if entry is None:
                return None
            if entry.expires_at <= self._clock():
                del self._entries[context_id]
                return None
            self._entries.move_to_end(context_id)
            return entry

    def delete(self, context_id: str) -> bool:
        with self._lock:
            return self._entries.pop(context_id, None) is not None

    def _load(self, context_id: str, data: bytes) -> StoredContext:
        try:
            bundle = decode_key_bundle(data)
        except ProtocolError as exc:
            raise BadRequest(f"context refused: {exc}") from None
        refusal = self._accepts(bundle.params)
        if refusal is not None:
            raise ParameterMismatch(refusal)
        key_count = 1 + len(bundle.galois_steps)
        memory = loaded_key_bytes(bundle.params, key_count)
        if memory > self._max_bytes:
            raise PayloadTooLarge("the loaded keys of this context", self._max_bytes)
        context = seal_context(bundle.params)
        try:
            relin = load_seal(
                seal.RelinKeys, bundle.sections["relin_keys"], context, what="relin_keys"
            )
            galois = None
            if "galois_keys" in bundle.sections:
                galois = load_seal(
                    seal.GaloisKeys, bundle.sections["galois_keys"], context, what="galois_keys"
                )
        except ProtocolError as exc:
            raise BadRequest(f"context refused: {exc}") from None
        if galois is not None and galois.size() != len(bundle.galois_steps):
            raise BadRequest(
                f"context refused: galois_keys hold {galois.size()} keys but the header "
                f"lists {len(bundle.galois_steps)} steps"
            )
        return StoredContext(
            context_id=context_id,
            params=bundle.params,
            galois_steps=frozenset(bundle.galois_steps),
            relin_keys=relin,
            galois_keys=galois,
            memory_bytes=memory,
            expires_at=self._clock() + self._ttl,
        )

    def _evict(self, incoming: int) -> None:
        now = self._clock()
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            del self._entries[key]
        total = sum(e.memory_bytes for e in self._entries.values())
        while self._entries and (
            len(self._entries) >= self._max_entries or total + incoming > self._max_bytes
        ):
            _, oldest = self._entries.popitem(last=False)
            total -= oldest.memory_bytes
