"""The one table from domain errors to HTTP errors (in the manner of httpx's ``map_exceptions``).

Protocol parsing, evaluation, serving, the registry and uploads raise their own exceptions and
know nothing of HTTP; the app registers one handler per row, so no route catches them by hand.
Parts of the service that only ever answer HTTP (auth, quotas, the key store) raise
``ServiceError`` subclasses themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from he_service.engine import EvaluationError
from he_service.errors import (
    BadRequest,
    ModelNotFound,
    NotReady,
    ParameterMismatch,
    PayloadTooLarge,
    ServiceError,
    TooManyRequests,
    UnknownUpload,
)
from he_service.memory import MemoryBusy, MemoryLimitExceeded
from he_service.protocol import ProtocolError
from he_service.registry import ModelUnavailable
from he_service.serving import KeysDoNotFit, TooManySamples, WorkerOutOfMemory
from he_service.uploads import (
    StagingFull,
    StagingUnavailable,
    TooManyUploads,
    UploadIncomplete,
    UploadNotFound,
    UploadTooLarge,
)

__all__ = ["ERROR_TABLE", "to_service_error"]


def _keys_do_not_fit(error: KeysDoNotFit) -> ServiceError:
    if error.missing:
        return ParameterMismatch(str(error), missing=error.missing)
    return ParameterMismatch(str(error))


# Row order matters only between a class and its subclasses: the first match wins.
ERROR_TABLE: tuple[tuple[type[Exception], Callable[[Any], ServiceError]], ...] = (
    (ProtocolError, lambda e: BadRequest(str(e))),
    (EvaluationError, lambda e: BadRequest(str(e))),
    (KeysDoNotFit, _keys_do_not_fit),
    (
        TooManySamples,
        lambda e: PayloadTooLarge(f"a request of {e.samples} samples", e.limit, "samples"),
    ),
    (ModelUnavailable, lambda e: ModelNotFound(e.name, e.known, e.reason)),
    (UploadNotFound, lambda e: UnknownUpload(str(e))),
    (UploadIncomplete, lambda e: BadRequest(str(e))),
    (UploadTooLarge, lambda e: PayloadTooLarge("the upload", e.limit, "ciphertexts")),
    (TooManyUploads, lambda e: TooManyRequests(str(e), e.retry_after)),
    (StagingFull, lambda e: NotReady(str(e), e.retry_after)),
    (StagingUnavailable, lambda e: NotReady(str(e), e.retry_after)),
    # Whatever Redis error a backend did not translate: the store is unavailable, not a bug.
    (redis.RedisError, lambda e: NotReady("a shared store (Redis) is unavailable; retry", 1)),
    (MemoryBusy, lambda e: NotReady(str(e), e.retry_after)),
    (
        MemoryLimitExceeded,
        lambda e: PayloadTooLarge(
            f"{e.what} (about {e.needed} bytes of memory)", e.limit, "bytes (memory_budget_bytes)"
        ),
    ),
    (WorkerOutOfMemory, lambda e: NotReady(str(e), retry_after=5)),
    # Out of memory outside SEAL (Python objects): the request's objects are gone by now.
    (
        MemoryError,
        lambda e: NotReady(
            "the server ran out of memory for this request; retry later or send fewer samples",
            retry_after=5,
        ),
    ),
)


def to_service_error(error: Exception) -> ServiceError:
    """Return the HTTP error for a domain error of the table.

    Raises:
        LookupError: no row of the table matches (a bug: register only the table's classes).
    """
    for kind, build in ERROR_TABLE:
        if isinstance(error, kind):
            return build(error)
    raise LookupError(f"{type(error).__name__} is not in the error table")
