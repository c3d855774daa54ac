"""The SDK's retries on a mock transport and a fake clock: which failures, how long, how often."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from clients import (
    AuthenticationError,
    HEClient,
    RateLimitedError,
    Retry,
    ServiceUnavailableError,
    TransportError,
)

Handler = Callable[[httpx.Request], httpx.Response]
MODELS = httpx.Response(200, json={"models": [{"name": "m"}], "refused": []})


class FakeTime:
    """A clock that only ``sleep`` moves; records every wait."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def _client(handler: Handler, fake: FakeTime, **policy: float) -> HEClient:
    retry = Retry(
        **policy,  # type: ignore[arg-type]
        sleep=fake.sleep,
        clock=fake.clock,
        rand=lambda low, high: high,  # the largest wait full jitter may pick
    )
    return HEClient("http://svc", transport=httpx.MockTransport(handler), retry=retry)


def _failing(answers: list[httpx.Response | Exception]) -> tuple[Handler, list[httpx.Request]]:
    """A handler that answers (or raises) ``answers`` in turn, then 200."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= len(answers):
            answer = answers[len(seen) - 1]
            if isinstance(answer, Exception):
                raise answer
            return answer
        return MODELS

    return handler, seen


def _unavailable(retry_after: int | None = None) -> httpx.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    body = {"error": {"code": "not_ready", "message": "Redis is down"}}
    return httpx.Response(503, json=body, headers=headers)


def test_dropped_connections_and_503_are_retried_with_capped_exponential_backoff() -> None:
    fake = FakeTime()
    handler, seen = _failing(
        [
            httpx.RemoteProtocolError("Server disconnected without sending a response."),
            httpx.ReadError("connection reset"),
            _unavailable(),
            httpx.ConnectError("refused"),
        ]
    )
    with _client(handler, fake, attempts=6, backoff=0.5, max_backoff=1.5) as client:
        assert client.models() == [{"name": "m"}]
    assert len(seen) == 5
    assert fake.waits == [0.5, 1.0, 1.5, 1.5]  # doubled, capped at max_backoff


def test_waits_are_full_jitter_below_the_cap() -> None:
    policy = Retry(backoff=0.5, max_backoff=4.0)
    for retry in range(1, 8):
        bound = min(4.0, 0.5 * 2 ** (retry - 1))
        assert all(0.0 <= policy.wait(retry, None) <= bound for _ in range(50))


def test_retry_after_is_honoured_for_429_and_503() -> None:
    fake = FakeTime()
    limited = httpx.Response(
        429,
        json={"error": {"code": "too_many_requests", "message": "slow down"}},
        headers={"Retry-After": "7"},
    )
    handler, seen = _failing([limited, _unavailable(retry_after=3)])
    with _client(handler, fake, attempts=5, backoff=0.1) as client:
        assert client.models()
    assert fake.waits == [7.0, 3.0] and len(seen) == 3


def test_the_deadline_bounds_the_call_and_the_error_says_what_failed() -> None:
    fake = FakeTime()
    handler, seen = _failing([_unavailable()] * 100)
    with _client(handler, fake, attempts=100, deadline=5.0, backoff=1.0, max_backoff=2.0) as c:
        with pytest.raises(ServiceUnavailableError) as failed:
            c.models()
    # Waits of 1, 2, 2 end at 5 s: the third would end past the deadline, so it is not started.
    assert fake.waits == [1.0, 2.0]
    assert len(seen) == 3 and fake.now < 5.0
    message = str(failed.value)
    assert "GET /v1/models" in message and "gave up after 3 attempts" in message
    assert failed.value.details["attempts"] == 3 and failed.value.status == 503


def test_a_retry_after_beyond_the_deadline_fails_at_once() -> None:
    fake = FakeTime()
    handler, seen = _failing([_unavailable(retry_after=600)])
    with _client(handler, fake, deadline=60.0) as client, pytest.raises(ServiceUnavailableError):
        client.models()
    assert len(seen) == 1 and fake.waits == []


def test_each_try_gets_only_the_time_that_is_left() -> None:
    fake = FakeTime()
    timeouts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions["timeout"]["read"])
        return _unavailable() if len(timeouts) < 3 else MODELS

    client = HEClient(
        "http://svc",
        timeout=100.0,
        transport=httpx.MockTransport(handler),
        retry=Retry(
            deadline=10.0,
            backoff=2.0,
            sleep=fake.sleep,
            clock=fake.clock,
            rand=lambda low, high: high,
        ),
    )
    with client:
        client.models()
    assert timeouts == [10.0, 8.0, 4.0]


def test_attempts_bound_the_tries() -> None:
    fake = FakeTime()
    handler, seen = _failing([httpx.ReadError("reset")] * 10)
    with _client(handler, fake, attempts=3) as client, pytest.raises(TransportError) as failed:
        client.health()
    assert len(seen) == 3 and "gave up after 3 attempts" in str(failed.value)
    assert isinstance(failed.value.__cause__, TransportError)


def test_retries_can_be_turned_off() -> None:
    handler, seen = _failing([httpx.RemoteProtocolError("Server disconnected")])
    client = HEClient("http://svc", transport=httpx.MockTransport(handler), retry=None)
    with client, pytest.raises(TransportError, match="Server disconnected"):
        client.models()
    assert len(seen) == 1


def test_other_errors_are_not_retried() -> None:
    fake = FakeTime()
    unauthorized = httpx.Response(401, json={"error": {"code": "unauthorized", "message": "no"}})
    handler, seen = _failing([unauthorized])
    with _client(handler, fake) as client, pytest.raises(AuthenticationError):
        client.models()
    assert len(seen) == 1 and fake.waits == []


def test_a_call_that_is_not_idempotent_is_retried_only_when_nothing_was_sent() -> None:
    fake = FakeTime()
    created = httpx.Response(201, json={"upload_id": "u" * 32})

    def answers(first: Exception | httpx.Response) -> tuple[Handler, list[httpx.Request]]:
        seen: list[httpx.Request] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            if len(seen) == 1:
                if isinstance(first, Exception):
                    raise first
                return first
            return created

        return handler, seen

    # Refused before sending, or a 503 answered before any work: retried.
    for first in (httpx.ConnectError("refused"), _unavailable()):
        handler, seen = answers(first)
        with _client(handler, fake) as client:
            assert client.create_upload("m", "a" * 64)["upload_id"]
        assert len(seen) == 2
    # Dropped after sending: the server may have opened the upload; not repeated.
    handler, seen = answers(httpx.RemoteProtocolError("Server disconnected"))
    with _client(handler, fake) as client, pytest.raises(TransportError):
        client.create_upload("m", "a" * 64)
    assert len(seen) == 1


def test_idempotent_writes_are_retried_after_a_drop() -> None:
    fake = FakeTime()
    drop = httpx.RemoteProtocolError("Server disconnected")
    stored = httpx.Response(200, json={"context_id": "c" * 64, "expires_at": "x"})
    part = httpx.Response(200, json={"parts": 1})
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if seen.count(request.url.path) == 1:
            raise drop
        return stored if request.url.path == "/v1/contexts" else part

    with _client(handler, fake) as client:
        assert client.upload_context(b"keys") == "c" * 64
        assert client.upload_part("u" * 32, 0, [b"ct"]) == {"parts": 1}
    assert len(seen) == 4


def test_rate_limited_error_still_reports_retry_after_without_retries() -> None:
    limited = httpx.Response(
        429, json={"error": {"code": "too_many_requests", "message": "slow", "retry_after": 9}}
    )
    handler, _ = _failing([limited])
    client = HEClient("http://svc", transport=httpx.MockTransport(handler), retry=None)
    with client, pytest.raises(RateLimitedError) as over:
        client.models()
    assert over.value.retry_after == 9


def test_a_head_404_is_an_answer_and_a_head_503_is_retried() -> None:
    fake = FakeTime()
    answers = iter([httpx.Response(503), httpx.Response(404)])
    client = _client(lambda request: next(answers), fake)
    with client:
        assert client.has_context("a" * 64) is False
    assert len(fake.waits) == 1


def test_policy_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Retry(attempts=0)
    with pytest.raises(ValueError, match="deadline"):
        Retry(deadline=0)


def test_several_base_urls_fail_over_to_the_next_instance() -> None:
    fake = FakeTime()
    seen: list[str] = []
    down = {"a"}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host in down:
            raise httpx.ConnectError("refused")
        if request.url.host == "b" and len(seen) == 4:
            return _unavailable()  # b's Redis link is down for one call: on to c
        return MODELS

    retry = Retry(attempts=3, sleep=fake.sleep, clock=fake.clock, rand=lambda low, high: high)
    urls = ["http://a", "http://b", "http://c"]
    with HEClient(urls, transport=httpx.MockTransport(handler), retry=retry) as client:
        assert client.base_url == "http://a"
        assert client.models() and client.models()  # a refuses: b answers, and keeps answering
        assert client.base_url == "http://b"
        assert client.models()
        assert client.base_url == "http://c"
    assert seen == ["a", "b", "b", "b", "c"]
    with pytest.raises(ValueError, match="at least one base URL"):
        HEClient([])
