"""The Flask application factory and the HTTP API v1 routes."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import tenseal.sealapi as seal
from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from he_service import __version__
from he_service.auth import ANONYMOUS, TokenTable
from he_service.config import Config
from he_service.engine import EvaluationError, Timings
from he_service.errors import (
    BadRequest,
    ContextNotFound,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    ParameterMismatch,
    PayloadTooLarge,
    RouteNotFound,
    ServiceError,
    TooManyRequests,
    Unauthorized,
)
from he_service.keystore import KeyStore
from he_service.observability import Metrics, init_app
from he_service.openapi import openapi_document
from he_service.protocol import (
    CONTEXT_HEADER,
    MEDIA_TYPE,
    ProtocolError,
    decode_frames,
    encode_frames,
    load_seal,
    save_seal,
)
from he_service.quotas import Quotas
from he_service.registry import LoadedModel, ModelRegistry

__all__ = ["create_app"]

log = logging.getLogger(__name__)
_CONTEXT_ID = re.compile(r"^[0-9a-f]{64}$")
_READ_CHUNK = 1 << 20


def create_app(config: Config | Mapping[str, Any] | None = None) -> Flask:
    """Build the service: load and compile every model, then register the routes.

    Args:
        config: a ``Config``, or a mapping of overrides on top of defaults and env vars.

    Returns:
        The WSGI application.

    Raises:
        RegistryError: the models directory holds no servable artifact.
    """
    if not isinstance(config, Config):
        config = Config.load(config)
    registry = ModelRegistry.from_directory(
        config.models_dir,
        max_samples={
            "latency": config.max_samples("latency"),
            "batch": config.max_samples("batch"),
        },
    )
    tokens = TokenTable.parse(config.api_tokens)
    service = _Service(
        config=config,
        registry=registry,
        store=KeyStore.from_config(config, accepts=registry.accepts),
        tokens=tokens,
        # Quotas are per token: the tokenless quick start has no principal to charge.
        quotas=(
            Quotas.from_config(config, state_dir=config.key_store_dir.parent)
            if tokens.enabled
            else None
        ),
        metrics=Metrics(),
    )
    service.metrics.key_store_stats = service.store.stats
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max(
        config.max_context_bytes, config.max_predict_bytes, config.max_batch_bytes
    )
    app.extensions["he_service"] = service
    init_app(app, service.metrics)
    app.before_request(_authenticate)
    _register_routes(app)
    _register_errors(app)
    return app


@dataclass(frozen=True)
class _Service:
    """Everything a request handler needs, built once per app."""

    config: Config
    registry: ModelRegistry
    store: KeyStore
    tokens: TokenTable
    quotas: Quotas | None  # None when API tokens are off
    metrics: Metrics


def _service() -> _Service:
    service: _Service = current_app.extensions["he_service"]
    return service


def _authenticate() -> None:
    """Resolve the caller's token (every route but health) and charge one request to it."""
    if request.path == "/v1/health":
        g.principal_name = ANONYMOUS.name
        return
    service = _service()
    principal = service.tokens.authenticate(request.headers.get("Authorization"))
    g.principal_name = principal.name
    if service.quotas is not None:
        service.quotas.check_request(principal.name)


def _owner() -> str:
    return str(g.get("principal_name", ANONYMOUS.name))


def _read_body(limit: int, what: str) -> bytes:
    """Read the request body, refusing it before reading when its declared size is too big.

    Reads in chunks: under waitress the input stream is bounded by the app-wide limit, not by
    the request's length, so one ``read(limit + 1)`` would allocate the whole limit (512 MiB
    for a batch) for every 10-byte request.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(what, limit)
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = request.stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise PayloadTooLarge(what, limit)
    if not size:
        raise BadRequest(f"{what} is empty")
    return b"".join(chunks)


def _model(name: str) -> LoadedModel:
    registry = _service().registry
    model = registry.get(name)
    if model is None:
        raise ModelNotFound(name, registry.names())
    return model


def _context_id(value: str | None) -> str:
    if not value:
        raise BadRequest(f"missing {CONTEXT_HEADER} header; upload keys with POST /v1/contexts")
    if not _CONTEXT_ID.fullmatch(value):
        raise BadRequest("a context id is 64 lowercase hex characters (sha256 of the upload)")
    return value


def _register_routes(app: Flask) -> None:
    @app.get("/v1/health")
    def health() -> Response:
        registry, store = _service().registry, _service().store
        return jsonify(
            status="ok", version=__version__, models=registry.names(), contexts=len(store)
        )

    @app.get("/v1/models")
    def list_models() -> Response:
        registry = _service().registry
        return jsonify(models=[m.summary() for m in registry])

    @app.get("/v1/models/<name>")
    def model_card(name: str) -> Response:
        return jsonify(_model(name).card.to_json())

    @app.post("/v1/contexts")
    def upload_context() -> tuple[Response, int]:
        config, store = _service().config, _service().store
        data = _read_body(config.max_context_bytes, "context")
        stored, created = store.put(_owner(), data)
        expires = datetime.fromtimestamp(stored.expires_at, UTC).isoformat()
        return jsonify(context_id=stored.context_id, expires_at=expires), 201 if created else 200

    @app.route("/v1/contexts/<context_id>", methods=["HEAD"])
    def has_context(context_id: str) -> Response:
        store = _service().store
        found = store.exists(_owner(), _context_id(context_id))
        return Response(status=200 if found else 404)

    @app.delete("/v1/contexts/<context_id>")
    def delete_context(context_id: str) -> Response:
        store = _service().store
        if not store.delete(_owner(), _context_id(context_id)):
            raise ContextNotFound(context_id)
        return Response(status=204)

    @app.post("/v1/models/<name>/predict")
    def predict(name: str) -> Response:
        config, store = _service().config, _service().store
        model = _model(name)
        kind = request.args.get("plan", "latency")
        plan = model.plans.get(kind)
        if plan is None:
            raise BadRequest(f"model {name!r} offers plans {sorted(model.plans)}, not {kind!r}")
        max_samples = config.max_samples(kind)
        context_id = _context_id(request.headers.get(CONTEXT_HEADER))
        data = _read_body(config.max_body_bytes(kind), "request body")
        stored = store.get(_owner(), context_id)
        if stored is None:
            raise ContextNotFound(context_id)
        if stored.params != plan.params:
            raise ParameterMismatch(
                f"context {context_id[:12]}… was made for other CKKS parameters than the "
                f"{kind} plan of model {name!r}; make keys with the parameters of its card"
            )
        missing = stored.missing_steps(plan.galois_steps)
        if missing:
            raise ParameterMismatch(
                f"the context lacks Galois keys for rotation steps {missing}", missing=missing
            )
        timings = Timings()
        start = time.perf_counter()
        max_units = -(-max_samples // plan.samples_per_unit)
        try:
            items = decode_frames(data, max_items=max(1, len(data) // 8))
        except ProtocolError as exc:
            raise BadRequest(str(exc)) from None
        per_unit = plan.inputs_per_unit
        if not items or len(items) % per_unit:
            raise BadRequest(
                f"the {kind} plan of {name!r} takes {per_unit} ciphertexts per "
                f"{'sample' if plan.samples_per_unit == 1 else 'group of samples'}; "
                f"got {len(items)}"
            )
        if len(items) // per_unit > max_units:
            raise PayloadTooLarge(
                f"a request of {len(items) // per_unit * plan.samples_per_unit} samples",
                max_samples,
                "samples",
            )
        units = []
        for first in range(0, len(items), per_unit):
            unit = []
            for index in range(first, first + per_unit):
                try:
                    unit.append(
                        load_seal(
                            seal.Ciphertext,
                            items[index],
                            plan.context,
                            what=f"input ciphertext {index}",
                        )
                    )
                except ProtocolError as exc:
                    raise BadRequest(str(exc)) from None
            try:
                plan.check(unit)
            except EvaluationError as exc:
                raise BadRequest(str(exc)) from None
            units.append(unit)
        timings.add("deserialize", time.perf_counter() - start)
        quotas = _service().quotas
        if quotas is not None:
            quotas.charge_samples(_owner(), len(units) * plan.samples_per_unit)
        start = time.perf_counter()
        outputs = [
            ct
            for unit in units
            for ct in plan.evaluate(unit, stored.relin_keys, stored.galois_keys, timings)
        ]
        _service().metrics.observe_evaluation(name, kind, time.perf_counter() - start)
        start = time.perf_counter()
        body = encode_frames([save_seal(ct) for ct in outputs])
        timings.add("serialize", time.perf_counter() - start)
        response = Response(body, status=200, mimetype=MEDIA_TYPE)
        response.headers["Server-Timing"] = ", ".join(
            f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in timings.stages.items()
        )
        return response

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document(__version__))


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError) -> tuple[Response, int]:
        response = jsonify(error.to_json())
        if isinstance(error, TooManyRequests):
            response.headers["Retry-After"] = str(error.retry_after)
        if isinstance(error, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="he-service"'  # RFC 6750
        return response, error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        mapped: ServiceError
        if error.code == 404:
            mapped = RouteNotFound(
                f"no route {request.method} {request.path}; see /v1/openapi.json"
            )
        elif error.code == 405:
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        elif error.code == 413:
            config = _service().config
            mapped = PayloadTooLarge("request body", config.max_context_bytes)
        else:
            mapped = BadRequest(error.description or "bad request")
            return jsonify(mapped.to_json()), error.code or 400
        response = jsonify(mapped.to_json())
        allowed = getattr(error, "valid_methods", None)
        if allowed:  # RFC 9110: a 405 lists the methods the route supports
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response, mapped.status

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        failure = InternalError("internal error; the server logged it")
        return jsonify(failure.to_json()), failure.status
