"""Redis faults are answers: a frozen or dead Redis costs a request about a second at most,
routes that need no Redis never wait for it, and the service recovers by itself.

Each test runs its own redis-server, freezes it (SIGSTOP) or kills it, and restarts it on the
same port; nothing here sleeps to synchronise: it polls with deadlines.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from he_service import create_app
from he_service.auth import hash_token
from he_service.config import DEFAULT_MODELS_DIR
from he_service.redis_link import Breaker, RedisDown, breaker_for
from tests.redis_server import RedisServer

TOKEN = "alice-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTEXT = "/v1/contexts/" + "ab" * 32
UPLOAD_PART = "/v1/uploads/" + "cd" * 16 + "/parts/0"


# --- the breaker alone, on a fake clock ---------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_failures_and_lets_one_trial_through() -> None:
    clock = FakeClock()
    breaker = Breaker("here:1/0", failures=2, reset_seconds=3.0, clock=clock)
    breaker.before()
    breaker.failure()
    assert breaker.state == "closed"  # one failure is not an outage
    breaker.before()
    breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(RedisDown) as down:
        breaker.before()
    assert down.value.retry_after == 3 and "here:1/0" in str(down.value)
    clock.now += 2.5
    with pytest.raises(RedisDown) as down:
        breaker.before()
    assert down.value.retry_after == 1
    clock.now += 0.5
    assert breaker.state == "half-open"
    breaker.before()  # the trial
    with pytest.raises(RedisDown):
        breaker.before()  # only one at a time
    breaker.failure()  # a failed trial opens it again at once
    assert breaker.state == "open"
    clock.now += 3.0
    breaker.before()
    breaker.success()
    assert breaker.state == "closed"
    breaker.before()


def test_success_resets_the_count_of_failures() -> None:
    breaker = Breaker("here:1/0", failures=2, clock=FakeClock())
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.state == "closed"


def test_one_breaker_per_server_and_never_the_password() -> None:
    a = breaker_for("redis://:secret@10.0.0.1:7000/2")
    assert a is breaker_for("redis://:other@10.0.0.1:7000/2")
    assert a is not breaker_for("redis://10.0.0.1:7000/3")
    assert a.where == "10.0.0.1:7000/2"


# --- a served app on a Redis that freezes and dies ----------------------------------------------


@pytest.fixture
def server() -> Iterator[RedisServer]:
    redis_server = RedisServer().start()
    try:
        yield redis_server
    finally:
        redis_server.stop()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_MODELS_DIR / "breast-cancer-mlp", target / "breast-cancer-mlp")
    return target


@pytest.fixture
def app(server: RedisServer, models: Path, tmp_path: Path) -> Flask:
    # With tokens, every route but health charges a Redis rate limit: the hardest case.
    return create_app(
        {
            "models_dir": models,
            "redis_url": server.url,
            "api_tokens": f"alice:{hash_token(TOKEN)}",
            "key_store_dir": tmp_path / "contexts",
        }
    )


def _timed(call: Callable[[], TestResponse]) -> tuple[TestResponse, float]:
    start = time.monotonic()
    response = call()
    return response, time.monotonic() - start


def _until(
    call: Callable[[], TestResponse], ok: Callable[[TestResponse], bool], deadline: float
) -> float:
    """Poll ``call`` until ``ok``; return the seconds it took."""
    start = time.monotonic()
    while True:
        response = call()
        if ok(response):
            return time.monotonic() - start
        if time.monotonic() - start > deadline:
            pytest.fail(f"no recovery within {deadline} s: last answer {response.status_code}")
        time.sleep(0.05)


def _unavailable(response: TestResponse) -> None:
    assert response.status_code == 503, response.get_data(as_text=True)
    if response.get_data():  # a HEAD answer has no body
        assert response.get_json()["error"]["code"] == "not_ready"
    assert int(response.headers["Retry-After"]) >= 1
    assert "Traceback" not in response.get_data(as_text=True)


def _storeless_routes_answer_at_once(http: FlaskClient) -> None:
    for path in ("/v1/models", "/v1/models/breast-cancer-mlp", "/v1/openapi.json"):
        response, seconds = _timed(lambda path=path: http.get(path, headers=AUTH))
        assert response.status_code == 200 and seconds < 0.5, (path, seconds)
    health, seconds = _timed(lambda: http.get("/v1/health"))
    assert health.status_code == 200 and seconds < 0.5
    assert health.get_json()["storage"] == "unavailable"
    assert health.get_json()["status"] == "degraded"


def test_frozen_redis_costs_a_request_a_second_and_the_service_recovers(
    app: Flask, server: RedisServer
) -> None:
    http = app.test_client()
    assert http.head(CONTEXT, headers=AUTH).status_code == 404  # Redis answers
    assert http.get("/v1/health").get_json()["storage"] == "ok"
    server.freeze()
    try:
        # Until the breaker opens, a request waits one socket timeout (1 s), not 30.
        first, seconds = _timed(lambda: http.head(CONTEXT, headers=AUTH))
        assert first.status_code == 503 and seconds < 2.0
        second, seconds = _timed(lambda: http.put(UPLOAD_PART, headers=AUTH, data=b"x"))
        _unavailable(second)
        assert seconds < 2.0
        # Open: every Redis-backed route answers 503 at once, with Retry-After.
        for call in (
            lambda: http.head(CONTEXT, headers=AUTH),
            lambda: http.put(UPLOAD_PART, headers=AUTH, data=b"x"),
            lambda: http.post("/v1/contexts", headers=AUTH, data=b"keys"),
        ):
            response, seconds = _timed(call)
            _unavailable(response)
            assert seconds < 0.5
        _storeless_routes_answer_at_once(http)
    finally:
        server.thaw()
    recovery = _until(
        lambda: http.head(CONTEXT, headers=AUTH), lambda r: r.status_code == 404, 10.0
    )
    assert recovery < 5.0  # the breaker's reset time, then one trial
    assert http.get("/v1/health").get_json()["storage"] == "ok"


def test_dead_redis_answers_503_at_once_and_a_restart_heals(
    app: Flask, server: RedisServer
) -> None:
    http = app.test_client()
    assert http.head(CONTEXT, headers=AUTH).status_code == 404
    server.kill()
    for _ in range(4):  # refused connections: fast even before the breaker opens
        response, seconds = _timed(lambda: http.head(CONTEXT, headers=AUTH))
        _unavailable(response)
        assert seconds < 0.5
    _storeless_routes_answer_at_once(http)
    server.start()
    recovery = _until(
        lambda: http.head(CONTEXT, headers=AUTH), lambda r: r.status_code == 404, 10.0
    )
    assert recovery < 5.0
    assert http.get("/v1/models", headers=AUTH).status_code == 200
