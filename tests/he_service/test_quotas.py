from __future__ import annotations

import multiprocessing
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from he_service.config import Config
from he_service.errors import NotReady, TooManyRequests
from he_service.quotas import (
    Counters,
    MemoryCounters,
    Quotas,
    RedisCounters,
    SqliteCounters,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis(url: str) -> RedisCounters:
    # A fresh prefix per test instead of FLUSHDB: tests stay independent.
    return RedisCounters(url, prefix=f"test:{uuid.uuid4().hex}:")


@pytest.fixture(params=["memory", "sqlite"])
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Counters, Clock]:
    """Counters on a fake clock, for window tests."""
    clock = Clock()
    if request.param == "memory":
        return MemoryCounters(clock=clock), clock
    return SqliteCounters(tmp_path / "q.sqlite3", clock=clock), clock


@pytest.fixture(params=["memory", "sqlite", "redis"])
def counters(request: pytest.FixtureRequest, tmp_path: Path) -> Counters:
    """Every backend on its real clock, for tests that do not wait for a window to end."""
    if request.param == "memory":
        return MemoryCounters()
    if request.param == "sqlite":
        return SqliteCounters(tmp_path / "q.sqlite3")
    return _redis(request.getfixturevalue("redis_url"))


# ---- the counter interface, every backend ---------------------------------------------------


def test_incr_counts_per_key(counters: Counters) -> None:
    assert counters.incr("a", 1, 60)[0] == 1
    assert counters.incr("a", 5, 60)[0] == 6
    assert counters.incr("b", 2, 60)[0] == 2
    count, reset = counters.incr("a", 0, 60)  # amount 0 reads
    assert count == 6 and 1 <= reset <= 60


def test_limit_rejects_without_charging(counters: Counters) -> None:
    assert counters.incr("k", 8, 60, limit=10) == (8, pytest.approx(60, abs=1))
    count, reset = counters.incr("k", 3, 60, limit=10)
    assert count == 11 and 1 <= reset <= 60  # what the charge would have made
    assert counters.incr("k", 2, 60, limit=10)[0] == 10  # the rejected 3 cost nothing
    assert counters.incr("k", 1, 60, limit=10)[0] == 11
    assert counters.incr("k", 0, 60)[0] == 10
    assert counters.incr("fresh", 11, 60, limit=10)[0] == 11  # over the limit on its own
    assert counters.incr("fresh", 0, 60)[0] == 0


def test_incr_rejects_bad_arguments(counters: Counters) -> None:
    with pytest.raises(ValueError, match="only grows"):
        counters.incr("k", -1, 60)
    with pytest.raises(ValueError, match="window_seconds"):
        counters.incr("k", 1, 0)


def test_threads_share_counts_exactly(counters: Counters) -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [counters.incr("t", 1, 3600)[0] for _ in range(100)]
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == list(range(1, 401))  # every increment saw a distinct count


# ---- windows, on a fake clock -----------------------------------------------------------------


def test_window_opens_at_first_charge_and_resets(clocked: tuple[Counters, Clock]) -> None:
    counters, clock = clocked
    assert counters.incr("k", 1, 60) == (1, 60)
    clock.now += 10.5
    assert counters.incr("k", 1, 60) == (2, 50)  # 49.5 s left, rounded up
    clock.now += 49.4
    assert counters.incr("k", 1, 60) == (3, 1)  # 0.1 s left: still at least 1
    clock.now += 0.1
    assert counters.incr("k", 1, 60) == (1, 60)  # a new window
    assert counters.incr("other", 1, 30) == (1, 30)


def test_rejections_and_reads_do_not_open_a_window(clocked: tuple[Counters, Clock]) -> None:
    counters, clock = clocked
    assert counters.incr("k", 5, 60, limit=4) == (5, 60)
    assert counters.incr("k", 0, 60) == (0, 60)
    clock.now += 30
    assert counters.incr("k", 4, 60, limit=4) == (4, 60)  # the window starts now, not 30 s ago


def test_expired_windows_are_swept(clocked: tuple[Counters, Clock]) -> None:
    counters, clock = clocked
    for index in range(1100):
        counters.incr(f"key{index}", 1, 10)
    clock.now += 11
    for _ in range(1100):
        counters.incr("live", 1, 60)
    if isinstance(counters, MemoryCounters):
        assert set(counters._windows) == {"live"}
    else:
        assert isinstance(counters, SqliteCounters)
        rows = counters._connection().execute("SELECT key FROM counters").fetchall()
        assert rows == [("live",)]


# ---- SQLite across processes ------------------------------------------------------------------


def _hammer(path: str, count: int, barrier: Any, results: Any) -> None:
    barrier.wait()
    counters = SqliteCounters(path)  # both create the new file at once, as workers do
    barrier.wait()  # then both increment at once
    results.put([counters.incr("shared", 1, 3600)[0] for _ in range(count)])


def test_sqlite_counts_exactly_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    per_process = 1000
    workers = [
        context.Process(target=_hammer, args=(str(path), per_process, barrier, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    seen = results.get(timeout=60) + results.get(timeout=60)
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert sorted(seen) == list(range(1, 2 * per_process + 1))  # no lost or doubled update
    assert SqliteCounters(path).incr("shared", 0, 3600)[0] == 2 * per_process


def test_sqlite_uses_wal_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "q.sqlite3"
    first = SqliteCounters(path)
    first.incr("k", 7, 3600)
    first.close()
    second = SqliteCounters(path)
    assert second.incr("k", 0, 3600)[0] == 7
    mode = second._connection().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_sqlite_busy_store_is_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    counters = SqliteCounters(path, busy_timeout_seconds=0.05)
    holder = SqliteCounters(path)._connection()
    holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock too long
    try:
        with pytest.raises(NotReady, match="quota store is unavailable"):
            counters.incr("k", 1, 60)
    finally:
        holder.execute("ROLLBACK")
    assert counters.incr("k", 1, 60)[0] == 1


# ---- Redis ------------------------------------------------------------------------------------


def test_redis_window_is_the_key_ttl(redis_url: str) -> None:
    import redis

    counters = _redis(redis_url)
    assert counters.incr("k", 3, 60) == (3, 60)
    client = redis.Redis.from_url(redis_url)
    ttl = client.pttl(counters.prefix + "k")
    assert 58_000 < ttl <= 60_000
    counters.incr("k", 1, 60)
    assert client.pttl(counters.prefix + "k") <= ttl  # charging does not extend the window
    client.pexpire(counters.prefix + "k", 1)  # end the window without waiting a minute
    time.sleep(0.01)
    assert counters.incr("k", 1, 60) == (1, 60)
    client.close()


def test_redis_down_is_not_ready_and_hides_the_password() -> None:
    counters = RedisCounters(f"redis://:s3cret@127.0.0.1:{_free_port()}/0", timeout_seconds=0.5)
    with pytest.raises(NotReady) as excinfo:
        counters.incr("k", 1, 60)
    assert "s3cret" not in excinfo.value.message
    assert excinfo.value.status == 503


# ---- Quotas -----------------------------------------------------------------------------------


def _quotas(counters: Counters, rpm: int = 3, budget: int = 100, period: int = 86400) -> Quotas:
    return Quotas(
        counters, requests_per_minute=rpm, samples_per_period=budget, period_seconds=period
    )


def test_rate_limit_per_minute(clocked: tuple[Counters, Clock]) -> None:
    counters, clock = clocked
    quotas = _quotas(counters, rpm=3)
    for _ in range(3):
        quotas.check_request("alice")
    clock.now += 20
    with pytest.raises(TooManyRequests) as excinfo:
        quotas.check_request("alice")
    error = excinfo.value
    assert error.status == 429 and error.retry_after == 40
    assert error.message == "rate limit of 3 requests per minute reached; retry in 40 s"
    assert error.to_json()["error"]["retry_after"] == 40
    quotas.check_request("bob")  # another principal has its own limit
    clock.now += 40
    quotas.check_request("alice")


def test_sample_budget_rejects_without_charging(clocked: tuple[Counters, Clock]) -> None:
    counters, clock = clocked
    quotas = _quotas(counters, budget=100, period=86400)
    quotas.charge_samples("alice", 60)
    clock.now += 3600
    with pytest.raises(TooManyRequests) as excinfo:
        quotas.charge_samples("alice", 50)
    error = excinfo.value
    assert error.retry_after == 82800
    assert error.message.startswith(
        "sample budget of 100 samples per day exhausted: 60 used, this request needs 50; "
        "the budget resets in 82800 s (at "
    )
    quotas.charge_samples("alice", 40)  # the refused 50 cost nothing: 60 + 40 fits exactly
    with pytest.raises(TooManyRequests):
        quotas.charge_samples("alice", 1)
    quotas.charge_samples("bob", 100)
    clock.now += 82800
    quotas.charge_samples("alice", 100)  # a new period


def test_request_larger_than_the_whole_budget(clocked: tuple[Counters, Clock]) -> None:
    counters, _ = clocked
    quotas = _quotas(counters, budget=100, period=3600)
    with pytest.raises(TooManyRequests) as excinfo:
        quotas.charge_samples("alice", 101)
    assert excinfo.value.message == (
        "a request of 101 samples exceeds the whole sample budget of 100 samples per hour; "
        "send at most 100 samples per request"
    )
    assert excinfo.value.retry_after == 3600
    quotas.charge_samples("alice", 100)


def test_charge_samples_edge_cases() -> None:
    quotas = _quotas(MemoryCounters(), budget=1, period=90)
    quotas.charge_samples("alice", 0)
    quotas.charge_samples("alice", 1)
    quotas.charge_samples("alice", 0)  # charges nothing, so never over budget
    with pytest.raises(TooManyRequests, match="per 90 seconds"):
        quotas.charge_samples("alice", 1)
    with pytest.raises(ValueError, match="at least 0"):
        quotas.charge_samples("alice", -1)


@pytest.mark.parametrize("field", ["requests_per_minute", "samples_per_period", "period_seconds"])
def test_quotas_refuse_non_positive_limits(field: str) -> None:
    limits = {"requests_per_minute": 1, "samples_per_period": 1, "period_seconds": 1, field: 0}
    with pytest.raises(ValueError, match=field):
        Quotas(MemoryCounters(), **limits)


def test_quotas_work_on_redis(redis_url: str) -> None:
    quotas = _quotas(_redis(redis_url), rpm=2, budget=10, period=3600)
    quotas.check_request("alice")
    quotas.check_request("alice")
    with pytest.raises(TooManyRequests) as excinfo:
        quotas.check_request("alice")
    assert 1 <= excinfo.value.retry_after <= 60
    quotas.charge_samples("alice", 8)
    with pytest.raises(TooManyRequests) as excinfo:
        quotas.charge_samples("alice", 3)
    assert 3590 <= excinfo.value.retry_after <= 3600
    quotas.charge_samples("alice", 2)


# ---- from_config ------------------------------------------------------------------------------


def test_from_config_picks_the_backend(tmp_path: Path) -> None:
    config = Config.load(
        {"rate_limit_per_minute": 5, "sample_budget": 50, "sample_budget_seconds": 600},
        environ={},
    )
    in_memory = Quotas.from_config(config)
    assert isinstance(in_memory.counters, MemoryCounters)
    assert (in_memory.requests_per_minute, in_memory.samples_per_period) == (5, 50)
    assert in_memory.period_seconds == 600

    on_disk = Quotas.from_config(config, tmp_path / "state")
    assert isinstance(on_disk.counters, SqliteCounters)
    assert on_disk.counters.path == tmp_path / "state" / "quotas.sqlite3"
    assert on_disk.counters.path.exists()

    # Redis wins even with a state dir; connecting is lazy, so no server is needed here.
    with_redis = Quotas.from_config(
        Config.load({"redis_url": "redis://127.0.0.1:1/0"}, environ={}), tmp_path
    )
    assert isinstance(with_redis.counters, RedisCounters)
