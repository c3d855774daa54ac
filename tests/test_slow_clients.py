"""Slow and hostile clients against the real `he-service serve`, in both serving modes (issue 11).

Each mode runs once for the module (breast-cancer-mlp only, API tokens on, --read-timeout 3):
slow sockets while the SDK predicts, bodies over their route's limit, early answers on a
keep-alive connection, random requests, and the memory a body costs.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients import HEClient, NotFoundError
from tests.front_attack import (
    MODEL,
    TOKEN,
    Served,
    SlowSockets,
    p99,
    push_body,
    random_requests,
    serve,
)

pytestmark = [pytest.mark.slow]
MIB = 1 << 20


@pytest.fixture(scope="module", params=[1, 2], ids=["waitress-1", "gunicorn-2"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("front"), request.param, "--read-timeout", "3") as running:
        yield running


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory, served: Served) -> Path:
    path = tmp_path_factory.getbasetemp() / "front-keys.bin"
    if not path.exists():
        with HEClient(served.url, token=TOKEN) as client:
            client.model(MODEL).save_keys(path)
    return path


def _head(path: str, length: int, *, token: str = TOKEN, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_slow_sockets_do_not_slow_predictions(served: Served, keys_file: Path) -> None:
    with HEClient(served.url, token=TOKEN) as client:
        session = client.model(MODEL, keys=keys_file)
        # The features' mean: an input like the calibration data (no out-of-range warning).
        x = np.asarray(session.card.preprocessing["mean"])
        expected = session.predict(x)
        # Released outputs are rounded to the plan's precision after fresh flooding noise, so
        # two answers to the same input may differ by a step.
        step = session.spec.output_precision

        def timed(count: int) -> list[float]:
            seconds = []
            for _ in range(count):
                start = time.perf_counter()
                np.testing.assert_allclose(session.predict(x), expected, atol=2 * step)
                seconds.append(time.perf_counter() - start)
            return seconds

        unloaded = timed(12)
        with SlowSockets(served.port, 200) as slow:
            loaded = timed(12)
            # Headers trickled for longer than --read-timeout were closed (and reopened).
            deadline = time.monotonic() + 10
            while slow.closed_by_server < 100 and time.monotonic() < deadline:
                time.sleep(0.1)
        assert slow.connections >= 200
        assert slow.closed_by_server >= 100
    assert p99(loaded) <= 3 * p99(unloaded), (unloaded, loaded)


def test_declared_oversize_length_is_answered_at_once(served: Served) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(_head(f"/v1/models/{MODEL}/predict", 17 * MIB))
        answer = sock.recv(65536)
        elapsed = time.monotonic() - start
        while chunk := sock.recv(65536):  # the server closes after the answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"Connection: close" in answer
    assert b'"payload_too_large"' in answer and b"16777216" in answer
    assert elapsed < 1


def test_a_400_mib_body_is_refused_after_a_few_mib(served: Served) -> None:
    head = _head(f"/v1/models/{MODEL}/predict", 400 * MIB)
    accepted, answer = push_body(served.port, head, 400 * MIB)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert accepted < 8 * MIB  # the kernel's socket buffers, and the lingering drain


def test_a_chunked_body_is_cut_off_at_the_route_limit(served: Served) -> None:
    head = (
        f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    accepted, answer = push_body(served.port, head, 100 * MIB, chunked=True)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert accepted < 16 * MIB + 8 * MIB


def test_an_unauthenticated_body_is_not_received(served: Served) -> None:
    head = _head("/v1/contexts", 100 * MIB, token="wrong-token-0123456789abcdef")
    accepted, answer = push_body(served.port, head, 100 * MIB)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert accepted < 8 * MIB


def test_keep_alive_survives_early_answers(served: Served, keys_file: Path) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    small = b"\0" * 3000
    early = [
        (
            "POST",
            f"/v1/models/{MODEL}/predict",
            {"Authorization": "Bearer nope-nope-nope"},
            small,
            401,
        ),
        ("POST", "/v1/models/nope/predict", auth, small, 404),
        ("GET", f"/v1/models/{MODEL}/predict", auth, b"", 405),
        ("POST", f"/v1/models/{MODEL}/predict", auth, small, 400),  # no context id
        ("DELETE", "/v1/contexts/" + "0" * 64, auth, b"", 404),
    ]
    connection.connect()
    sock = connection.sock
    for method, path, headers, body, status in early:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == status, (method, path)
        assert response.getheader("Connection") is None
        connection.request("GET", "/v1/health")
        follow = connection.getresponse()
        follow.read()
        assert follow.status == 200
        assert connection.sock is sock  # the same connection throughout
    # The SDK after early answers on its pooled connections: no "Server disconnected".
    with HEClient(served.url, token=TOKEN) as client:
        session = client.model(MODEL, keys=keys_file)
        for _ in range(3):
            with pytest.raises(NotFoundError):
                client.model("nope")
            assert session.predict(np.asarray(session.card.preprocessing["mean"])).shape == (2,)


def test_random_requests_drop_no_connection_and_get_no_5xx(served: Served) -> None:
    outcome = random_requests(served.url, 1000, seed=11)
    assert sum(outcome.values()) == 1000
    dropped = {key: n for key, n in outcome.items() if key.startswith("dropped")}
    assert not dropped and not outcome["5xx"], outcome
    assert outcome["413"] and outcome["401"]  # both refusals before the body were exercised


def _rss_processes(served: Served) -> list[int]:
    if served.process.pid is None:
        return []
    children = Path(f"/proc/{served.process.pid}/task/{served.process.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return pids or [served.process.pid]


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads /proc")
def test_memory_per_request_stays_under_twice_its_body(served: Served) -> None:
    body = 12 * MIB
    pids = _rss_processes(served)
    for attempt in range(2 * len(pids)):  # each worker may be the one that takes it
        before = {}
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak (VmHWM)
            before[pid] = _status(pid, "VmRSS")
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        connection.request(
            "POST",
            f"/v1/models/{MODEL}/predict",
            body=b"\x01" * body,
            headers={"Authorization": f"Bearer {TOKEN}", "X-Context-Id": "0" * 64},
        )
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status in (400, 404), response.status
        growth = max(_status(pid, "VmHWM") - before[pid] for pid in pids)
        assert growth < 2 * body, (attempt, growth)
