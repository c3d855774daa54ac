"""Request ids, the JSON access log and the Prometheus metrics, in-process."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask, g, request
from prometheus_client.parser import text_string_to_metric_families

from he_service import create_app
from he_service.observability import MULTIPROC_ENV, Metrics, configure_logging, init_app

HEX_ID = re.compile(r"[0-9a-f]{32}")
CONTEXT_ID = "ab" * 32
SECRET_TOKEN = "secret-token-d41d8cd98f00b204"
SECRET_BODY = b"CIPHERTEXT-BYTES-0f343b0931126a20"

JsonLines = Callable[[], list[dict[str, object]]]


@pytest.fixture(scope="module")
def obs_app() -> Flask:
    app = create_app({"key_store_max_bytes": 1 << 30})
    if "he_metrics" not in app.extensions:  # create_app may already have wired it
        init_app(app, Metrics())

    @app.before_request
    def principal() -> None:  # stands for the auth hook, which names the caller
        if "X-Test-Principal" in request.headers:
            g.principal_name = request.headers["X-Test-Principal"]

    @app.get("/test/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    return app


@pytest.fixture
def json_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[JsonLines]:
    """Install the JSON logging of the CLI and return a reader of the lines written since."""
    root = logging.getLogger()
    level = root.level
    configure_logging("INFO")
    seen: list[dict[str, object]] = []

    def read() -> list[dict[str, object]]:
        err = capsys.readouterr().err
        assert SECRET_TOKEN not in err and SECRET_BODY.decode() not in err and CONTEXT_ID not in err
        seen.extend(json.loads(line) for line in err.splitlines() if line.startswith("{"))
        return seen

    try:
        yield read
    finally:
        for handler in list(root.handlers):
            if handler.get_name() == "he_service.json":
                root.removeHandler(handler)
        root.setLevel(level)


def _access(lines: list[dict[str, object]], request_id: str) -> dict[str, object]:
    found = [
        line
        for line in lines
        if line.get("logger") == "he_service.access" and line.get("request_id") == request_id
    ]
    assert len(found) == 1, lines  # exactly one line per request
    return found[0]


def _value(app: Flask, metric: str, **labels: str) -> float:
    text = app.test_client().get("/metrics").get_data(as_text=True)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items())
    )


# -- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("incoming", ["abc-DEF_1.2", "x" * 64, "0"])
def test_a_well_formed_request_id_is_echoed(obs_app: Flask, incoming: str) -> None:
    response = obs_app.test_client().get("/v1/health", headers={"X-Request-Id": incoming})
    assert response.headers["X-Request-Id"] == incoming


def test_a_request_id_is_generated_when_absent(obs_app: Flask) -> None:
    client = obs_app.test_client()
    first = client.get("/v1/health").headers["X-Request-Id"]
    second = client.get("/v1/health").headers["X-Request-Id"]
    assert HEX_ID.fullmatch(first) and HEX_ID.fullmatch(second) and first != second


@pytest.mark.parametrize(
    "incoming", ["", "has space", "x" * 65, "semi;colon", "<script>", "é", "a/b", "line\tbreak"]
)
def test_an_unsafe_request_id_is_replaced(obs_app: Flask, incoming: str) -> None:
    response = obs_app.test_client().get("/v1/health", headers={"X-Request-Id": incoming})
    assert HEX_ID.fullmatch(response.headers["X-Request-Id"])


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/route", 404),
        ("GET", "/v1/models/no-such-model", 404),
        ("DELETE", "/v1/health", 405),
        ("GET", "/test/boom", 500),
    ],
)
def test_error_answers_carry_the_request_id(
    obs_app: Flask, method: str, path: str, status: int
) -> None:
    response = obs_app.test_client().open(path, method=method, headers={"X-Request-Id": "err-1"})
    assert response.status_code == status
    assert response.headers["X-Request-Id"] == "err-1"
    assert "error" in response.get_json()


# -- access log -------------------------------------------------------------------------------


def test_one_json_access_line_per_request_without_secrets(
    obs_app: Flask, json_lines: JsonLines
) -> None:
    response = obs_app.test_client().post(
        "/v1/models/mnist-cnn/predict?plan=latency",
        data=SECRET_BODY,
        headers={
            "Authorization": f"Bearer {SECRET_TOKEN}",
            "X-Context-Id": CONTEXT_ID,
            "X-Request-Id": "access-1",
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 404  # no such context: the body was read, then refused
    line = _access(json_lines(), "access-1")
    assert line["level"] == "INFO" and line["message"] == "request"
    assert isinstance(line["timestamp"], str) and line["pid"] == os.getpid()
    assert line["method"] == "POST"
    assert line["route"] == "/v1/models/<name>/predict"  # the template, never the raw path
    assert line["status"] == 404 and line["error_code"] == "context_not_found"
    assert line["model"] == "mnist-cnn" and line["plan"] == "latency"
    assert line["request_bytes"] == len(SECRET_BODY)
    assert line["response_bytes"] == len(response.data)
    assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 10_000
    # No header value but the request id: neither the token nor the context id.
    assert SECRET_TOKEN not in json.dumps(line) and CONTEXT_ID not in json.dumps(line)


def test_access_line_names_the_principal_and_hides_raw_paths(
    obs_app: Flask, json_lines: JsonLines
) -> None:
    client = obs_app.test_client()
    client.get("/v1/models", headers={"X-Request-Id": "who-1", "X-Test-Principal": "alice"})
    client.head(f"/v1/contexts/{CONTEXT_ID}", headers={"X-Request-Id": "head-1"})
    client.get(f"/nothing/{CONTEXT_ID}", headers={"X-Request-Id": "lost-1"})
    lines = json_lines()
    listed = _access(lines, "who-1")
    assert listed["principal"] == "alice" and listed["route"] == "/v1/models"
    assert listed["model"] is None and listed["plan"] is None and listed["status"] == 200
    head = _access(lines, "head-1")
    assert head["route"] == "/v1/contexts/<context_id>" and head["method"] == "HEAD"
    assert head["status"] == 404 and "error_code" not in head  # a lookup, not a rejection
    assert _access(lines, "lost-1")["route"] == "<unmatched>"


def test_records_logged_while_serving_carry_the_request_id(
    obs_app: Flask, json_lines: JsonLines
) -> None:
    obs_app.test_client().get("/test/boom", headers={"X-Request-Id": "boom-1"})
    lines = json_lines()
    crash = [line for line in lines if line["level"] == "ERROR"]
    assert crash and crash[0]["request_id"] == "boom-1"
    assert _access(lines, "boom-1")["status"] == 500


def test_configure_logging_is_idempotent_and_checks_the_level() -> None:
    root = logging.getLogger()
    level = root.level
    try:
        configure_logging("warning")
        configure_logging("DEBUG")
        ours = [h for h in root.handlers if h.get_name() == "he_service.json"]
        assert len(ours) == 1 and root.level == logging.DEBUG
        with pytest.raises(ValueError, match="log level"):
            configure_logging("LOUD")
    finally:
        for handler in list(root.handlers):
            if handler.get_name() == "he_service.json":
                root.removeHandler(handler)
        root.setLevel(level)


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_exposes_every_metric(obs_app: Flask) -> None:
    response = obs_app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    for name in (
        "he_requests_total",
        "he_request_seconds",
        "he_evaluation_seconds",
        "he_rejections_total",
        "he_key_store_entries",
        "he_key_store_bytes",
    ):
        assert f"# TYPE {name} " in text, name


def test_metrics_count_requests(obs_app: Flask) -> None:
    labels = {"route": "/v1/health", "method": "GET", "status": "200", "model": ""}
    before = _value(obs_app, "he_requests_total", **labels)
    latency_before = _value(obs_app, "he_request_seconds_count", route="/v1/health")
    for _ in range(3):
        obs_app.test_client().get("/v1/health")
    assert _value(obs_app, "he_requests_total", **labels) == before + 3
    assert _value(obs_app, "he_request_seconds_count", route="/v1/health") == latency_before + 3


def test_metrics_count_a_rejection_once(obs_app: Flask) -> None:
    before = _value(obs_app, "he_rejections_total", reason="model_not_found")
    unknown = _value(obs_app, "he_requests_total", route="/v1/models/<name>", model="<unknown>")
    assert obs_app.test_client().get("/v1/models/no-such-model-7f3a").status_code == 404
    assert _value(obs_app, "he_rejections_total", reason="model_not_found") == before + 1
    # A name nobody serves is folded into one label value: no series per made-up name.
    after = _value(obs_app, "he_requests_total", route="/v1/models/<name>", model="<unknown>")
    assert after == unknown + 1
    assert "no-such-model-7f3a" not in obs_app.test_client().get("/metrics").get_data(as_text=True)


def test_metrics_fold_unknown_methods_and_routes(obs_app: Flask) -> None:
    client = obs_app.test_client()
    other = _value(obs_app, "he_requests_total", method="OTHER", status="405")
    unmatched = _value(obs_app, "he_requests_total", route="<unmatched>", status="404")
    assert client.open("/v1/health", method="BREW").status_code == 405
    assert client.get("/made/up/path-91c2").status_code == 404
    assert _value(obs_app, "he_requests_total", method="OTHER", status="405") == other + 1
    assert _value(obs_app, "he_requests_total", route="<unmatched>", status="404") == unmatched + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert "BREW" not in text and "path-91c2" not in text


def test_a_rejection_reported_by_the_app_is_not_counted_again() -> None:
    app = Flask(__name__)
    metrics = Metrics()
    init_app(app, metrics)

    @app.get("/refuse")
    def refuse() -> tuple[dict[str, object], int]:
        metrics.observe_rejection("too_many_requests")  # as an error handler may do
        return {"error": {"code": "too_many_requests", "message": "slow down"}}, 429

    @app.get("/refuse-silently")
    def refuse_silently() -> tuple[dict[str, object], int]:
        return {"error": {"code": "too_many_requests", "message": "slow down"}}, 429

    client = app.test_client()
    client.get("/refuse")
    client.get("/refuse-silently")
    assert _value(app, "he_rejections_total", reason="too_many_requests") == 2


def test_evaluation_histogram_spans_10_ms_to_60_s() -> None:
    metrics = Metrics()
    metrics.observe_evaluation("mnist-cnn", "latency", 0.02)
    text = metrics.render()[0].decode()
    buckets = {
        sample.labels["le"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "he_evaluation_seconds_bucket"
    }
    bounds = sorted(float(le) for le in buckets)
    assert bounds[0] == 0.01 and bounds[-2] == 60.0 and bounds[-1] == float("inf")
    assert buckets["0.01"] == 0 and buckets["0.025"] == 1 and buckets["+Inf"] == 1


def test_key_store_gauges_are_read_at_scrape_time() -> None:
    stats = [(1, 100)]
    metrics = Metrics(lambda: stats[-1])
    assert "he_key_store_entries 1.0" in metrics.render()[0].decode()
    stats.append((2, 3_500_000))
    text = metrics.render()[0].decode()
    assert "he_key_store_entries 2.0" in text and "he_key_store_bytes 3.5e+06" in text

    def broken() -> tuple[int, int]:
        raise OSError("store unreachable")

    metrics.key_store_stats = broken  # settable after construction
    text = metrics.render()[0].decode()  # the scrape still answers, without the gauges
    assert "he_requests_total" in text and "he_key_store_entries 2.0" not in text


def test_each_metrics_object_counts_on_its_own() -> None:
    first, second = Metrics(), Metrics()
    first.observe_rejection("bad_request")
    assert b'he_rejections_total{reason="bad_request"} 1.0' in first.render()[0]
    assert b"bad_request" not in second.render()[0]


def test_multiprocess_mode_must_be_chosen_before_import(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
        Metrics()


_WORKER = """
import sys
from he_service.observability import Metrics
metrics = Metrics(lambda: (int(sys.argv[2]), 10 * int(sys.argv[2])))
if sys.argv[1] == "serve":
    metrics.observe_request("/v1/health", "GET", 200, None, 0.01)
    metrics.observe_rejection("bad_request")
    metrics.render()  # a scrape answered by this worker refreshes the gauges
else:
    sys.stdout.write(metrics.render()[0].decode())
"""


def test_multiprocess_mode_merges_the_processes(tmp_path: Path) -> None:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}

    def run(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", _WORKER, *args], env=env, capture_output=True, text=True,
            check=True,
        ).stdout  # fmt: skip

    run("serve", "1")
    run("serve", "2")
    text = run("render", "3")  # a third process answers the scrape
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["he_requests"].samples if s.name == "he_requests_total"]
    assert sum(s.value for s in requests) == 2
    assert families["he_rejections"].samples[0].value == 2
    # The gauge is the scraping process's fresh reading of the shared store.
    assert [s.value for s in families["he_key_store_entries"].samples] == [3]
