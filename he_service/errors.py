"""The service's one error tree; each class fixes its HTTP status and code.

The Flask handler in ``app.py`` turns any ``ServiceError`` into
``{"error": {"code": ..., "message": ...}}``; the client SDK maps codes back to its classes.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BadRequest",
    "ContextNotFound",
    "InternalError",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotReady",
    "ParameterMismatch",
    "PayloadTooLarge",
    "RouteNotFound",
    "ServiceError",
    "TooManyRequests",
    "Unauthorized",
    "UnknownUpload",
]


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    """No token, or a token the service does not know (the same answer for both)."""

    status, code = 401, "unauthorized"


class RouteNotFound(ServiceError):
    status, code = 404, "not_found"


class ModelNotFound(ServiceError):
    """No model of that name, or one the server refused to serve (``reason`` says why)."""

    status, code = 404, "model_not_found"

    def __init__(self, name: str, known: list[str], reason: str | None = None) -> None:
        shown = name if len(name) <= 80 else name[:80] + "…"  # never echo a huge path back
        if reason is None:
            message = f"no model named {shown!r}; served models: {', '.join(known) or 'none'}"
        else:
            message = f"model {shown!r} is not served: {reason}"
        super().__init__(message)


class ContextNotFound(ServiceError):
    status, code = 404, "context_not_found"

    def __init__(self, context_id: str) -> None:
        super().__init__(
            f"no context {context_id!r} (never uploaded, expired or evicted); "
            "upload it again with POST /v1/contexts"
        )


class UnknownUpload(ServiceError):
    status, code = 404, "upload_not_found"


class MethodNotAllowed(ServiceError):
    status, code = 405, "method_not_allowed"


class ParameterMismatch(ServiceError):
    status, code = 409, "parameter_mismatch"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"

    def __init__(self, what: str, limit: int, unit: str = "bytes") -> None:
        super().__init__(f"{what} exceeds the limit of {limit} {unit}", limit=limit)


class TooManyRequests(ServiceError):
    """Over a rate limit or a sample budget; ``retry_after`` seconds go in ``Retry-After``."""

    status, code = 429, "too_many_requests"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class NotReady(ServiceError):
    """A dependency (disk, Redis, memory) is not available now; retry, after ``retry_after``."""

    status, code = 503, "not_ready"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        if retry_after is None:
            super().__init__(message)
        else:
            super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class InternalError(ServiceError):
    status, code = 500, "internal_error"
