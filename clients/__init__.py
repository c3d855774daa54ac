"""Client SDK for the encrypted-inference service (no flask, no torch)."""

from clients._client import HEClient, ModelSession
from clients._crypto import KeySet
from clients._errors import (
    AuthenticationError,
    BadRequestError,
    ContextNotFoundError,
    DaskClusterError,
    HEClientError,
    KeysTooLargeError,
    ModelNotFoundError,
    NotFoundError,
    ParameterMismatchError,
    PayloadTooLargeError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    TransportError,
)
from clients._outputs import OutOfRangeWarning, Outputs
from clients._pipeline import ScoredGroup
from clients._retry import Retry

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ContextNotFoundError",
    "DaskClusterError",
    "HEClient",
    "HEClientError",
    "KeySet",
    "KeysTooLargeError",
    "ModelNotFoundError",
    "ModelSession",
    "NotFoundError",
    "OutOfRangeWarning",
    "Outputs",
    "ParameterMismatchError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "Retry",
    "ScoredGroup",
    "ServerError",
    "ServiceUnavailableError",
    "TransportError",
]
