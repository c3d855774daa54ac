"""The one table from domain errors to HTTP answers, through the app's own handlers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis
from flask import Flask

from he_service import create_app
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import EvaluationError
from he_service.error_table import ERROR_TABLE, to_service_error
from he_service.memory import MemoryBusy, MemoryLimitExceeded
from he_service.protocol import ProtocolError
from he_service.registry import ModelUnavailable
from he_service.serving import KeysDoNotFit, TooManySamples, WorkerOutOfMemory
from he_service.uploads import (
    StagingFull,
    StagingUnavailable,
    TooManyUploads,
    UploadIncomplete,
    UploadNotFound,
    UploadTooLarge,
)

# (domain error, status, code, extra fields of the JSON error, Retry-After)
CASES: list[tuple[Exception, int, str, dict[str, object], str | None]] = [
    (ProtocolError("bad frames"), 400, "bad_request", {}, None),
    (EvaluationError("wrong level"), 400, "bad_request", {}, None),
    (KeysDoNotFit("other parameters"), 409, "parameter_mismatch", {}, None),
    (
        KeysDoNotFit("lacks steps", missing=[3, 5]),
        409,
        "parameter_mismatch",
        {"missing": [3, 5]},
        None,
    ),
    (TooManySamples(17, 16), 413, "payload_too_large", {"limit": 16}, None),
    (ModelUnavailable("m", ["a"]), 404, "model_not_found", {}, None),
    (ModelUnavailable("m", ["a"], "over the key budget"), 404, "model_not_found", {}, None),
    (UploadNotFound("0" * 32), 404, "upload_not_found", {}, None),
    (UploadIncomplete("lacks parts [1]"), 400, "bad_request", {}, None),
    (UploadTooLarge(61, 60), 413, "payload_too_large", {"limit": 60}, None),
    (TooManyUploads(4, 30), 429, "too_many_requests", {"retry_after": 30}, "30"),
    (StagingFull(1 << 30, 12), 503, "not_ready", {"retry_after": 12}, "12"),
    (StagingUnavailable("Redis is down"), 503, "not_ready", {}, None),
    (StagingUnavailable("Redis is down", 2), 503, "not_ready", {"retry_after": 2}, "2"),
    # Any Redis error a backend let through (its subclasses too): unavailable, never a 500.
    (redis.RedisError("OOM command not allowed"), 503, "not_ready", {"retry_after": 1}, "1"),
    (StagingUnavailable("disk full", retry_after=30), 503, "not_ready", {"retry_after": 30}, "30"),
    (MemoryBusy("this request", 10, 5, 2), 503, "not_ready", {"retry_after": 2}, "2"),
    (
        MemoryLimitExceeded("this request", 10, 5),
        413,
        "payload_too_large",
        {"limit": 5},
        None,
    ),
    (MemoryError(), 503, "not_ready", {"retry_after": 5}, "5"),
    (WorkerOutOfMemory(), 503, "not_ready", {"retry_after": 5}, "5"),
]


@pytest.fixture(scope="module")
def raising_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """An app with one extra route that raises ``CASES[i]``."""
    models = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_MODELS_DIR / "breast-cancer-mlp", Path(models) / "breast-cancer-mlp")
    app = create_app({"models_dir": models, "key_store_dir": tmp_path_factory.mktemp("contexts")})

    def boom(case: int) -> None:
        raise CASES[case][0]

    app.add_url_rule("/boom/<int:case>", view_func=boom)
    return app


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: type(CASES[i][0]).__name__)
def test_each_domain_error_has_its_answer(raising_app: Flask, case: int) -> None:
    _, status, code, extra, retry_after = CASES[case]
    response = raising_app.test_client().get(f"/boom/{case}")
    assert response.status_code == status
    body = response.get_json()["error"]
    assert body["code"] == code
    assert {k: v for k, v in body.items() if k not in ("code", "message")} == extra
    assert body["message"]
    assert response.headers.get("Retry-After") == retry_after


def test_the_table_covers_every_case_and_messages_say_what_happened() -> None:
    assert {type(error) for error, *_ in CASES} == {kind for kind, _ in ERROR_TABLE}
    assert "is not served: over the key budget" in to_service_error(CASES[6][0]).message
    assert "no model named 'm'; served models: a" in to_service_error(CASES[5][0]).message
    with pytest.raises(LookupError):
        to_service_error(ValueError("not a domain error"))
