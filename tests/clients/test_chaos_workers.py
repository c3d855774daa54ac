"""``kill -9`` of the gunicorn worker serving a request: the SDK's retries carry every call.

A real ``he-service serve --workers 2`` runs the breast-cancer model; client threads keep
both workers busy while the test kills (SIGKILL) a worker that is using the CPU, i.e. one in
the middle of a request, and waits for gunicorn to start its replacement. Every prediction and
every upload in parts must succeed with the right class, at least one connection must actually
have dropped under a request (or the test proved nothing), and nothing may be left behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients import HEClient, KeySet, ModelSession, Retry
from clients._release import release
from tests.load_client import (
    BREAST,
    ServedProcess,
    load_samples,
    process_age,
    process_tree,
    start_server,
)

KILLS = 3
SAMPLES_PER_REQUEST = 8


class CountingTransport(httpx.HTTPTransport):
    """Counts requests whose connection failed (what the SDK's retries had to cover)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except httpx.TransportError:
            with self._lock:
                self.dropped += 1
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    served = start_server(tmp_path_factory.mktemp("chaos"), workers=2, models=[BREAST])
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def samples() -> tuple[np.ndarray, np.ndarray]:
    found = load_samples()[BREAST]
    return found.raw, found.expected


def _workers(server: ServedProcess) -> list[int]:
    return [pid for pid in process_tree(server.process.pid) if pid != server.process.pid]


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _kill_a_busy_worker(server: ServedProcess, deadline: float) -> int:
    """SIGKILL a worker that is using the CPU (serving a request); wait for its replacement.

    A worker younger than a few seconds is skipped: its CPU goes to compiling the models.
    """
    while time.monotonic() < deadline:
        workers = _workers(server)
        before = {pid: _cpu_ticks(pid) for pid in workers}
        time.sleep(0.05)
        busy = [pid for pid in workers if _cpu_ticks(pid) > before[pid] and process_age(pid) > 3.0]
        if len(workers) == 2 and busy:
            os.kill(busy[0], signal.SIGKILL)
            break
    else:
        pytest.fail("no busy worker to kill")
    while time.monotonic() < deadline:  # gunicorn forks a new worker in its place
        workers = _workers(server)
        if len(workers) == 2 and busy[0] not in workers:
            return busy[0]
        time.sleep(0.05)
    pytest.fail("gunicorn did not replace the killed worker")


def _client(server: ServedProcess, transport: httpx.BaseTransport) -> HEClient:
    # The replacement worker compiles the model before it answers: allow it the time.
    return HEClient(server.url, transport=transport, retry=Retry(attempts=8, deadline=120.0))


def _in_threads(work: Callable[[int], None], threads: int) -> tuple[list[threading.Thread], list]:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    started = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for thread in started:
        thread.start()
    return started, errors


def _run_with_kills(
    server: ServedProcess, work: Callable[[int], None], done: Callable[[], int], per_kill: int
) -> list[BaseException]:
    """Run ``work`` in two threads; kill a busy worker each time ``per_kill`` more are done."""
    threads, errors = _in_threads(work, 2)
    deadline = time.monotonic() + 150
    for kill in range(KILLS):
        while done() < (kill + 1) * per_kill and not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        if errors:
            break
        _kill_a_busy_worker(server, deadline)
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "client threads hang"
    return errors


def _check_server(server: ServedProcess) -> None:
    assert server.process.poll() is None
    # gunicorn reports each kill as an error line; nothing else may be one.
    errors = [line for line in server.server_errors() if "SIGKILL" not in line]
    assert not errors, errors
    assert httpx.get(f"{server.url}/v1/health", timeout=5).json()["status"] == "ok"


def test_predictions_succeed_while_workers_are_killed(
    server: ServedProcess, samples: tuple[np.ndarray, np.ndarray]
) -> None:
    raw, expected = samples
    transport = CountingTransport()
    rounds, done = 5, [0, 0]
    with _client(server, transport) as client:
        session = client.model(BREAST)

        def work(index: int) -> None:
            rng = np.random.default_rng(index)
            for _ in range(rounds):
                rows = rng.choice(len(raw), SAMPLES_PER_REQUEST)
                outputs = session.predict_many(raw[rows])
                assert (outputs.argmax(axis=1) == expected[rows]).all()
                done[index] += 1

        errors = _run_with_kills(server, work, lambda: sum(done), per_kill=2)
    assert not errors, errors[0]
    assert sum(done) == 2 * rounds
    assert transport.dropped >= 1, "no kill hit a request: the test proved nothing"
    _check_server(server)
    print(
        f"\npredictions: {sum(done)}/{2 * rounds} requests ok, {KILLS} kills, "
        f"{transport.dropped} dropped connections retried"
    )


def test_uploads_in_parts_succeed_while_workers_are_killed(
    server: ServedProcess, samples: tuple[np.ndarray, np.ndarray]
) -> None:
    raw, expected = samples
    transport = CountingTransport()
    rounds, done = 4, [0, 0]
    with _client(server, transport) as client:
        session = client.model(BREAST)
        keys: KeySet = session.keys

        def one_upload(rows: np.ndarray) -> np.ndarray:
            upload = client.create_upload(BREAST, session.context_id)
            for index, row in enumerate(rows):  # one sample per part
                client.upload_part(upload["upload_id"], index, session.encrypt(raw[row]))
            outputs, _ = client.predict_upload(upload["upload_id"])
            return np.stack([_decrypt(session, keys, ct) for ct in outputs])

        def work(index: int) -> None:
            rng = np.random.default_rng(100 + index)
            for _ in range(rounds):
                rows = rng.choice(len(raw), SAMPLES_PER_REQUEST // 2)
                assert (one_upload(rows).argmax(axis=1) == expected[rows]).all()
                done[index] += 1

        errors = _run_with_kills(server, work, lambda: sum(done), per_kill=2)
    assert not errors, errors[0]
    assert sum(done) == 2 * rounds
    assert transport.dropped >= 1, "no kill hit a request: the test proved nothing"
    _check_server(server)
    # Every upload was consumed: nothing staged is left behind.
    staged = server.log.parent / "contexts" / "uploads"
    left = [str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()]
    left = [name for name in left if name != ".lock"]
    assert not left, left
    print(
        f"\nuploads: {sum(done)}/{2 * rounds} ok, {KILLS} kills, "
        f"{transport.dropped} dropped connections retried"
    )


def _decrypt(session: ModelSession, keys: KeySet, ciphertext: bytes) -> np.ndarray:
    spec = session.spec
    return release(keys, [ciphertext], spec.output_decoding, 1, spec.output_precision)[0]
