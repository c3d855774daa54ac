"""API tokens and quotas over HTTP: scoping of contexts, 401, 429 with Retry-After."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from flask import Flask

from clients import AuthenticationError, ContextNotFoundError, HEClient, RateLimitedError
from he_service import create_app
from he_service.auth import UNAUTHORIZED_MESSAGE, hash_token

ALICE, BOB = "alice-token-0123456789", "bob-token-9876543210"


def _app(tmp_path: Path, **overrides: object) -> Flask:
    tokens = f"alice:{hash_token(ALICE)},bob:{hash_token(BOB)}"
    return create_app({"api_tokens": tokens, "key_store_dir": tmp_path / "contexts", **overrides})


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return _app(tmp_path_factory.mktemp("auth"))


def _client(app: Flask, token: str | None) -> HEClient:
    # No retries: these tests look at the answers themselves (a 429 would be waited out).
    transport = httpx.WSGITransport(app=app)
    return HEClient("http://testserver", transport=transport, token=token, retry=None)


@pytest.fixture(scope="module")
def alice(app: Flask) -> Iterator[HEClient]:
    with _client(app, ALICE) as client:
        yield client


def test_health_is_open_and_everything_else_needs_a_token(app: Flask) -> None:
    with _client(app, None) as anonymous:
        assert anonymous.health()["status"] == "ok"
        with pytest.raises(AuthenticationError) as missing:
            anonymous.models()
    with _client(app, "not-a-known-token") as stranger:
        with pytest.raises(AuthenticationError) as wrong:
            stranger.card("breast-cancer-mlp")
    assert missing.value.status == wrong.value.status == 401
    assert str(missing.value) == str(wrong.value)  # one answer, whatever was wrong
    answer = app.test_client().get("/metrics")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # The v2 probes are open too; the v2 model routes answer 401 in the protocol's format.
    web = app.test_client()
    assert web.get("/v2/health/live").status_code == web.get("/v2/health/ready").status_code == 200
    for answer in (web.get("/v2/models/breast-cancer-mlp"), web.post("/v2/models/x/infer")):
        assert answer.status_code == 401
        assert answer.get_json() == {"error": UNAUTHORIZED_MESSAGE}


def test_a_token_cannot_see_or_use_another_tokens_context(app: Flask, alice: HEClient) -> None:
    session = alice.model("breast-cancer-mlp")
    x = np.zeros(30)
    assert session.predict(x).shape == (2,)
    with _client(app, BOB) as bob:
        assert not bob.has_context(session.context_id)
        with pytest.raises(ContextNotFoundError):
            bob.predict_raw("breast-cancer-mlp", session.context_id, session.encrypt(x))
        with pytest.raises(ContextNotFoundError):
            bob.delete_context(session.context_id)
        # Bob uploading the same public keys gets his own entry; Alice's stays hers.
        assert bob.upload_context(session.public_context()) == session.context_id
        bob.delete_context(session.context_id)
    assert alice.has_context(session.context_id)


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    app = _app(tmp_path, rate_limit_per_minute=3)
    with _client(app, ALICE) as client:
        for _ in range(3):
            client.models()
        with pytest.raises(RateLimitedError) as over:
            client.models()
        assert over.value.status == 429 and 1 <= (over.value.retry_after or 0) <= 60
        answer = app.test_client().get("/v1/models", headers={"Authorization": f"Bearer {ALICE}"})
        assert answer.status_code == 429 and int(answer.headers["Retry-After"]) >= 1
    with _client(app, BOB) as bob:  # quotas are per token
        assert bob.models()


def test_sample_budget_stops_extraction_and_a_refusal_costs_nothing(tmp_path: Path) -> None:
    app = _app(tmp_path, sample_budget=3, sample_budget_seconds=3600)
    with _client(app, ALICE) as client:
        session = client.model("breast-cancer-mlp")
        session.predict_many(np.zeros((2, 30)))
        with pytest.raises(RateLimitedError, match="budget") as over:
            session.predict_many(np.zeros((2, 30)))  # 4 > 3: refused, nothing charged
        assert over.value.retry_after and over.value.retry_after > 3000
        assert session.predict(np.zeros(30)).shape == (2,)  # the third sample still fits
