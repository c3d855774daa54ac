"""One way to talk to Redis: short timeouts, and a circuit breaker per server and process.

Every Redis user of the service (contexts, upload parts, quota counters) connects through
``connect`` and runs its commands inside ``RedisLink.guard``. A frozen server then costs one
command ``timeout`` seconds (not the 30 s of a default socket), and after ``failures`` such
errors in a row the breaker opens: for ``reset_seconds`` every command fails at once with
``RedisDown`` (a 503 with ``Retry-After``) instead of holding a worker thread. Then one command
is let through as a trial: its success closes the breaker, its failure opens it again. So the
service recovers by itself when Redis is back, without a restart.

The breaker is shared by every client of the same server in one process (keyed by host, port
and database, never the password): when the key store finds Redis down, quota checks and
uploads fail fast too.

Why not ``pybreaker``: its ``CircuitBreaker.call`` holds one lock across the protected call, so
the threads of a worker would run their Redis commands one at a time and queue behind a frozen
one. ``circuitbreaker`` lets every caller through when half-open. This one locks only its
counters and lets exactly one trial through.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "BULK_TIMEOUT_SECONDS",
    "TIMEOUT_SECONDS",
    "Breaker",
    "RedisDown",
    "RedisLink",
    "breaker_for",
    "connect",
]

# A command on a healthy server takes milliseconds; one second means it is frozen or gone.
TIMEOUT_SECONDS = 1.0
# Commands that carry a body (a context of up to 128 MiB, an upload part of up to 64 MiB): a
# socket's send timeout bounds the whole send, which takes about 1 s per 100 MiB over 1 GbE.
# They always follow a short command that found the server alive.
BULK_TIMEOUT_SECONDS = 10.0


class RedisDown(Exception):
    """Redis is unavailable (the breaker is open); retry after ``retry_after`` seconds."""

    def __init__(self, where: str, retry_after: int) -> None:
        super().__init__(
            f"Redis at {where} did not answer; calls are suspended for {retry_after} s"
        )
        self.retry_after = retry_after


class Breaker:
    """A circuit breaker: closed, open for ``reset_seconds`` after failures, then one trial.

    Args:
        where: the server, for messages (host:port/db).
        failures: consecutive failures that open the breaker.
        reset_seconds: how long it stays open before letting one trial call through.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        where: str,
        *,
        failures: int = 2,
        reset_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self._failures, self._reset = failures, reset_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False  # a trial call is in flight

    @property
    def state(self) -> str:
        """Return ``closed``, ``open`` or ``half-open`` (the next call is a trial)."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "open" if self._clock() < self._opened_at + self._reset else "half-open"

    def before(self) -> None:
        """Let a call through, or raise ``RedisDown`` while open or while a trial runs."""
        with self._lock:
            if self._opened_at is None:
                return
            left = self._opened_at + self._reset - self._clock()
            if left <= 0 and not self._trial:
                self._trial = True
                return
            raise RedisDown(self.where, max(1, math.ceil(left)))

    def success(self) -> None:
        with self._lock:
            self._count, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._trial or self._count >= self._failures:
                self._opened_at = self._clock()
            self._trial = False


_breakers: dict[str, Breaker] = {}
_breakers_lock = threading.Lock()


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


def breaker_for(url: str) -> Breaker:
    """Return this process's breaker for the server of ``url`` (created on first use)."""
    where = _where(url)
    with _breakers_lock:
        breaker = _breakers.get(where)
        if breaker is None:
            breaker = _breakers[where] = Breaker(where)
        return breaker


class RedisLink:
    """Clients of one Redis server with bounded timeouts, behind the server's breaker.

    Attributes:
        client: for ordinary commands (``timeout`` seconds per socket operation).
        bulk: for commands that carry a large body (``bulk_timeout``).
        breaker: shared with every other link to the same server in this process.
        where: host:port/db, for messages (never the password).
    """

    def __init__(self, client: Any, bulk: Any, breaker: Breaker) -> None:
        import redis

        self.client, self.bulk, self.breaker = client, bulk, breaker
        self.where = breaker.where
        self._down: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run Redis commands: fail at once while the breaker is open, and count failures.

        Raises:
            RedisDown: the breaker is open.
            redis.RedisError: the command failed (connection and timeout errors also count
                towards opening the breaker).
        """
        self.breaker.before()
        try:
            yield
        except self._down:
            self.breaker.failure()
            raise
        except BaseException:
            # The server answered (a script error, out of memory): it is alive.
            self.breaker.success()
            raise
        self.breaker.success()

    def close(self) -> None:
        self.client.close()
        self.bulk.close()


def connect(
    url: str,
    *,
    timeout: float = TIMEOUT_SECONDS,
    bulk_timeout: float = BULK_TIMEOUT_SECONDS,
) -> RedisLink:
    """Make (lazily connecting) clients of the server at ``url`` and join its breaker.

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS).
        timeout: seconds to connect and per socket operation of ordinary commands.
        bulk_timeout: the same for commands that carry a body.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    def make(seconds: float) -> Any:
        # No retries inside redis-py: a retried timeout doubles what a frozen server costs,
        # and the breaker and the client SDK decide about retrying.
        return redis.Redis.from_url(
            url,
            socket_timeout=seconds,
            socket_connect_timeout=min(seconds, timeout),
            retry=Retry(NoBackoff(), 0),
        )

    return RedisLink(make(timeout), make(max(timeout, bulk_timeout)), breaker_for(url))
