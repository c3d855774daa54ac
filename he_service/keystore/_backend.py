"""The small interface every storage backend of the key store implements."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

__all__ = ["EntryInfo", "StorageBackend", "check_context_id", "is_context_id", "owner_key"]

_CONTEXT_ID = re.compile(r"[0-9a-f]{64}")


def is_context_id(value: str) -> bool:
    """Return whether ``value`` is a context id: 64 lowercase hex characters (a sha256)."""
    return _CONTEXT_ID.fullmatch(value) is not None


def check_context_id(value: str) -> str:
    """Return ``value`` if it is a context id; raise ``ValueError`` otherwise.

    Backends call this before a context id reaches a path or a Redis key name.
    """
    if not is_context_id(value):
        raise ValueError(f"not a context id: {value[:80]!r}")
    return value


def owner_key(owner: str) -> str:
    """Return the name an owner's entries are stored under: the sha256 hex of the owner name.

    Owner names come from configuration and requests; hashing them keeps any character out of
    paths and key names, and gives every owner a fixed-length, collision-free namespace.
    """
    return hashlib.sha256(owner.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class EntryInfo:
    """What a backend knows about one stored context besides its bytes.

    Times are seconds since the epoch, on the clock of the ``KeyStore`` that passed them in.
    """

    owner: str
    context_id: str
    size: int
    created: float
    expires_at: float
    last_used: float


class StorageBackend(ABC):
    """Durable context bytes shared by every worker, bounded in count and bytes, with TTL.

    Entries are keyed by (owner, context id); the same id under two owners is two entries.
    Every method is safe to call from several threads and several processes at once. A backend
    reports an unreachable or failing store as ``he_service.errors.NotReady``.
    """

    @abstractmethod
    def store(
        self,
        owner: str,
        context_id: str,
        data: bytes,
        *,
        now: float,
        expires_at: float,
        max_entries: int,
        max_bytes: int,
    ) -> bool:
        """Store a context, first dropping expired entries, then least recently used ones to fit.

        Returns:
            True if the entry is new; False if a live entry already existed (its life is then
            extended to ``expires_at`` and it counts as used now).
        """

    @abstractmethod
    def touch(
        self, owner: str, context_id: str, *, now: float, expires_at: float | None = None
    ) -> EntryInfo | None:
        """Mark a live entry used now (and extend its life to ``expires_at`` if given).

        Returns:
            The entry's information, or None if it does not exist or has expired.
        """

    @abstractmethod
    def read(self, owner: str, context_id: str) -> bytes | None:
        """Return the stored bytes, or None if the entry is gone."""

    @abstractmethod
    def delete(self, owner: str, context_id: str, *, now: float) -> bool:
        """Remove an entry; return whether a live one existed."""

    @abstractmethod
    def stats(self, *, now: float) -> tuple[int, int]:
        """Return the number of live entries and the bytes they hold."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections or handles."""
