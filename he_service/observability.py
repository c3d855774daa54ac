"""Prometheus metrics, request ids and one structured JSON access-log line per request.

``Metrics`` keeps its own registry, so every app (tests build many) counts on its own. When
``PROMETHEUS_MULTIPROC_DIR`` is set (``he-service serve --workers N`` sets it), the values are
written per process into that directory and merged when ``/metrics`` is rendered, whichever
worker answers the scrape.

The access log never holds a body or a header value other than the request id: no tokens, no
ciphertexts, no context ids (the raw path is replaced by the route template).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TextIO

from flask import Flask, Response, current_app, g, has_request_context, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "MULTIPROC_ENV",
    "REQUEST_ID_HEADER",
    "KeyStoreStats",
    "Metrics",
    "configure_logging",
    "init_app",
]

REQUEST_ID_HEADER = "X-Request-Id"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ACCESS_LOGGER = "he_service.access"

KeyStoreStats = Callable[[], tuple[int, int]]
"""Return ``(entries, bytes)`` of the key store; called at scrape time."""

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")
# Label values a client controls are folded into these, so that nobody can grow the number of
# time series (and the scrape) by inventing methods, paths or model names.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_UNMATCHED = "<unmatched>"
_UNKNOWN = "<unknown>"
_REQUEST_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_EVALUATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ENTRIES = ("he_key_store_entries", "Public contexts held by the key store.")
_BYTES = ("he_key_store_bytes", "Bytes of the public contexts held by the key store.")

log = logging.getLogger(__name__)
access_log = logging.getLogger(ACCESS_LOGGER)


class Metrics:
    """The service's Prometheus metrics, in their own registry or in multiprocess mode.

    Args:
        key_store_stats: returns ``(entries, bytes)`` of the key store; read at scrape time.

    Raises:
        RuntimeError: ``PROMETHEUS_MULTIPROC_DIR`` was set (or unset) after prometheus_client
            was imported, so the library's value storage does not match this process's mode.
    """

    def __init__(self, key_store_stats: KeyStoreStats | None = None) -> None:
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        multiprocess = self.multiprocess_dir is not None
        # prometheus_client picks its value storage once, at import, from the same variable.
        if bool(getattr(values.ValueClass, "_multiprocess", False)) != multiprocess:
            raise RuntimeError(
                f"{MULTIPROC_ENV} must be set (or unset) before prometheus_client is imported"
            )
        # Settable after construction: the app builds its key store and its metrics apart.
        self.key_store_stats = key_store_stats
        self._registry: CollectorRegistry | None = None if multiprocess else CollectorRegistry()
        registry = self._registry
        self.requests = Counter(
            "he_requests_total",
            "HTTP requests answered, by route template, method, status and model.",
            ["route", "method", "status", "model"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "he_request_seconds",
            "Time to answer a request in the app (body transfer excluded).",
            ["route", "model"],
            buckets=_REQUEST_BUCKETS,
            registry=registry,
        )
        self.evaluation_seconds = Histogram(
            "he_evaluation_seconds",
            "Time to evaluate a predict request's ciphertexts.",
            ["model", "plan"],
            buckets=_EVALUATION_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            "he_rejections_total",
            "Error answers (4xx and 5xx), by the JSON error code.",
            ["reason"],
            registry=registry,
        )
        self._gauges: tuple[Gauge, Gauge] | None = None
        if registry is not None:
            registry.register(_KeyStoreCollector(self))
            # Process metrics describe this one process: meaningful only with one process.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        else:
            # Every worker sees the same shared store and refreshes its gauge when it renders
            # a scrape, so the most recent value of a live worker is the current one.
            self._gauges = (
                Gauge(*_ENTRIES, registry=None, multiprocess_mode="livemostrecent"),
                Gauge(*_BYTES, registry=None, multiprocess_mode="livemostrecent"),
            )

    def observe_request(
        self, route: str, method: str, status: int, model: str | None, seconds: float
    ) -> None:
        """Count one answered request and record how long the app took."""
        model = model or ""
        self.requests.labels(route, method, str(status), model).inc()
        self.request_seconds.labels(route, model).observe(seconds)

    def observe_evaluation(self, model: str, plan: str, seconds: float) -> None:
        """Record the evaluation time of one predict request (all its units)."""
        self.evaluation_seconds.labels(model, plan).observe(seconds)

    def observe_rejection(self, reason: str) -> None:
        """Count one error answer by its JSON error code (``bad_request``, ...).

        ``init_app``'s hook counts JSON error answers by itself; a call made while serving a
        request marks it, so that the hook does not count the same answer twice.
        """
        self.rejections.labels(reason).inc()
        if has_request_context():
            g.he_rejection_counted = True

    def key_store_sample(self) -> tuple[int, int] | None:
        """Return ``(entries, bytes)`` from ``key_store_stats``, or None if unset or failing."""
        callback = self.key_store_stats
        if callback is None:
            return None
        try:
            entries, size = callback()
        except Exception:  # a scrape must not fail because the store could not be read
            log.warning("could not read the key store statistics", exc_info=True)
            return None
        return int(entries), int(size)

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text exposition of every metric and its content type."""
        if self._registry is not None:
            return generate_latest(self._registry), CONTENT_TYPE_LATEST
        if self._gauges is not None:
            stats = self.key_store_sample()
            if stats is not None:
                self._gauges[0].set(stats[0])
                self._gauges[1].set(stats[1])
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST


class _KeyStoreCollector(Collector):
    """Reads the key store once per scrape and reports both gauges."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Lets the registry check names without calling the store at registration.
        return [GaugeMetricFamily(*_ENTRIES), GaugeMetricFamily(*_BYTES)]

    def collect(self) -> Iterator[Metric]:
        stats = self._metrics.key_store_sample()
        if stats is not None:
            yield GaugeMetricFamily(*_ENTRIES, value=stats[0])
            yield GaugeMetricFamily(*_BYTES, value=stats[1])


def _request_id(incoming: str | None) -> str:
    """Return the caller's request id if it is safe to log and echo, else a new one."""
    if incoming and _REQUEST_ID.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


def init_app(app: Flask, metrics: Metrics) -> None:
    """Give every request an id, one JSON access-log line and metrics; serve ``GET /metrics``.

    The hooks run first before and last after the app's own hooks, so that they time the
    whole request and see its final answer, errors included. Error answers whose JSON body
    carries ``{"error": {"code": ...}}`` are counted in ``he_rejections_total``.

    Args:
        app: the Flask app (``create_app``'s).
        metrics: where to count; kept in ``app.extensions["he_metrics"]``.

    Raises:
        RuntimeError: ``init_app`` was already called on this app.
    """
    if "he_metrics" in app.extensions:
        raise RuntimeError("init_app was already called on this app")
    app.extensions["he_metrics"] = metrics
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    # after_request functions run in reverse order of registration: first in the list = last.
    app.after_request_funcs.setdefault(None, []).insert(0, _finish)
    app.teardown_request(_teardown)

    def metrics_view() -> Response:
        body, content_type = metrics.render()
        response = Response(body, status=200, content_type=content_type)
        response.headers["Cache-Control"] = "no-store"
        return response

    app.add_url_rule("/metrics", endpoint="metrics", view_func=metrics_view, methods=["GET"])


def _start() -> None:
    g.request_id = _request_id(request.headers.get(REQUEST_ID_HEADER))
    g.he_started = time.perf_counter()


def _finish(response: Response) -> Response:
    if "request_id" not in g:  # an earlier hook failed before ours ran
        g.request_id = _request_id(request.headers.get(REQUEST_ID_HEADER))
    response.headers[REQUEST_ID_HEADER] = g.request_id
    _record(response.status_code, response)
    return response


def _teardown(error: BaseException | None) -> None:
    # Only when an exception escaped every handler (PROPAGATE_EXCEPTIONS): no response to see.
    if error is not None and not g.get("he_recorded"):
        if "request_id" not in g:
            g.request_id = _request_id(request.headers.get(REQUEST_ID_HEADER))
        _record(500, None)


def _record(status: int, response: Response | None) -> None:
    g.he_recorded = True
    started = g.get("he_started")
    seconds = time.perf_counter() - started if started is not None else 0.0
    rule = request.url_rule
    route = rule.rule if rule is not None else _UNMATCHED
    name = (request.view_args or {}).get("name")
    model = name if isinstance(name, str) else None
    plan = request.args.get("plan")
    reason = None
    if status >= 400:
        reason = _error_code(response) if response is not None else "internal_error"
    if access_log.isEnabledFor(logging.INFO):
        _log_access(status, response, seconds, route, model, plan, reason)
    metrics: Metrics | None = current_app.extensions.get("he_metrics")
    if metrics is None:
        return
    method = request.method if request.method in _METHODS else "OTHER"
    metrics.observe_request(route, method, status, _model_label(model), seconds)
    if reason is not None and not g.get("he_rejection_counted"):
        metrics.observe_rejection(reason)


def _log_access(
    status: int,
    response: Response | None,
    seconds: float,
    route: str,
    model: str | None,
    plan: str | None,
    reason: str | None,
) -> None:
    # Only what is safe to keep: no body, no header value but the request id, no raw path.
    access_log.info(
        "request",
        extra={
            "request_id": g.request_id,
            "method": request.method[:16],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "model": model[:128] if model is not None else None,
            "plan": plan[:32] if plan is not None else None,
            "principal": g.get("principal_name"),
            "request_bytes": request.content_length or 0,
            "response_bytes": response.content_length if response is not None else None,
            **({"error_code": reason} if reason else {}),
        },
    )


def _model_label(name: str | None) -> str | None:
    """Return the model name for a label if the app serves that model, else ``<unknown>``."""
    if name is None:
        return None
    state = current_app.extensions.get("he_service")
    if isinstance(state, dict):
        registry = state.get("registry")
    else:
        registry = getattr(state, "registry", None)
    if registry is not None and registry.get(name) is None:
        return _UNKNOWN
    return name


def _error_code(response: Response) -> str | None:
    """Return the ``error.code`` of a JSON error answer, if it has one."""
    if response.is_streamed or not response.is_json:
        return None
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(code, str):
        return None
    return code if _ERROR_CODE.fullmatch(code) else "other"


class _RequestIdFilter(logging.Filter):
    """Adds the current request's id to every record logged while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and has_request_context() and "request_id" in g:
            record.request_id = g.request_id
        return True


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as logging's lastResort)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass  # always the current sys.stderr


def configure_logging(level: str = "INFO") -> None:
    """Send every log record to stderr as one JSON object per line.

    Each line has ``timestamp``, ``level``, ``logger``, ``pid``, ``message`` and the record's
    extra fields (``request_id`` for anything logged while serving a request). Calling it
    again replaces the handler it installed and leaves other handlers alone.

    Args:
        level: a logging level name (``DEBUG``, ``INFO``, ``WARNING``, ...).

    Raises:
        ValueError: an unknown level name.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
    handler = _StderrHandler()
    handler.setFormatter(
        JsonFormatter(
            "{levelname}{name}{process}{message}",
            style="{",
            rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
            timestamp=True,
        )
    )
    handler.addFilter(_RequestIdFilter())
    handler.set_name("he_service.json")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "he_service.json":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
