"""What every staging backend of uploads implements, and the errors uploads raise."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "StagingBackend",
    "StagingFull",
    "StagingUnavailable",
    "TooManyUploads",
    "UploadError",
    "UploadIncomplete",
    "UploadInfo",
    "UploadNotFound",
    "UploadTooLarge",
    "check_upload_id",
    "is_upload_id",
]

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def is_upload_id(value: str) -> bool:
    """Return whether ``value`` is an upload id: 32 lowercase hex characters."""
    return _UPLOAD_ID.fullmatch(value) is not None


def check_upload_id(value: str) -> str:
    """Return ``value`` if it is an upload id; raise ``UploadNotFound`` otherwise.

    Backends call this before an id reaches a path or a Redis key name.
    """
    if not is_upload_id(value):
        raise UploadNotFound(value)
    return value


class UploadError(Exception):
    """Base of the errors of staged uploads; the message says what to do."""


class UploadNotFound(UploadError):
    """No live upload of this id for this caller (never created, expired, or consumed)."""

    def __init__(self, upload_id: str) -> None:
        shown = upload_id if len(upload_id) <= 40 else upload_id[:40] + "…"
        super().__init__(
            f"no upload {shown!r} (never created, expired, or already used for a prediction); "
            "start a new one with POST /v1/models/{name}/uploads"
        )


class UploadTooLarge(UploadError):
    """The parts would hold more ciphertexts than one request of the plan may carry."""

    def __init__(self, ciphertexts: int, limit: int) -> None:
        super().__init__(
            f"the upload's parts would hold {ciphertexts} ciphertexts, over the limit of {limit}"
        )
        self.limit = limit


class UploadIncomplete(UploadError):
    """Parts are missing (never sent, or evicted) when the prediction is asked for."""


class TooManyUploads(UploadError):
    """The caller has as many open uploads as allowed; ``retry_after`` seconds until one ends."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"you have {limit} open uploads, the most allowed; finish or delete one "
            "(DELETE /v1/uploads/{upload_id}), or wait until one expires"
        )
        self.retry_after = retry_after


class StagingFull(UploadError):
    """The bytes staged by all callers would exceed the server's bound."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"the server's staging area ({limit} bytes) is full; retry later or send smaller parts"
        )
        self.retry_after = retry_after


class StagingUnavailable(UploadError):
    """The staging storage (disk or Redis) failed; the request may be retried.

    ``retry_after``: seconds after which a retry may succeed, when the backend knows.
    """

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class UploadInfo:
    """One upload: what it is for, when it expires, and the parts received so far.

    ``parts`` maps a part's index to (ciphertexts, bytes). Times are seconds since the epoch on
    the clock of the ``Uploads`` that passed them in.
    """

    owner: str
    upload_id: str
    model: str
    plan: str
    context_id: str
    created: float
    expires_at: float
    parts: Mapping[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def ciphertexts(self) -> int:
        return sum(count for count, _ in self.parts.values())

    @property
    def size(self) -> int:
        return sum(size for _, size in self.parts.values())


class StagingBackend(ABC):
    """Upload parts shared by every worker (and, with Redis, every host), bounded, with TTL.

    Uploads are keyed by (owner, upload id). Every method is safe to call from several threads
    and processes at once; a failing store is reported as ``StagingUnavailable``. Expired
    uploads are removed by ``create`` and ``put_part`` (any caller's), and by ``sweep``.
    """

    @abstractmethod
    def create(self, info: UploadInfo, *, now: float, max_per_owner: int) -> None:
        """Record a new upload with no parts.

        Raises:
            TooManyUploads: the owner already has ``max_per_owner`` live uploads.
        """

    @abstractmethod
    def put_part(
        self,
        owner: str,
        upload_id: str,
        index: int,
        data: bytes,
        ciphertexts: int,
        *,
        now: float,
        expires_at: float,
        max_ciphertexts: int,
        max_bytes: int,
    ) -> UploadInfo:
        """Store (or replace) one part and extend the upload's life to ``expires_at``.

        Args:
            max_ciphertexts: bound on the ciphertexts of all the upload's parts.
            max_bytes: bound on the bytes staged by all uploads of all owners.

        Returns:
            The upload with its parts after this one.

        Raises:
            UploadNotFound: no live upload.
            UploadTooLarge: the parts would exceed ``max_ciphertexts``.
            StagingFull: all staged bytes would exceed ``max_bytes``.
        """

    @abstractmethod
    def info(self, owner: str, upload_id: str, *, now: float) -> UploadInfo | None:
        """Return a live upload, or None."""

    @abstractmethod
    def read_part(self, owner: str, upload_id: str, index: int) -> bytes | None:
        """Return a part's bytes, or None if it is gone."""

    @abstractmethod
    def delete(self, owner: str, upload_id: str, *, now: float) -> bool:
        """Remove an upload and its parts; return whether a live one existed."""

    @abstractmethod
    def sweep(self, *, now: float) -> None:
        """Remove every expired upload of every owner."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles."""
