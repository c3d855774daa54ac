"""Load test: the real ``he-service serve`` process on loopback under concurrent clients.

At least eight client threads, each with its own ``HEClient``, mix context uploads (known keys
and new small ones), latency predictions on ``breast-cancer-mlp`` and ``mnist-cnn`` (each
decrypted class checked against the plaintext network), batch predictions of a few dozen rows,
and bad requests that must get the expected 4xx. Nothing unexpected may happen, the server must
stay healthy, and its memory (the server process and its workers, sampled every 0.5 s) must
not keep growing once warm.

The default run (~15 s) is part of the normal suite; ``pytest -m long tests/test_load.py`` runs
the 60-second one, and the same again under faults (50 slow connections, a gunicorn worker
killed every 15 s: the SDK's retries must carry every call). ``-s`` prints the summary table;
the figures are also recorded as JUnit properties. The machinery lives in ``tests/load_client.py``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.load_client import (
    BREAST,
    MIX,
    LoadReport,
    RssSampler,
    ServedProcess,
    Workload,
    run_load,
    start_server,
    supports_workers,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc for RSS"),
]

THREADS = int(os.environ.get("HE_LOAD_THREADS", "8"))
DEFAULT_SECONDS = float(os.environ.get("HE_LOAD_SECONDS", "15"))
LONG_SECONDS = float(os.environ.get("HE_LOAD_LONG_SECONDS", "60"))
# Once warm, the server's memory may move with caches and allocator noise, not grow for good.
MAX_GROWTH_BYTES = 200 << 20
MAX_GROWTH_FRACTION = 0.20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    workers = 2 if supports_workers() else None  # gunicorn when this checkout has it
    served = start_server(tmp_path_factory.mktemp("load"), workers=workers)
    try:
        yield served
    finally:
        code = served.stop()
        assert code == 0, f"the server did not stop cleanly ({code}):\n{served.log_text()[-3000:]}"


@pytest.fixture(scope="module")
def workload(server: ServedProcess) -> Workload:
    return Workload.prepare(server.url)  # keys generated once, shared by every client thread


def _check(
    report: LoadReport, server: ServedProcess, record_property: Any, *, faults: bool = False
) -> None:
    print("\n" + report.table())
    growth, fraction = report.rss_growth()
    first, last = report.rss.thirds()
    figures = {
        "seconds": round(report.seconds, 1),
        "client_threads": report.threads,
        "server_workers": report.workers,
        "requests": report.requests,
        "unexpected": report.unexpected,
        "rss_peak_mib": round(report.rss.peak / 2**20),
        "rss_first_third_mib": round(first / 2**20),
        "rss_last_third_mib": round(last / 2**20),
        "rss_growth_mib": round(growth / 2**20),
    }
    for name, value in figures.items():
        record_property(name, value)
    assert report.unexpected == 0, report.table()
    assert server.process.poll() is None, server.log_text()[-3000:]
    assert httpx.get(f"{server.url}/v1/health", timeout=10).status_code == 200
    ran = {kind for kind, seconds in report.stats.seconds.items() if seconds}
    good = {kind for kind in MIX if not kind.startswith("bad")}
    assert good <= ran, f"never ran: {sorted(good - ran)}"
    assert report.stats.count("expected") > 0  # the bad requests did run, and got their 4xx
    # Warm, the store holds every known context: only new keys may be created (a 201). More
    # 201s mean the SDK uploaded again after a 404: contexts lost, or not shared by workers.
    created = sum(
        1
        for m, r, status, _ in report.http.requests
        if (m, r, status) == ("POST", "/v1/contexts", 201)
    )
    new = report.stats.outcomes["upload new keys"]["ok"]
    assert created == new, f"{created} contexts created during the run, {new} of them new keys"
    if faults:
        return  # killed workers are replaced by new ones: memory starts over, growth means nothing
    assert growth < MAX_GROWTH_BYTES and fraction < MAX_GROWTH_FRACTION, (
        f"server RSS grew by {growth / 2**20:.0f} MiB ({fraction:.1%}) between the first and "
        f"the last third of the run; bound: {MAX_GROWTH_BYTES >> 20} MiB and "
        f"{MAX_GROWTH_FRACTION:.0%}"
    )


def test_load_mixed_clients(
    server: ServedProcess, workload: Workload, record_property: Any
) -> None:
    report = run_load(server, workload, seconds=DEFAULT_SECONDS, threads=THREADS)
    _check(report, server, record_property)


@pytest.mark.long
def test_load_mixed_clients_long(
    server: ServedProcess, workload: Workload, record_property: Any
) -> None:
    report = run_load(server, workload, seconds=LONG_SECONDS, threads=THREADS, seed=1000)
    _check(report, server, record_property)


@pytest.mark.long
def test_load_mixed_clients_long_with_faults(
    server: ServedProcess, workload: Workload, record_property: Any
) -> None:
    """The long run again with 50 slow connections and a worker SIGKILLed every 15 s."""
    report = run_load(
        server, workload, seconds=LONG_SECONDS, threads=THREADS, seed=2000, faults=True
    )
    _check(report, server, record_property, faults=True)
    if server.workers > 1:
        assert report.kills, "no worker was killed: the run proved nothing"


@pytest.mark.parametrize("workers", [1, 2], ids=["waitress", "gunicorn"])
def test_tiny_bad_requests_cost_no_memory(
    workers: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Ten-byte bodies must not make the server allocate its body limit (512 MiB for batch).

    Every answer here is a cheap 4xx; the server's memory must not move by more than a few
    dozen MiB, and each answer must come back fast. Both servers: their WSGI input streams
    differ (waitress marks its input terminated, so werkzeug limits reads by the app's
    MAX_CONTENT_LENGTH instead of the request's Content-Length).
    """
    has_workers = supports_workers()
    if workers > 1 and not has_workers:
        pytest.skip("this he-service serve has no --workers")
    server = start_server(tmp_path_factory.mktemp("tiny"), workers=workers if has_workers else None)
    try:
        _send_tiny_requests(server)
    finally:
        server.stop()


def _send_tiny_requests(server: ServedProcess) -> None:
    requests = [
        (f"/v1/models/{BREAST}/predict?plan=batch", {"X-Context-Id": "0" * 64}, 404),
        (f"/v1/models/{BREAST}/predict", {"X-Context-Id": "0" * 64}, 404),
        ("/v1/contexts", {}, 400),
    ] * 2
    answers: list[tuple[int, int, float]] = []

    def send(path: str, headers: dict[str, str], expected: int) -> None:
        response = httpx.post(
            f"{server.url}{path}", content=b"0123456789", headers=headers, timeout=60
        )
        answers.append((response.status_code, expected, response.elapsed.total_seconds()))

    with RssSampler(server.pids, interval=0.02) as rss:
        time.sleep(0.3)
        threads = [threading.Thread(target=send, args=request) for request in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.2)
    baseline = min(total for _, total, _ in rss.samples)
    growth = rss.peak - baseline
    print(
        f"\n{len(requests)} ten-byte requests: server RSS +{growth / 2**20:.0f} MiB at peak; "
        f"slowest answer {max(a[2] for a in answers):.2f} s"
    )
    assert all(status == expected for status, expected, _ in answers), answers
    assert growth < 64 << 20, f"{len(requests)} ten-byte requests took {growth / 2**20:.0f} MiB"
    assert max(seconds for *_, seconds in answers) < 2.0, answers
