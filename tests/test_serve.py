"""The real `he-service serve`: gunicorn workers, merged metrics, graceful stop on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clients._release import release
from clients.cli import _free_port
from tests.load_client import process_tree, shipped_subset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="gunicorn runs on POSIX only"),
]
linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")

GRACEFUL_TIMEOUT = 5


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    workers: int

    def access_lines(self) -> list[dict[str, object]]:
        lines = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("logger") == "he_service.access":
                lines.append(record)
        return lines


def _start(tmp_path: Path, workers: int, settings: dict[str, str] | None = None) -> Server:
    port = _free_port()
    log = tmp_path / f"server-{workers}.log"
    env = {
        **os.environ,
        "HE_SERVICE_MODELS_DIR": str(shipped_subset(tmp_path, ["breast-cancer-mlp"])),
        "HE_SERVICE_KEY_STORE_DIR": str(tmp_path / "contexts"),
        "HE_SERVICE_API_TOKENS": "",
        "PYTHONUNBUFFERED": "1",
        **(settings or {}),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "he_service.cli", "serve"),
                *("--port", str(port), "--workers", str(workers), "--threads", "2"),
                *("--graceful-timeout", str(GRACEFUL_TIMEOUT)),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log, workers)
    deadline = time.monotonic() + 180
    try:
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{server.url}/v1/health", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start in 180 s:\n" + log.read_text()
            time.sleep(0.1)
    except BaseException:
        # A server that never became healthy must not outlive the test, workers included.
        for pid in process_tree(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        raise


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = _start(tmp_path_factory.mktemp("serve"), workers=2)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def _children(pid: int) -> set[int]:
    """Return the worker processes of the server (gunicorn's workers have no children)."""
    return set(process_tree(pid)) - {pid}


def _health_burst(url: str, count: int) -> None:
    def one(_: int) -> int:
        # A new connection per request, so that every request is a new accept.
        return httpx.get(f"{url}/v1/health", timeout=10).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert set(pool.map(one, range(count))) == {200}


def _requests_total(url: str, route: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "he_requests"
        for sample in family.samples
        if sample.name == "he_requests_total" and sample.labels.get("route") == route
    )


@linux_only
def test_requests_are_served_by_several_worker_processes(gunicorn_server: Server) -> None:
    workers = _children(gunicorn_server.process.pid)
    assert len(workers) >= 2
    seen: set[int] = set()
    for _ in range(20):  # the kernel picks which worker accepts: ask until both answered
        _health_burst(gunicorn_server.url, 24)
        seen = {int(str(line["pid"])) for line in gunicorn_server.access_lines()}
        if len(seen) >= 2:
            break
    assert len(seen) >= 2, seen
    assert seen <= workers  # only workers serve; the master only supervises


def test_metrics_are_merged_across_workers(gunicorn_server: Server) -> None:
    before = _requests_total(gunicorn_server.url, "/v1/health")
    _health_burst(gunicorn_server.url, 30)
    # Whichever worker renders the scrape counts the requests of all of them.
    for _ in range(4):
        assert _requests_total(gunicorn_server.url, "/v1/health") == before + 30
    text = httpx.get(f"{gunicorn_server.url}/metrics").text
    assert "he_key_store_entries 0.0" in text  # the live gauge of the worker that rendered


def _slow_upload(url: str, gate: threading.Event, result: list[httpx.Response]) -> None:
    def body() -> Iterator[bytes]:
        yield b"\x00" * 1000
        gate.wait(10)  # the server receives SIGTERM while this request is in flight
        yield b"\x00" * 1000

    result.append(
        httpx.post(
            f"{url}/v1/contexts",
            content=body(),
            headers={"Content-Length": "2000", "Content-Type": "application/octet-stream"},
            timeout=20,
        )
    )


def _stop_with_request_in_flight(server: Server) -> None:
    gate = threading.Event()
    result: list[httpx.Response] = []
    upload = threading.Thread(target=_slow_upload, args=(server.url, gate, result))
    upload.start()
    time.sleep(0.5)  # the first half of the body has reached a worker
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    gate.set()
    upload.join(15)
    assert result, "the request in flight got no answer:\n" + server.log.read_text()
    assert result[0].status_code == 400 and result[0].json()["error"]["code"] == "bad_request"
    started = time.monotonic()
    assert server.process.wait(timeout=GRACEFUL_TIMEOUT + 5) == 0, server.log.read_text()
    assert time.monotonic() - started < GRACEFUL_TIMEOUT
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/v1/health", timeout=2)


@linux_only
def test_sigterm_finishes_requests_in_flight_then_exits_cleanly(gunicorn_server: Server) -> None:
    # The last test of the module-scoped server: it stops it.
    # Workers map their metric files from the run's PROMETHEUS_MULTIPROC_DIR.
    worker = min(_children(gunicorn_server.process.pid))
    maps = Path(f"/proc/{worker}/maps").read_text().splitlines()
    metric_files = [Path(line.split()[-1]) for line in maps if line.endswith(".db")]
    assert metric_files, "no metrics file mapped by a worker"
    metrics_dir = metric_files[0].parent
    assert metrics_dir.is_dir()
    _stop_with_request_in_flight(gunicorn_server)
    assert not metrics_dir.exists()  # the per-run metrics directory is cleaned up


def test_waitress_single_process_also_stops_gracefully(tmp_path: Path) -> None:
    server = _start(tmp_path, workers=1)
    try:
        assert httpx.get(f"{server.url}/v1/health").headers["Server"] == "he-service"
        _stop_with_request_in_flight(server)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_uploaded_contexts_survive_a_restart(tmp_path: Path) -> None:
    """Upload through one server process, stop it, start another on the same store."""
    from clients import HEClient

    first = _start(tmp_path, workers=2)
    try:
        with HEClient(first.url) as client:
            session = client.model("breast-cancer-mlp")
            context_id = session.context_id
    finally:
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(timeout=GRACEFUL_TIMEOUT + 10)
    second = _start(tmp_path, workers=1)
    try:
        with HEClient(second.url) as client:
            assert client.has_context(context_id)
            session.client = client  # same keys, new server: predicts without re-uploading
            assert session.predict(np.zeros(30)).shape == (2,)
            assert session.context_id == context_id
    finally:
        second.process.send_signal(signal.SIGTERM)
        second.process.wait(timeout=GRACEFUL_TIMEOUT + 10)


@linux_only
@pytest.mark.parametrize("staging", ["disk", "redis"])
def test_upload_parts_on_several_workers_are_assembled(
    tmp_path: Path, staging: str, request: pytest.FixtureRequest
) -> None:
    """A batch group larger than one body, its parts taken by different worker processes."""
    from clients import HEClient
    from he_service.artifacts import load_artifact
    from he_service.config import DEFAULT_MODELS_DIR
    from he_service.engine import forward_plain
    from he_service.protocol import encode_frames, preprocess
    from models.datasets import load_breast_cancer_split

    # One breast-cancer-mlp group is 30 ciphertexts of about 205 KB: 6 MB, three times a body.
    settings = {
        "HE_SERVICE_MAX_BATCH_BYTES": str(2 << 20),
        "HE_SERVICE_MAX_PART_BYTES": str(1 << 20),
    }
    if staging == "redis":
        settings["HE_SERVICE_REDIS_URL"] = request.getfixturevalue("redis_url")
    server = _start(tmp_path, workers=2, settings=settings)
    try:
        with HEClient(server.url) as client:
            session = client.model("breast-cancer-mlp", plan="batch")
            raw = load_breast_cancer_split(0).x_test[:20]
            artifact = load_artifact(DEFAULT_MODELS_DIR / "breast-cancer-mlp")
            plain = np.stack(
                [forward_plain(artifact, preprocess(x, artifact.preprocessing, (30,))) for x in raw]
            )
            np.testing.assert_allclose(session.predict_many(raw), plain, atol=1e-2)
            group = session.encrypt(raw[0])
            route = "/v1/uploads/<upload_id>/parts/<int:index>"
            workers: set[int] = set()
            for _ in range(10):  # the kernel picks the worker: upload until two took parts
                seen = len(server.access_lines())
                upload_id = client.create_upload(
                    "breast-cancer-mlp", session.context_id, plan="batch"
                )["upload_id"]
                for index, first in enumerate(range(0, 30, 3)):
                    answer = httpx.put(  # a new connection per part
                        f"{server.url}/v1/uploads/{upload_id}/parts/{index}",
                        content=encode_frames(group[first : first + 3]),
                        timeout=30,
                    )
                    assert answer.status_code == 200, answer.text
                outputs, _ = client.predict_upload(upload_id)
                spec = session.spec
                logits = release(
                    session.keys, outputs, spec.output_decoding, 1, spec.output_precision
                )
                # Released outputs are within two steps of the output precision.
                np.testing.assert_allclose(logits[0], plain[0], atol=2 * spec.output_precision)
                lines = server.access_lines()[seen:]
                workers = {int(str(line["pid"])) for line in lines if line["route"] == route}
                if len(workers) >= 2:
                    break
            assert len(workers) >= 2, "every part reached the same worker ten times in a row"
            assert workers <= _children(server.process.pid)
        # Every prediction consumed its upload: nothing stays staged.
        if staging == "disk":
            assert not list((tmp_path / "contexts" / "uploads").glob("*/*"))
        else:
            import redis

            assert not redis.Redis.from_url(settings["HE_SERVICE_REDIS_URL"]).keys("*uploads*")
    finally:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=GRACEFUL_TIMEOUT + 10)
