"""Client-side exceptions, mapped from the service's JSON error codes."""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequestError",
    "ContextNotFoundError",
    "DaskClusterError",
    "HEClientError",
    "KeysTooLargeError",
    "ModelNotFoundError",
    "NotFoundError",
    "ParameterMismatchError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
    "error_from_response",
]


class HEClientError(Exception):
    """Base of every error the SDK raises."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.details = status, code, details or {}

    @property
    def retry_after(self) -> int | None:
        """Seconds the service asked to wait before a retry (429, 503), if it said."""
        value = self.details.get("retry_after")
        return int(value) if isinstance(value, int | float) else None


class TransportError(HEClientError):
    """The service could not be reached or the connection broke."""


class BadRequestError(HEClientError):
    """400: the service refused the request's content."""


class NotFoundError(HEClientError):
    """404: unknown route."""


class ModelNotFoundError(NotFoundError):
    """404: no model of that name."""


class ContextNotFoundError(NotFoundError):
    """404: the uploaded keys are gone (expired or evicted); upload them again."""


class ParameterMismatchError(HEClientError):
    """409: keys made for other CKKS parameters, or lacking needed Galois keys."""


class PayloadTooLargeError(HEClientError):
    """413: the body exceeds the service's limit."""


class KeysTooLargeError(PayloadTooLargeError):
    """The plan's public keys exceed what the server accepts; raised before making them.

    ``details`` holds ``needed`` and ``limit`` in bytes.
    """


class AuthenticationError(HEClientError):
    """401: no token, or one the service does not know; pass ``token=`` to ``HEClient``."""


class RateLimitedError(HEClientError):
    """429: over the request rate or the sample budget; ``retry_after`` says when to retry."""


class ServiceUnavailableError(HEClientError):
    """503: the service is not ready (a store down, memory spent); ``retry_after`` may say when."""


class ServerError(HEClientError):
    """5xx: the service failed."""


class DaskClusterError(HEClientError):
    """The Dask cluster that encrypts and decrypts could not be reached, or failed mid-run.

    Groups scored before the failure are kept (``he-client score``'s progress record).
    """


_BY_CODE: dict[str, type[HEClientError]] = {
    "model_not_found": ModelNotFoundError,
    "context_not_found": ContextNotFoundError,
    "parameter_mismatch": ParameterMismatchError,
}
_BY_STATUS: dict[int, type[HEClientError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ParameterMismatchError,
    413: PayloadTooLargeError,
    429: RateLimitedError,
    503: ServiceUnavailableError,
}


def error_from_response(status: int, body: Any, retry_after: str | None = None) -> HEClientError:
    """Build the exception for an error answer (JSON ``{"error": {...}}`` or anything else).

    ``retry_after``: the ``Retry-After`` header, which wins over the body's field.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code", ""))
        message = str(error.get("message", ""))
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
    else:
        code, message, details = "", f"HTTP {status}", {}
    if retry_after is not None and retry_after.strip().isdigit():
        details["retry_after"] = int(retry_after)
    kind = (
        _BY_CODE.get(code)
        or _BY_STATUS.get(status)
        or (ServerError if status >= 500 else HEClientError)
    )
    return kind(f"{message} (HTTP {status})", status=status, code=code or None, details=details)
