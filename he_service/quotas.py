"""Per-principal quotas: a request rate and a budget of evaluated samples.

The rate limit protects the service's CPU. The sample budget protects the model itself: every
prediction answers one chosen query, and a client that may ask without limit can reconstruct
the network, or a functional copy of it, from enough input/output pairs (model extraction:
Tramèr et al., "Stealing Machine Learning Models via Prediction APIs", USENIX Security 2016).
Encryption does not prevent this, since the key owner decrypts every answer. A budget of samples
per period bounds how much of the model one token can learn.

Both limits are fixed windows that open at a principal's first charge and last
``window_seconds``. The counters live behind one small interface, ``Counters.incr``, with three
backends: ``MemoryCounters`` (one process), ``SqliteCounters`` (the worker processes of one
host share a file) and ``RedisCounters`` (several hosts share a server). With memory counters
and N worker processes every principal gets N times its quota, so use a shared backend there.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from he_service.errors import NotReady, TooManyRequests

if TYPE_CHECKING:
    from he_service.config import Config

__all__ = [
    "Counters",
    "MemoryCounters",
    "Quotas",
    "RedisCounters",
    "SqliteCounters",
]

log = logging.getLogger(__name__)

_UNAVAILABLE = "the quota store is unavailable; retry in a few seconds"
# Expired windows are deleted now and then, so keys of departed principals do not pile up.
_SWEEP_EVERY = 1024


class Counters(Protocol):
    """Windowed counters shared by whoever enforces the same quotas."""

    def incr(
        self, key: str, amount: int, window_seconds: int, *, limit: int | None = None
    ) -> tuple[int, int]:
        """Add ``amount`` to the count of ``key`` in its current window.

        A window opens at the first increment of a key (or the first after the previous window
        ended) and lasts ``window_seconds``.

        Args:
            key: what is counted, e.g. ``samples:alice``.
            amount: how much to add; 0 reads the count and opens no window.
            window_seconds: the length of a new window.
            limit: when given and the new count would exceed it, add nothing: a rejected
                charge costs nothing.

        Returns:
            ``(count, reset)``: the new count (above ``limit`` means nothing was added, and it is
            the count the charge would have made), and whole seconds until the window ends,
            at least 1.

        Raises:
            NotReady: the shared store cannot be reached.
        """
        ...


def _check_incr(amount: int, window_seconds: int) -> None:
    if amount < 0:
        raise ValueError(f"a counter only grows; got amount={amount}")
    if window_seconds < 1:
        raise ValueError(f"window_seconds must be at least 1, got {window_seconds}")


def _seconds_until(end: float, now: float) -> int:
    return max(1, math.ceil(end - now))


class MemoryCounters:
    """Counters in this process's memory, safe across its threads."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Start with no counts.

        Args:
            clock: seconds, for tests; monotonic because nothing outside the process reads it.
        """
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, float]] = {}  # key -> (count, window end)
        self._calls = 0

    def incr(
        self, key: str, amount: int, window_seconds: int, *, limit: int | None = None
    ) -> tuple[int, int]:
        """Add to a count; see ``Counters.incr``."""
        _check_incr(amount, window_seconds)
        with self._lock:
            now = self._clock()
            self._calls += 1
            if self._calls % _SWEEP_EVERY == 0:
                self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
            count, end = self._windows.get(key, (0, now))
            if end <= now:
                count, end = 0, now + window_seconds
            new = count + amount
            if amount and (limit is None or new <= limit):
                self._windows[key] = (new, end)
            return new, _seconds_until(end, now)


class SqliteCounters:
    """Counters in one SQLite file, shared by the worker processes of a host."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_seconds: float = 5.0,
    ) -> None:
        """Open (and create) the counter file.

        Args:
            path: the database file; its directory is created.
            clock: seconds since the epoch, for tests. Wall time, because the windows are
                stored in a file that other processes and later runs read.
            busy_timeout_seconds: how long an increment waits for another process's write.

        Raises:
            sqlite3.Error: the file cannot be opened or is not a database.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._busy_timeout = busy_timeout_seconds
        # sqlite3 connections belong to one thread, and must not cross a fork: one connection
        # per (process, thread).
        self._local = threading.local()
        self._calls = 0
        self._create(self._connection())

    def _create(self, connection: sqlite3.Connection) -> None:
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                # WAL lets readers and the one writer proceed together; it is a property of the
                # file, so the first process to get here sets it for all.
                if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    connection.execute("PRAGMA journal_mode=WAL")
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS counters ("
                    " key TEXT PRIMARY KEY, count INTEGER NOT NULL, expires_at REAL NOT NULL)"
                )
                return
            except sqlite3.OperationalError as exc:
                # Switching to WAL fails at once, without the busy handler, while another
                # process has the new file open: workers that start together retry.
                busy = exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; timeout: the busy
            # timeout, so a concurrent writer makes us wait instead of fail.
            connection = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None
            )
            # Losing the last increments in a power cut is acceptable for quota counters;
            # an fsync per request is not.
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def incr(
        self, key: str, amount: int, window_seconds: int, *, limit: int | None = None
    ) -> tuple[int, int]:
        """Add to a count atomically across processes; see ``Counters.incr``."""
        _check_incr(amount, window_seconds)
        try:
            connection = self._connection()
            # IMMEDIATE takes the write lock before the read, so two processes cannot both read
            # the old count and both write count + amount.
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = self._incr_locked(connection, key, amount, window_seconds, limit)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            log.warning("quota counters in %s unavailable: %s", self.path, exc)
            raise NotReady(_UNAVAILABLE) from exc
        return result

    def _incr_locked(
        self,
        connection: sqlite3.Connection,
        key: str,
        amount: int,
        window_seconds: int,
        limit: int | None,
    ) -> tuple[int, int]:
        now = self._clock()
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            connection.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
        row = connection.execute(
            "SELECT count, expires_at FROM counters WHERE key = ?", (key,)
        ).fetchone()
        count, end = (0, now) if row is None else (int(row[0]), float(row[1]))
        if end <= now:
            count, end = 0, now + window_seconds
        new = count + amount
        if amount and (limit is None or new <= limit):
            connection.execute(
                "INSERT INTO counters (key, count, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET count = excluded.count, "
                "expires_at = excluded.expires_at",
                (key, new, end),
            )
        return new, _seconds_until(end, now)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and self._local.pid == os.getpid():
            connection.close()
        self._local.connection = None


# Read, test and write in one atomic step on the server. The window is the key's TTL, kept by
# Redis's clock, so hosts with skewed clocks still share one window.
_INCR_SCRIPT = """
local amount = tonumber(ARGV[1])
local window_ms = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local ttl = redis.call('PTTL', KEYS[1])
local count = 0
local fresh = ttl <= 0
if fresh then
  ttl = window_ms
else
  count = tonumber(redis.call('GET', KEYS[1]))
end
local new = count + amount
if amount == 0 or (limit >= 0 and new > limit) then
  return {new, ttl}
end
if fresh then
  redis.call('SET', KEYS[1], new, 'PX', window_ms)
else
  redis.call('INCRBY', KEYS[1], amount)
end
return {new, ttl}
"""


class RedisCounters:
    """Counters in Redis, shared by every process on every host that uses the same server."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "he-service:quota:",
        timeout_seconds: float | None = None,
    ) -> None:
        """Connect lazily to Redis.

        Args:
            url: ``redis://[:password@]host:port/db`` (or ``rediss://`` for TLS).
            prefix: put before every key, so the counters do not collide with other data.
            timeout_seconds: bounds connecting and every call (default
                ``redis_link.TIMEOUT_SECONDS``), so a frozen server fails requests quickly
                (503) instead of hanging workers; while the server's breaker is open, calls
                fail at once.
        """
        import redis  # the server extra; only needed when Redis is configured

        from he_service.redis_link import TIMEOUT_SECONDS, connect

        self._redis_error: type[Exception] = redis.RedisError
        self._link = connect(url, timeout=timeout_seconds or TIMEOUT_SECONDS)
        self._client: Any = self._link.client
        self._script: Any = self._client.register_script(_INCR_SCRIPT)
        self.prefix = prefix

    def incr(
        self, key: str, amount: int, window_seconds: int, *, limit: int | None = None
    ) -> tuple[int, int]:
        """Add to a count atomically on the server; see ``Counters.incr``."""
        from he_service.redis_link import RedisDown

        _check_incr(amount, window_seconds)
        try:
            with self._link.guard():
                new, ttl_ms = self._script(
                    keys=[self.prefix + key],
                    args=[amount, window_seconds * 1000, -1 if limit is None else limit],
                )
        except RedisDown as exc:
            raise NotReady(_UNAVAILABLE, exc.retry_after) from None
        except self._redis_error as exc:
            # The URL may hold a password: log the error, never the URL.
            log.warning("quota counters in Redis unavailable: %s", exc)
            raise NotReady(_UNAVAILABLE, 1) from exc
        return int(new), max(1, math.ceil(int(ttl_ms) / 1000))

    def close(self) -> None:
        """Close the connection pool."""
        self._link.close()


def _period(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return unit if count == 1 else f"{count} {unit}s"
    return f"{seconds} seconds"


class Quotas:
    """The request rate and sample budget of every principal."""

    def __init__(
        self,
        counters: Counters,
        *,
        requests_per_minute: int,
        samples_per_period: int,
        period_seconds: int,
    ) -> None:
        """Enforce limits on shared counters.

        Args:
            counters: where counts live; share them between every process serving the same
                principals, or each process grants the whole quota again.
            requests_per_minute: requests one principal may make per minute.
            samples_per_period: samples one principal may have evaluated per period.
            period_seconds: the length of the sample budget's window.

        Raises:
            ValueError: a limit below 1.
        """
        for name, value in (
            ("requests_per_minute", requests_per_minute),
            ("samples_per_period", samples_per_period),
            ("period_seconds", period_seconds),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.counters = counters
        self.requests_per_minute = requests_per_minute
        self.samples_per_period = samples_per_period
        self.period_seconds = period_seconds

    @classmethod
    def from_config(cls, config: Config, state_dir: Path | None = None) -> Quotas:
        """Build the quotas of a service configuration, on the most shared store available.

        Args:
            config: uses ``rate_limit_per_minute``, ``sample_budget``, ``sample_budget_seconds``
                and ``redis_url``.
            state_dir: a directory shared by the host's workers; the counters go to
                ``state_dir / "quotas.sqlite3"`` when Redis is not configured.

        Returns:
            Quotas on Redis when ``config.redis_url`` is set, else on SQLite when ``state_dir``
            is given, else in memory (right for one worker process only).

        Raises:
            NotReady: the SQLite file (or its directory) cannot be opened or is not a database;
                the message names the file and the cause, in one line.
        """
        counters: Counters
        if config.redis_url:
            counters = RedisCounters(config.redis_url)
        elif state_dir is not None:
            path = Path(state_dir) / "quotas.sqlite3"
            try:
                counters = SqliteCounters(path)
            except (sqlite3.Error, OSError) as exc:
                cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise NotReady(f"cannot open the quota database {path}: {cause}") from None
        else:
            counters = MemoryCounters()
        return cls(
            counters,
            requests_per_minute=config.rate_limit_per_minute,
            samples_per_period=config.sample_budget,
            period_seconds=config.sample_budget_seconds,
        )

    def check_request(self, principal_name: str) -> None:
        """Charge one request to a principal's rate limit.

        Args:
            principal_name: who makes the request.

        Raises:
            TooManyRequests: the principal made ``requests_per_minute`` requests in this minute.
            NotReady: the shared counter store cannot be reached.
        """
        limit = self.requests_per_minute
        count, reset = self.counters.incr(f"requests:{principal_name}", 1, 60, limit=limit)
        if count > limit:
            raise TooManyRequests(
                f"rate limit of {limit} requests per minute reached; retry in {reset} s",
                retry_after=reset,
            )

    def charge_samples(self, principal_name: str, samples: int) -> None:
        """Charge evaluated samples to a principal's budget, or refuse without charging.

        Args:
            principal_name: who asks for the evaluation.
            samples: how many samples the request evaluates (0 charges nothing).

        Raises:
            TooManyRequests: the samples do not fit in what is left of this period's budget;
                nothing was charged.
            NotReady: the shared counter store cannot be reached.
            ValueError: a negative number of samples.
        """
        if samples < 0:
            raise ValueError(f"samples must be at least 0, got {samples}")
        if samples == 0:
            return
        budget, period = self.samples_per_period, _period(self.period_seconds)
        count, reset = self.counters.incr(
            f"samples:{principal_name}", samples, self.period_seconds, limit=budget
        )
        if count <= budget:
            return
        if samples > budget:
            raise TooManyRequests(
                f"a request of {samples} samples exceeds the whole sample budget of {budget} "
                f"samples per {period}; send at most {budget} samples per request",
                retry_after=reset,
            )
        resets_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=reset)
        raise TooManyRequests(
            f"sample budget of {budget} samples per {period} exhausted: {count - samples} used, "
            f"this request needs {samples}; the budget resets in {reset} s "
            f"(at {resets_at.isoformat()})",
            retry_after=reset,
        )
