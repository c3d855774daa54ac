"""The key store: checks uploads, keeps them in a shared backend, caches loaded keys per worker."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import tenseal.sealapi as seal

from he_service.errors import BadRequest, ParameterMismatch, PayloadTooLarge, ServiceError
from he_service.keystore._backend import StorageBackend, is_context_id
from he_service.memory import MemoryBudget
from he_service.protocol import (
    CkksParams,
    ProtocolError,
    decode_key_bundle,
    galois_element,
    load_seal,
    seal_context,
)

if TYPE_CHECKING:
    from he_service.config import Config

__all__ = ["KeyStore", "StoredContext", "loaded_key_bytes"]

_log = logging.getLogger(__name__)


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
        """Return the rotation steps of ``needed`` this context has no Galois key for."""
        if self.galois_keys is None:
            return list(needed)
        degree = self.params.poly_modulus_degree
        return [s for s in needed if not self.galois_keys.has_key(galois_element(s, degree))]


def loaded_key_bytes(params: CkksParams, key_count: int) -> int:
    """Estimate the memory of ``key_count`` loaded key-switching keys.

    Each key holds one 2-polynomial ciphertext per data prime, over all primes.
    """
    return key_count * params.key_switch_key_bytes(seeded=False)


class KeyStore:
    """Uploaded public contexts, per owner, bounded in bytes, count and time to live.

    The bytes live in a ``StorageBackend`` shared by every worker (and they survive restarts);
    each worker keeps the most recently used contexts loaded into SEAL, so a hot context is
    parsed once. Every ``get`` asks the backend whether the entry still lives (and marks it
    used), so a context deleted, expired or evicted by any worker is never served from cache.

    Args:
        backend: where the bytes live (``DiskBackend`` or ``RedisBackend``).
        max_bytes: bound on the bytes stored in the backend, over all owners (a larger upload
            is refused); unless ``cache_bytes`` is given, also the bound of the cache.
        max_entries: bound on the entries in the backend, over all owners.
        ttl_seconds: life of an entry from its last upload.
        accepts: returns why no served model takes these parameters, or None.
        cache_entries: contexts each worker keeps loaded (0: none).
        cache_bytes: bound on the estimated memory (``loaded_key_bytes``) of the contexts this
            worker keeps loaded; an upload whose loaded keys alone exceed it is refused.
        clock: seconds since the epoch (tests pass a fake one).
        max_galois_keys: how many Galois keys the served plans of given parameters can use;
            an upload listing more is refused before any key is inflated.
        budget: the process memory budget; loading keys reserves their size bounds from it.
    """

    def __init__(
        self,
        backend: StorageBackend,
        *,
        max_bytes: int,
        max_entries: int,
        ttl_seconds: float,
        accepts: Callable[[CkksParams], str | None],
        cache_entries: int,
        cache_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        max_galois_keys: Callable[[CkksParams], int] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.backend = backend
        self._max_galois_keys = max_galois_keys
        self._budget = budget
        self._max_bytes, self._max_entries, self._ttl = max_bytes, max_entries, ttl_seconds
        self._accepts = accepts
        self._clock = clock
        self._cache_bytes = max_bytes if cache_bytes is None else cache_bytes
        self._cache = _LoadedCache(cache_entries, self._cache_bytes)

    @classmethod
    def from_config(
        cls,
        config: Config,
        accepts: Callable[[CkksParams], str | None],
        *,
        clock: Callable[[], float] = time.time,
        max_galois_keys: Callable[[CkksParams], int] | None = None,
        budget: MemoryBudget | None = None,
    ) -> KeyStore:
        """Build the store a configuration describes: Redis if ``redis_url``, else a directory.

        Raises:
            NotReady: the directory cannot be created.
        """
        from he_service.keystore._disk import DiskBackend
        from he_service.keystore._redis import RedisBackend

        backend: StorageBackend
        if config.redis_url:
            backend = RedisBackend(config.redis_url)
        else:
            backend = DiskBackend(config.key_store_dir)
        return cls(
            backend,
            max_bytes=config.key_store_max_bytes,
            max_entries=config.key_store_max_entries,
            ttl_seconds=config.key_store_ttl_seconds,
            accepts=accepts,
            cache_entries=config.key_cache_entries,
            clock=clock,
            max_galois_keys=max_galois_keys,
            budget=budget,
        )

    def __len__(self) -> int:
        return self.stats()[0]

    def __repr__(self) -> str:
        return f"KeyStore({self.backend!r}, max_entries={self._max_entries})"

    def stats(self) -> tuple[int, int]:
        """Return the live entries of all owners and the bytes they hold in the backend."""
        return self.backend.stats(now=self._clock())

    def cache_stats(self) -> tuple[int, int]:
        """Return the contexts this worker holds loaded and their estimated memory in bytes."""
        return self._cache.stats()

    def put(self, owner: str, data: bytes) -> tuple[StoredContext, bool]:
        """Check, load and store a public context for ``owner``.

        Args:
            owner: who uploads (the auth principal; "anonymous" without auth).
            data: the uploaded key bundle.

        Returns:
            The stored context and whether it was new (False: this owner already stored these
            bytes; their time to live starts again).

        Raises:
            BadRequest: malformed bundle, secret key present, keys SEAL refuses.
            ParameterMismatch: no served model uses these parameters (from ``accepts``).
            PayloadTooLarge: the bundle exceeds ``max_bytes`` or its loaded keys ``cache_bytes``.
            NotReady: the backend is unreachable or cannot write.
        """
        if len(data) > self._max_bytes:
            raise PayloadTooLarge("this context", self._max_bytes)
        context_id = hashlib.sha256(data).hexdigest()
        key = (owner, context_id)
        now = self._clock()
        expires_at = now + self._ttl
        info = self.backend.touch(owner, context_id, now=now, expires_at=expires_at)
        if info is not None:
            stored = self._cache.get(key)
            if stored is None:
                stored = self._cache.put(key, self._load(context_id, data))
            return replace(stored, expires_at=info.expires_at), False
        stored = self._load(context_id, data)
        created = self.backend.store(
            owner,
            context_id,
            data,
            now=now,
            expires_at=expires_at,
            max_entries=self._max_entries,
            max_bytes=self._max_bytes,
        )
        return replace(self._cache.put(key, stored), expires_at=expires_at), created

    def get(self, owner: str, context_id: str) -> StoredContext | None:
        """Return ``owner``'s live context, loaded, and mark it used; None if there is none.

        Raises:
            NotReady: the backend is unreachable.
        """
        if not is_context_id(context_id):
            return None
        key = (owner, context_id)
        info = self.backend.touch(owner, context_id, now=self._clock())
        if info is None:
            self._cache.discard(key)
            return None
        stored = self._cache.get(key)
        if stored is None:
            data = self.backend.read(owner, context_id)
            if data is None:
                return None
            loaded = self._reload(owner, context_id, data)
            if loaded is None:
                return None
            stored = self._cache.put(key, loaded)
        return replace(stored, expires_at=info.expires_at)

    def exists(self, owner: str, context_id: str) -> bool:
        """Return whether ``owner`` has this live context, marking it used; nothing is parsed."""
        if not is_context_id(context_id):
            return False
        if self.backend.touch(owner, context_id, now=self._clock()) is None:
            self._cache.discard((owner, context_id))
            return False
        return True

    def delete(self, owner: str, context_id: str) -> bool:
        """Delete ``owner``'s context everywhere; return whether a live one existed."""
        if not is_context_id(context_id):
            return False
        self._cache.discard((owner, context_id))
        return self.backend.delete(owner, context_id, now=self._clock())

    def close(self) -> None:
        """Drop the loaded contexts and release the backend's connections."""
        self._cache.clear()
        self.backend.close()

    def _reload(self, owner: str, context_id: str, data: bytes) -> StoredContext | None:
        """Load bytes that were checked at upload; drop the entry if they no longer load."""
        try:
            if hashlib.sha256(data).hexdigest() != context_id:
                raise BadRequest("stored bytes do not match their sha256")
            return self._load(context_id, data, check=False)
        except ServiceError as exc:
            # Damaged or altered storage: better a 404 and a re-upload than a 500 forever.
            _log.warning("dropping stored context %s…: %s", context_id[:12], exc.message)
            self.backend.delete(owner, context_id, now=self._clock())
            return None

    def _load(self, context_id: str, data: bytes, *, check: bool = True) -> StoredContext:
        try:
            bundle = decode_key_bundle(data)
        except ProtocolError as exc:
            raise BadRequest(f"context refused: {exc}") from None
        if check:
            # Only at upload: a stored context whose parameters no model serves any more gets
            # the precise mismatch message at predict time.
            refusal = self._accepts(bundle.params)
            if refusal is not None:
                raise ParameterMismatch(refusal)
            if self._max_galois_keys is not None:
                usable = self._max_galois_keys(bundle.params)
                if len(bundle.galois_steps) > usable:
                    raise BadRequest(
                        f"context refused: it lists {len(bundle.galois_steps)} Galois keys; the "
                        f"models with these parameters use {usable}: make keys for the steps "
                        "of the model card"
                    )
        key_count = 1 + len(bundle.galois_steps)
        memory = loaded_key_bytes(bundle.params, key_count)
        if check and memory > self._cache_bytes:
            raise PayloadTooLarge("the loaded keys of this context", self._cache_bytes)
        context = seal_context(bundle.params)
        # Loading holds one inflated section (a scratch file in memory) and the loaded keys.
        scratch = max(bundle.max_section_bytes(name) for name in bundle.sections)
        reservation = (
            self._budget.reserve(memory + scratch, "loading this context")
            if self._budget is not None
            else contextlib.nullcontext()
        )
        try:
            with reservation:
                relin = load_seal(
                    seal.RelinKeys,
                    bundle.sections["relin_keys"],
                    context,
                    what="relin_keys",
                    max_bytes=bundle.max_section_bytes("relin_keys"),
                )
                galois = None
                if "galois_keys" in bundle.sections:
                    galois = load_seal(
                        seal.GaloisKeys,
                        bundle.sections["galois_keys"],
                        context,
                        what="galois_keys",
                        max_bytes=bundle.max_section_bytes("galois_keys"),
                    )
        except ProtocolError as exc:
            raise BadRequest(f"context refused: {exc}") from None
        if galois is not None and galois.size() != len(bundle.galois_steps):
            raise BadRequest(
                f"context refused: galois_keys hold {galois.size()} keys but the header "
                f"lists {len(bundle.galois_steps)} steps"
            )
        # Also on reload: whoever can write the storage must not be able to crash a worker.
        _check_key_structure(bundle.params, bundle.galois_steps, relin, galois)
        return StoredContext(
            context_id=context_id,
            params=bundle.params,
            galois_steps=frozenset(bundle.galois_steps),
            relin_keys=relin,
            galois_keys=galois,
            memory_bytes=memory,
            expires_at=0.0,  # the backend's entry decides; callers get a copy with the real one
        )


def _check_key_structure(
    params: CkksParams,
    steps: tuple[int, ...],
    relin: seal.RelinKeys,
    galois: seal.GaloisKeys | None,
) -> None:
    """Refuse keys SEAL loads but would misuse: SEAL checks each key, not which keys are there.

    Galois keys sent as relin_keys load as RelinKeys, and relinearizing with them reads past
    the end of SEAL's key vector (a segmentation fault, not an exception).
    """
    decomposition = len(params.coeff_modulus_bits) - 1
    if relin.size() != 1 or not relin.has_key(2) or len(relin.key(2)) != decomposition:
        raise BadRequest(
            "context refused: relin_keys must hold exactly one relinearization key for these "
            "parameters (KeyGenerator.create_relin_keys)"
        )
    if galois is None:
        return
    degree = params.poly_modulus_degree
    for step in steps:
        element = galois_element(step, degree)
        if not galois.has_key(element) or len(galois.key(element)) != decomposition:
            raise BadRequest(
                f"context refused: galois_keys hold no valid key for rotation step {step}; "
                "create them for exactly the steps the header lists"
            )


class _LoadedCache:
    """Thread-safe LRU of loaded contexts, bounded by count and estimated memory."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[tuple[str, str], StoredContext] = OrderedDict()
        self._lock = threading.Lock()
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._bytes = 0

    def get(self, key: tuple[str, str]) -> StoredContext | None:
        with self._lock:
            stored = self._entries.get(key)
            if stored is not None:
                self._entries.move_to_end(key)
            return stored

    def put(self, key: tuple[str, str], stored: StoredContext) -> StoredContext:
        """Keep ``stored`` (unless it alone exceeds a bound) and return it."""
        with self._lock:
            self._pop(key)
            if self._max_entries < 1 or stored.memory_bytes > self._max_bytes:
                return stored
            while self._entries and (
                len(self._entries) >= self._max_entries
                or self._bytes + stored.memory_bytes > self._max_bytes
            ):
                self._pop(next(iter(self._entries)))
            self._entries[key] = stored
            self._bytes += stored.memory_bytes
            return stored

    def discard(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._pop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return len(self._entries), self._bytes

    def _pop(self, key: tuple[str, str]) -> None:
        stored = self._entries.pop(key, None)
        if stored is not None:
            self._bytes -= stored.memory_bytes
