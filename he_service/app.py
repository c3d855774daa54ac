"""The Flask application factory and the HTTP routes: API v1 and the Open Inference Protocol."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RoutingException

from he_service import __version__
from he_service.auth import ANONYMOUS, UNAUTHORIZED_MESSAGE, TokenTable
from he_service.config import Config
from he_service.engine import Timings
from he_service.error_table import ERROR_TABLE, to_service_error
from he_service.errors import (
    BadRequest,
    ContextNotFound,
    InternalError,
    MethodNotAllowed,
    NotReady,
    PayloadTooLarge,
    RouteNotFound,
    ServiceError,
    Unauthorized,
    UnknownUpload,
)
from he_service.keystore import KeyStore, StoredContext
from he_service.memory import MemoryBudget
from he_service.observability import Metrics, init_app
from he_service.oip import HEADER_LENGTH, encode_infer_response, model_metadata, parse_infer_request
from he_service.openapi import PUBLIC_PATHS, openapi_document
from he_service.protocol import CONTEXT_HEADER, MEDIA_TYPE
from he_service.protocol.framing import encode_frames, frame_count, read_frames
from he_service.protocol.plans import PlanKind
from he_service.protocol.seal_io import sweep_scratch_files
from he_service.quotas import Quotas
from he_service.registry import ModelRegistry
from he_service.serving import EncryptedRequest, ServedPlan
from he_service.uploads import UploadInfo, Uploads

__all__ = ["NO_BODY_BYTES", "REFUSED_BODY", "Admission", "admit", "create_app"]

log = logging.getLogger(__name__)
_CONTEXT_ID = re.compile(r"^[0-9a-f]{64}$")
_READ_CHUNK = 1 << 20
# Routes that read only this process's memory: they are served while a shared store is down.
_STORELESS = frozenset(
    {"list_models", "model_card", "openapi", "v2_live", "v2_ready", "v2_metadata", "v2_model_ready"}
)
T = TypeVar("T")
# Routes that take no body still get this much, so that a stray small body (or one sent with a
# request that is refused for its caller) is read and the connection stays usable.
NO_BODY_BYTES = 16 << 10
# WSGI environ key the HTTP front (he_service.front) sets when it answered a request from its
# headers alone, leaving its body unread: "too_large" or "unauthenticated".
REFUSED_BODY = "he_service.refused_body"
# A v2 body's parse holds up to this many times its size (body, JSON strings, decoded bytes).
V2_PARSE_PEAK = 3
# Each route that reads a body, and its limit (the one its handler passes to _read_body).
_BODY_LIMITS: dict[str, Any] = {
    "upload_context": lambda config, plan: config.max_context_bytes,
    "predict": lambda config, plan: config.max_body_bytes(plan),
    "upload_part": lambda config, plan: config.max_part_bytes,
    # The plan is a parameter inside a v2 body: the larger limit, then the plan's once parsed.
    "v2_infer": lambda config, plan: max(config.max_body_bytes(kind) for kind in PlanKind),
}


def create_app(config: Config | Mapping[str, Any] | None = None) -> Flask:
    """Build the service: load and compile every model, then register the routes.

    Args:
        config: a ``Config``, or a mapping of overrides on top of defaults and env vars.

    Returns:
        The WSGI application.

    Raises:
        RegistryError: the models directory holds no servable artifact.
        NotReady, StagingUnavailable: the context store or the upload staging area cannot be
            created.
    """
    if not isinstance(config, Config):
        config = Config.load(config)
    budget = MemoryBudget(config.memory_budget())
    registry = ModelRegistry.from_directory(config.models_dir, config, budget)
    tokens = TokenTable.parse(config.api_tokens)
    sweep_scratch_files()  # SEAL scratch files of killed workers, where they have names
    store = KeyStore.from_config(
        config,
        accepts=registry.accepts,
        max_galois_keys=registry.max_galois_keys,
        budget=budget,
    )
    service = _Service(
        config=config,
        registry=registry,
        store=store,
        budget=budget,
        uploads=Uploads.from_config(config),
        tokens=tokens,
        # Quotas are per token: the tokenless quick start has no principal to charge.
        quotas=(
            Quotas.from_config(config, state_dir=config.key_store_dir.parent)
            if tokens.enabled
            else None
        ),
        metrics=Metrics(),
        contexts_count=_Bounded(store.stats),
    )
    service.metrics.key_store_stats = service.store.stats
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_any_body_bytes
    app.extensions["he_service"] = service
    init_app(app, service.metrics)
    app.before_request(_authenticate)
    app.before_request(_refused_body)
    _register_routes(app)
    _register_errors(app)
    return app


@dataclass(frozen=True)
class _Service:
    """Everything a request handler needs, built once per app."""

    config: Config
    registry: ModelRegistry
    store: KeyStore
    uploads: Uploads
    tokens: TokenTable
    quotas: Quotas | None  # None when API tokens are off
    metrics: Metrics
    contexts_count: _Bounded[tuple[int, int]]
    budget: MemoryBudget


class _Bounded(Generic[T]):
    """Call ``fetch`` (in one helper thread) but wait for it at most ``wait`` seconds.

    Health must answer at once even while the key store (Redis, a disk) hangs: it gets the
    last value fetched and ``False`` then, and the next call waits for the same fetch.
    """

    def __init__(self, fetch: Callable[[], T], wait: float = 0.2) -> None:
        self._fetch, self._wait = fetch, wait
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # made after a fork, on first use
        self._pending: Future[T] | None = None
        self.last: T | None = None

    def get(self) -> tuple[T | None, bool]:
        """Return ``(value, True)``, or ``(last value, False)`` if late or failing."""
        with self._lock:
            if self._pending is None:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="he-health")
                try:
                    self._pending = self._executor.submit(self._fetch)
                except RuntimeError:  # no thread to be had (out of memory): report, do not fail
                    return self.last, False
            pending = self._pending
        try:
            value = pending.result(timeout=self._wait)
        except FutureTimeout:
            return self.last, False
        except Exception:  # the store's own error; health only reports it
            value = None
        with self._lock:
            if self._pending is pending:
                self._pending = None
        if value is None:
            return self.last, False
        self.last = value
        return value, True


def _service() -> _Service:
    service: _Service = current_app.extensions["he_service"]
    return service


def _authenticate() -> None:
    """Resolve the caller's token (every route but health) and charge one request to it."""
    if request.path in PUBLIC_PATHS:
        g.principal_name = ANONYMOUS.name
        return
    service = _service()
    principal = service.tokens.authenticate(request.headers.get("Authorization"))
    g.principal_name = principal.name
    if service.quotas is not None:
        try:
            service.quotas.check_request(principal.name)
        except NotReady:
            if request.endpoint not in _STORELESS:
                raise


@dataclass(frozen=True)
class Admission:
    """What a request may cost, decided from its request line and headers before its body."""

    body_limit: int  # the most body bytes its route reads
    authorized: bool  # False: the answer is a 401 whatever the body holds


def admit(app: Flask, method: str, path: str, query: str, authorization: str | None) -> Admission:
    """Return the body limit and the auth outcome of a request from its headers alone.

    The HTTP front calls this before it receives a body (no I/O, no quota), so that an
    oversized or unauthenticated request is answered without reading it. Routes that take no
    body, unknown routes and unknown methods allow ``NO_BODY_BYTES``.
    """
    service: _Service = app.extensions["he_service"]
    authorized = True
    if path not in PUBLIC_PATHS and service.tokens.enabled:
        try:
            service.tokens.authenticate(authorization)
        except Unauthorized:
            authorized = False
    try:
        endpoint, _ = app.url_map.bind("localhost").match(path, method)
    except (HTTPException, RoutingException):
        return Admission(NO_BODY_BYTES, authorized)
    limit = _BODY_LIMITS.get(str(endpoint))
    if limit is None:
        return Admission(NO_BODY_BYTES, authorized)
    try:
        plan = PlanKind(parse_qs(query).get("plan", [PlanKind.LATENCY.value])[0])
    except ValueError:  # the route answers 400 for an unknown plan; the smaller limit is enough
        plan = PlanKind.LATENCY
    return Admission(int(limit(service.config, plan)), authorized)


def _refused_body() -> None:
    """Answer a request the front refused at its headers (after authentication and routing)."""
    reason = request.environ.get(REFUSED_BODY)
    if reason is None or request.routing_exception is not None:
        return  # a 404/405 answers it as well
    if reason == "unauthenticated":
        raise Unauthorized(UNAUTHORIZED_MESSAGE)
    limit = admit(
        current_app, request.method, request.path, request.query_string.decode("latin-1"), None
    )
    raise PayloadTooLarge("request body", limit.body_limit)


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
    if declared and request.environ.get("wsgi.input_terminated"):
        # One read of the declared size allocates the body once (a list of chunks joined, or
        # werkzeug's stream, holds it twice at the peak); the server ends the input there.
        data: bytes = request.environ["wsgi.input"].read(declared)
        if len(data) != declared:
            raise BadRequest(f"{what} is shorter than its Content-Length")
        return data
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


def _context_id(value: str | None) -> str:
    if not value:
        raise BadRequest(f"missing {CONTEXT_HEADER} header; upload keys with POST /v1/contexts")
    if not _CONTEXT_ID.fullmatch(value):
        raise BadRequest("a context id is 64 lowercase hex characters (sha256 of the upload)")
    return value


def _keys(plan: ServedPlan, context_id: str) -> StoredContext:
    """Return the caller's stored context, checked against the plan."""
    keys = _service().store.get(_owner(), context_id)
    if keys is None:
        raise ContextNotFound(context_id)
    plan.check_keys(keys)
    return keys


def _predict(
    plan: ServedPlan, keys: StoredContext, parts: Iterable[bytes], count: int, *, uploaded: bool
) -> Response:
    """Evaluate a request's framed ciphertexts (one body, or an upload's parts); answer them."""
    return _respond(
        _evaluate(
            plan, keys, lambda timings: plan.read(parts, count, timings), count, uploaded=uploaded
        )
    )


def _respond(evaluated: tuple[list[bytes], Timings]) -> Response:
    """Answer the output ciphertexts of an evaluation, with its stage durations."""
    outputs, timings = evaluated
    response = Response(encode_frames(outputs), status=200, mimetype=MEDIA_TYPE)
    response.headers["Server-Timing"] = _server_timing(timings)
    return response


def _evaluate(
    plan: ServedPlan,
    keys: StoredContext,
    read: Callable[[Timings], EncryptedRequest],
    count: int,
    *,
    uploaded: bool,
) -> tuple[list[bytes], Timings]:
    """Charge, read, evaluate and serialize a request of ``count`` input ciphertexts."""
    samples = plan.check_count(count, uploaded=uploaded)
    needed = plan.request_memory_bytes(count)
    _service().budget.check(needed, "this request")  # 413 before a sample is charged
    quotas = _service().quotas
    if quotas is not None:
        quotas.charge_samples(_owner(), samples)
    timings = Timings()
    with _service().budget.reserve(needed, "this request"):
        inputs = read(timings)
        start = time.perf_counter()
        outputs = plan.run(inputs, keys, timings)
        del inputs
        evaluated = time.perf_counter() - start
        _service().metrics.observe_evaluation(plan.model, plan.kind, evaluated)
        serialized = plan.serialize(outputs, timings)
        del outputs
    return serialized, timings


def _server_timing(timings: Timings) -> str:
    return ", ".join(
        f"{stage};dur={seconds * 1000:.2f}" for stage, seconds in timings.stages.items()
    )


def _upload_json(info: UploadInfo, plan: ServedPlan) -> dict[str, Any]:
    return {
        "upload_id": info.upload_id,
        "expires_at": datetime.fromtimestamp(info.expires_at, UTC).isoformat(),
        "parts": len(info.parts),
        "ciphertexts": info.ciphertexts,
        "max_ciphertexts": plan.max_upload_ciphertexts,
        "max_part_bytes": _service().config.max_part_bytes,
    }


def _register_routes(app: Flask) -> None:
    @app.get("/v1/health")
    def health() -> Response:
        registry = _service().registry
        stats, reachable = _service().contexts_count.get()
        return jsonify(
            status="degraded" if registry.refused or not reachable else "ok",
            version=__version__,
            models=registry.names(),
            refused=registry.refused,
            contexts=stats[0] if stats else 0,
            storage="ok" if reachable else "unavailable",
        )

    @app.get("/v1/models")
    def list_models() -> Response:
        registry = _service().registry
        return jsonify(
            models=[m.summary() for m in registry],
            refused=[{"name": name, "reason": why} for name, why in registry.refused.items()],
        )

    @app.get("/v1/models/<name>")
    def model_card(name: str) -> Response:
        return jsonify(_service().registry.model(name).card.to_json())

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
        plan = _service().registry.model(name).plan(request.args.get("plan"))
        context_id = _context_id(request.headers.get(CONTEXT_HEADER))
        declared = request.content_length
        if declared is None:  # a chunked body, from a server that does not give its length
            body = _read_body(plan.max_request_bytes, "request body")
            return _predict(
                plan, _keys(plan, context_id), [body], frame_count(body), uploaded=False
            )
        if declared > plan.max_request_bytes:
            raise PayloadTooLarge("request body", plan.max_request_bytes)
        keys = _keys(plan, context_id)
        # The front stages the body (bounded, outside this process's memory); each ciphertext
        # is read, loaded and dropped in turn, so the body is never held whole here.
        count, items = read_frames(
            request.stream.read,
            declared,
            # The count is checked against the plan by _evaluate (413, as for a whole body).
            max_items=declared,
            max_item_bytes=plan.max_ciphertext_bytes,
        )
        return _respond(
            _evaluate(
                plan, keys, lambda timings: plan.load(items, count, timings), count, uploaded=False
            )
        )

    @app.post("/v1/models/<name>/uploads")
    def create_upload(name: str) -> tuple[Response, int]:
        plan = _service().registry.model(name).plan(request.args.get("plan"))
        context_id = _context_id(request.headers.get(CONTEXT_HEADER))
        _keys(plan, context_id)  # refuse now what the prediction would refuse after the parts
        info = _service().uploads.create(
            _owner(), model=plan.model, plan=plan.kind.value, context_id=context_id
        )
        return jsonify(_upload_json(info, plan)), 201

    @app.put("/v1/uploads/<upload_id>/parts/<int:index>")
    def upload_part(upload_id: str, index: int) -> Response:
        service = _service()
        # An unknown upload is refused before its body is received.
        info = service.uploads.info(_owner(), upload_id)
        plan = service.registry.model(info.model).plan(info.plan)
        data = _read_body(service.config.max_part_bytes, "upload part")
        count = plan.check_part(index, data)
        info = service.uploads.put_part(
            _owner(),
            upload_id,
            index,
            data,
            ciphertexts=count,
            max_ciphertexts=plan.max_upload_ciphertexts,
        )
        return jsonify(_upload_json(info, plan))

    @app.post("/v1/uploads/<upload_id>/predict")
    def predict_upload(upload_id: str) -> Response:
        uploads = _service().uploads
        info = uploads.info(_owner(), upload_id)
        plan = _service().registry.model(info.model).plan(info.plan)
        # Missing keys can be uploaded again (same bytes, same id): the parts stay until then.
        keys = _keys(plan, info.context_id)
        with uploads.consume(_owner(), upload_id) as staged:
            return _predict(plan, keys, uploads.parts(staged), staged.ciphertexts, uploaded=True)

    @app.delete("/v1/uploads/<upload_id>")
    def delete_upload(upload_id: str) -> Response:
        if not _service().uploads.delete(_owner(), upload_id):
            raise UnknownUpload(f"no upload {upload_id[:40]!r} to delete")
        return Response(status=204)

    @app.get("/v1/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document(__version__))

    _register_v2_routes(app)


def _register_v2_routes(app: Flask) -> None:
    """The Open Inference Protocol (KServe v2) over the same models, keys, limits and budget."""

    @app.get("/v2/health/live")
    def v2_live() -> Response:
        return jsonify(live=True)

    @app.get("/v2/health/ready")
    def v2_ready() -> tuple[Response, int]:
        _, reachable = _service().contexts_count.get()
        ready = reachable and bool(_service().registry.names())
        return jsonify(ready=ready), 200 if ready else 503

    @app.get("/v2/models/<name>")
    def v2_metadata(name: str) -> Response:
        return jsonify(model_metadata(_service().registry.model(name).card))

    @app.get("/v2/models/<name>/ready")
    def v2_model_ready(name: str) -> Response:
        return jsonify(name=_service().registry.model(name).name, ready=True)

    @app.post("/v2/models/<name>/infer")
    def v2_infer(name: str) -> Response:
        model = _service().registry.model(name)
        limit = _BODY_LIMITS["v2_infer"](_service().config, None)
        declared = min(request.content_length or limit, limit)
        # Parsing holds the body, the JSON document's strings and the decoded ciphertexts at
        # once: that peak comes out of the memory budget too, before the body is read.
        with _service().budget.reserve(V2_PARSE_PEAK * declared, "this request"):
            body = _read_body(limit, "request body")
            infer = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
            plan = model.plan(infer.plan)
            if len(body) > plan.max_request_bytes:
                raise PayloadTooLarge(f"a {plan.kind.value} request body", plan.max_request_bytes)
            del body
        context_id = _context_id(infer.context_id)
        keys = _keys(plan, context_id)
        count = len(infer.ciphertexts)
        outputs, timings = _evaluate(
            plan,
            keys,
            lambda timings: plan.load(infer.ciphertexts, count, timings),
            count,
            uploaded=False,
        )
        answer, header_length = encode_infer_response(
            model.name, infer.request_id, outputs, binary=infer.binary_output
        )
        response = Response(
            answer,
            status=200,
            mimetype="application/json" if header_length is None else "application/octet-stream",
        )
        if header_length is not None:
            response.headers[HEADER_LENGTH] = str(header_length)
        response.headers["Server-Timing"] = _server_timing(timings)
        return response


def _error_body(error: ServiceError) -> dict[str, Any]:
    """Return an error's JSON: the v2 protocol's ``{"error": message}`` under ``/v2``."""
    if request.path.startswith("/v2/"):
        return {"error": error.message}
    return error.to_json()


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ServiceError)
    def service_error(error: ServiceError) -> tuple[Response, int]:
        response = jsonify(_error_body(error))
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        if isinstance(error, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="he-service"'  # RFC 6750
        return response, error.status

    def domain_error(error: Exception) -> tuple[Response, int]:
        return service_error(to_service_error(error))

    for kind, _ in ERROR_TABLE:
        app.register_error_handler(kind, domain_error)

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
            mapped = PayloadTooLarge("request body", config.max_any_body_bytes)
        else:
            mapped = BadRequest(error.description or "bad request")
            return jsonify(_error_body(mapped)), error.code or 400
        response = jsonify(_error_body(mapped))
        allowed = getattr(error, "valid_methods", None)
        if allowed:  # RFC 9110: a 405 lists the methods the route supports
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response, mapped.status

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        failure = InternalError("internal error; the server logged it")
        return jsonify(_error_body(failure)), failure.status
