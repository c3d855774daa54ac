"""Retries of idempotent calls: capped exponential backoff, full jitter, ``Retry-After``, deadline.

Built on tenacity (its ``wait_random_exponential`` is the "full jitter" of the AWS architecture
note); the policy adds what tenacity does not know: the service's ``Retry-After``, a deadline
on an injectable clock, and which failures are safe to repeat for which call.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
import tenacity

from clients._errors import (
    HEClientError,
    RateLimitedError,
    ServiceUnavailableError,
    TransportError,
)

__all__ = ["Retry", "call_with_retries"]

T = TypeVar("T")


@dataclass(frozen=True)
class Retry:
    """How ``HEClient`` retries a call that failed in a way that may pass.

    Retried: a dropped or refused connection ("Server disconnected", a worker killed), 503 (a
    store down, memory spent) and 429 (over a rate; after ``Retry-After``). Only calls that are
    safe to repeat are retried on a dropped connection: reads, context uploads (the id is the
    content's hash), predictions (a pure function of ciphertexts and keys) and upload parts (by
    index); the others only when the request never reached the server.

    Args:
        attempts: tries per call, the first included (1: no retries).
        deadline: seconds one call may take with all its tries and waits; each try's timeout
            is cut to what is left, and a wait that would end past it is not started.
        backoff: the first wait's upper bound in seconds; each retry doubles it ...
        max_backoff: ... up to this. Each wait is uniform in [0, bound] ("full jitter").
        sleep, clock, rand: ``time.sleep``, ``time.monotonic`` and ``random.uniform`` (tests
            pass fakes).
    """

    attempts: int = 5
    deadline: float = 300.0
    backoff: float = 0.5
    max_backoff: float = 10.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    rand: Callable[[float, float], float] = field(default=random.uniform, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.deadline <= 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("deadline must be positive, backoff and max_backoff not negative")

    def wait(self, retry_number: int, error: BaseException | None) -> float:
        """Return the seconds to wait before retry ``retry_number`` (from 1) after ``error``."""
        asked = error.retry_after if isinstance(error, HEClientError) else None
        if asked is not None:
            return float(asked)
        bound = min(self.max_backoff, self.backoff * 2 ** (retry_number - 1))
        return self.rand(0.0, bound)


NO_RETRY = Retry(attempts=1)


def _retryable(error: BaseException, idempotent: bool) -> bool:
    if isinstance(error, RateLimitedError | ServiceUnavailableError):
        return True
    if not isinstance(error, TransportError):
        return False
    cause = error.__cause__
    if isinstance(cause, httpx.UnsupportedProtocol | httpx.ProxyError):
        return False
    # Never sent: safe for any call. Sent, then dropped: safe only when repeating is harmless.
    return idempotent or isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout)


def call_with_retries(
    policy: Retry, what: str, attempt: Callable[[float], T], *, idempotent: bool
) -> T:
    """Run ``attempt(seconds left)`` until it succeeds, fails for good, or time runs out.

    Raises:
        HEClientError: the last failure; after retries, of the same class, its message saying
            how many tries were made in how long, ``details["attempts"]`` their number.
    """
    start = policy.clock()
    end = start + policy.deadline

    def stop(state: tenacity.RetryCallState) -> bool:
        return (
            state.attempt_number >= policy.attempts or policy.clock() + state.upcoming_sleep >= end
        )

    def wait(state: tenacity.RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        return policy.wait(state.attempt_number, error)

    retrying = tenacity.Retrying(
        stop=stop,
        wait=wait,
        retry=tenacity.retry_if_exception(lambda e: _retryable(e, idempotent)),
        sleep=policy.sleep,
        reraise=True,
    )
    tries = 0

    def once() -> T:
        nonlocal tries
        tries += 1
        return attempt(max(0.001, end - policy.clock()))

    try:
        return retrying(once)
    except HEClientError as error:
        if tries < 2:
            raise
        seconds = policy.clock() - start
        details = {**error.details, "attempts": tries}
        raise type(error)(
            f"{what}: {error} (gave up after {tries} attempts in {seconds:.1f} s)",
            status=error.status,
            code=error.code,
            details=details,
        ) from error
