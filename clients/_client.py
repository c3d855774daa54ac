"""``HEClient``: talk to the service; ``ModelSession``: encrypt, predict, decrypt for one model."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from clients._crypto import KeySet
from clients._errors import (
    ContextNotFoundError,
    HEClientError,
    KeysTooLargeError,
    NotFoundError,
    TransportError,
    error_from_response,
)
from clients._outputs import Outputs, flagged_outputs
from clients._pipeline import ScoredGroup, _add, score_groups
from clients._release import release
from clients._retry import NO_RETRY, Retry, call_with_retries
from he_service.protocol import (
    CONTEXT_HEADER,
    MEDIA_TYPE,
    Buffer,
    ModelCard,
    PlanCard,
    PlanKind,
    Task,
    decode_frames,
    frame_parts,
    framed_size,
    preprocess,
    preprocess_rows,
)

__all__ = ["HEClient", "ModelSession"]


class HEClient:
    """A connection to an encrypted-inference service.

    Use it as a context manager; ``transport`` lets tests run the app in-process
    (``httpx.WSGITransport(app=create_app(...))``); ``token`` is the API token when the service
    requires one (sent as ``Authorization: Bearer``). ``timeout`` bounds each request;
    ``retry`` says how calls that failed in a passing way (a dropped connection, 503, 429) are
    retried, within its ``deadline`` (``Retry()`` by default; ``None`` turns retries off).

    ``base_url`` may be several URLs: instances of one service that share contexts, uploads
    and quotas through Redis (``HE_SERVICE_REDIS_URL``). Calls go to one of them until it
    drops or refuses a connection or answers 503; the retry then goes to the next one. So with
    retries on, the client carries on while an instance is down.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
        retry: Retry | None = Retry(),  # noqa: B008 - frozen, so sharing it is harmless
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("HEClient needs at least one base URL")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._retry = retry or NO_RETRY
        self._instances = [
            httpx.Client(base_url=url, timeout=timeout, transport=transport, headers=headers)
            for url in urls
        ]
        self._current = 0  # the instance calls go to; moved on by a failure of its own
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """Return the URL of the instance calls currently go to."""
        return str(self._instances[self._current].base_url)

    def __enter__(self) -> HEClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for http in self._instances:
            http.close()

    def _fail_over(self, index: int) -> None:
        """Send later calls to the instance after ``index``, unless another thread already did."""
        with self._lock:
            if self._current == index:
                self._current = (index + 1) % len(self._instances)

    def _request(
        self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any
    ) -> httpx.Response:
        """Send a request, retried as ``self._retry`` says; raise the SDK's error for a failure.

        Args:
            idempotent: repeating the request after the server may have received it is
                harmless; if not, it is retried only when it never reached the server (and on
                503 and 429, which the service answers before doing anything).
        """

        def attempt(seconds_left: float) -> httpx.Response:
            timeout = min(self._timeout, seconds_left)
            index = self._current
            try:
                response = self._instances[index].request(method, path, timeout=timeout, **kwargs)
            except httpx.HTTPError as exc:
                self._fail_over(index)
                raise TransportError(
                    f"{method} {path} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if response.status_code == 503:
                self._fail_over(index)
            if response.status_code >= 400 and (method != "HEAD" or response.status_code != 404):
                try:
                    body = response.json()
                except ValueError:
                    body = None
                raise error_from_response(
                    response.status_code, body, response.headers.get("Retry-After")
                )
            return response

        return call_with_retries(self._retry, f"{method} {path}", attempt, idempotent=idempotent)

    def health(self) -> dict[str, Any]:
        """Return the service status, version and model names."""
        result: dict[str, Any] = self._request("GET", "/v1/health").json()
        return result

    def models(self) -> list[dict[str, Any]]:
        """Return the summaries of the served models."""
        result: list[dict[str, Any]] = self._request("GET", "/v1/models").json()["models"]
        return result

    def card(self, name: str) -> ModelCard:
        """Fetch and check a model card."""
        return ModelCard.from_json(self._request("GET", f"/v1/models/{name}").json())

    def has_context(self, context_id: str) -> bool:
        """Ask whether the service still holds a context."""
        return self._request("HEAD", f"/v1/contexts/{context_id}").status_code == 200

    def upload_context(self, public_context: bytes) -> str:
        """Upload public evaluation keys; returns the context id."""
        response = self._request(
            "POST",
            "/v1/contexts",
            **_body([public_context], "application/octet-stream"),
        )
        context_id: str = response.json()["context_id"]
        return context_id

    def delete_context(self, context_id: str) -> None:
        """Ask the service to forget a context."""
        self._request("DELETE", f"/v1/contexts/{context_id}")

    def model(
        self,
        name: str,
        *,
        plan: PlanKind | str = PlanKind.LATENCY,
        keys: KeySet | Path | str | None = None,
    ) -> ModelSession:
        """Open a session for one plan of one model: read the card, make keys, upload them.

        Args:
            name: the served model.
            plan: ``"latency"`` (one sample per request, fastest answer) or ``"batch"`` (one
                sample per slot: thousands of samples per request, least time per sample).
            keys: a ``KeySet``, or a key file written by ``ModelSession.save_keys``; by default
                fresh keys are generated with the plan's parameters.

        Returns:
            A session whose ``predict``/``predict_many`` return released outputs (rounded to
            the plan's output precision, flagged outside the calibrated ranges).

        Raises:
            ProtocolError: the model does not offer this plan.
            KeysTooLargeError: the plan's public keys exceed what the server accepts; raised
                before any key is generated.
            ValueError: the given keys do not fit the plan.
        """
        card = self.card(name)
        spec = card.plan(plan)
        if isinstance(keys, str | Path):
            keys = KeySet.load(keys)
        if keys is None:
            # Key generation can take minutes and gigabytes: first make sure they can be used.
            _check_key_bytes(card, spec, spec.costs.public_key_bytes)
            keys = KeySet.generate(spec.ckks, spec.galois_steps)
        elif keys.params != spec.ckks or not set(spec.galois_steps) <= set(keys.galois_steps):
            raise ValueError(
                f"the given keys do not fit the {spec.kind.value} plan of model {name!r}: they "
                "were made for other CKKS parameters or lack Galois steps"
            )
        else:
            _check_key_bytes(card, spec, len(keys.public_context))
        session = ModelSession(self, card, spec.kind, keys)
        session.ensure_context()
        return session

    def predict_raw(
        self,
        name: str,
        context_id: str,
        ciphertexts: Sequence[Buffer],
        *,
        plan: PlanKind | str = PlanKind.LATENCY,
    ) -> tuple[list[bytes], dict[str, float]]:
        """Post framed ciphertexts; returns the output ciphertexts and server stage seconds."""
        response = self._request(
            "POST",
            f"/v1/models/{name}/predict",
            params={"plan": str(plan)},
            **_body(frame_parts(ciphertexts), MEDIA_TYPE, {CONTEXT_HEADER: context_id}),
        )
        return _outputs(response)

    def create_upload(
        self, name: str, context_id: str, *, plan: PlanKind | str = PlanKind.LATENCY
    ) -> dict[str, Any]:
        """Open an upload for a request too large for one body; returns its description.

        The answer holds ``upload_id``, ``expires_at``, ``max_part_bytes`` and
        ``max_ciphertexts``. Send the ciphertexts with ``upload_part``, then ask for the
        prediction with ``predict_upload``.
        """
        response = self._request(
            "POST",
            f"/v1/models/{name}/uploads",
            idempotent=False,  # a lost answer would leave an upload open until it expires
            params={"plan": str(plan)},
            headers={CONTEXT_HEADER: context_id},
        )
        result: dict[str, Any] = response.json()
        return result

    def upload_part(
        self, upload_id: str, index: int, ciphertexts: Sequence[Buffer]
    ) -> dict[str, Any]:
        """Send part ``index`` (from 0, without gaps) of an upload; sending it again replaces it."""
        response = self._request(
            "PUT",
            f"/v1/uploads/{upload_id}/parts/{index}",
            **_body(frame_parts(ciphertexts), MEDIA_TYPE),
        )
        result: dict[str, Any] = response.json()
        return result

    def predict_upload(self, upload_id: str) -> tuple[list[bytes], dict[str, float]]:
        """Evaluate an upload's ciphertexts (it is then deleted); same answer as ``predict_raw``.

        Retried after a dropped connection: the service deletes the upload only once the
        evaluation ended, so a retry finds it (a worker died) or answers 404 (the answer was
        lost after the evaluation: send the upload again).
        """
        return _outputs(self._request("POST", f"/v1/uploads/{upload_id}/predict"))

    def delete_upload(self, upload_id: str) -> None:
        """Abandon an upload and free its staged parts."""
        self._request("DELETE", f"/v1/uploads/{upload_id}")


T = TypeVar("T")


class ModelSession:
    """Keys and card for one plan of one model; encrypts, sends, decrypts.

    Requests follow the card: as many units (samples, or batch groups) per request as its
    ``limits`` allow, counted in samples and in bytes; a unit larger than one request body is
    sent as an upload in parts. No request the session makes exceeds a limit of the card.
    """

    def __init__(
        self, client: HEClient, card: ModelCard, plan: PlanKind | str, keys: KeySet
    ) -> None:
        self.client, self.card, self.keys = client, card, keys
        self.spec = card.plan(plan)
        self.plan = self.spec.kind
        self.context_id = ""
        self.last_timings: dict[str, float] = {}

    def public_context(self) -> bytes:
        """Return the public evaluation keys exactly as uploaded (no secret key)."""
        return self.keys.public_context

    def save_keys(self, path: Path | str) -> None:
        """Save all keys, secret key included, to a local file (mode 0600)."""
        self.keys.save(path)

    def ensure_context(self) -> str:
        """Upload the public context unless the service already holds it."""
        context_id = hashlib.sha256(self.keys.public_context).hexdigest()
        if not self.client.has_context(context_id):
            context_id = self.client.upload_context(self.keys.public_context)
        self.context_id = context_id
        return context_id

    def encrypt(self, x: np.ndarray) -> list[bytes]:
        """Preprocess, encode and encrypt one raw sample: the ciphertexts of its unit."""
        sample = preprocess(x, self.card.preprocessing, self.card.input_shape)
        (vectors,) = self.spec.input_encoding.units(sample[None])
        return [self.keys.encrypt(v) for v in vectors]

    def decrypt(self, ciphertext: bytes) -> Outputs:
        """Decrypt one sample's output ciphertext (latency plan) into its released outputs.

        Like every output of the SDK, they are noise-flooded and rounded to the plan's
        ``output_precision`` (``clients._release``); outputs outside the model's calibrated
        ranges raise an ``OutOfRangeWarning``.
        """
        values = release(
            self.keys, [ciphertext], self.spec.output_decoding, 1, self.spec.output_precision
        )
        outputs: Outputs = flagged_outputs(values, self.card, stacklevel=2)[0]
        return outputs

    def predict(self, x: np.ndarray) -> Outputs:
        """Return the released outputs (logits or values) of one raw sample, as ``predict_many``."""
        row: Outputs = self.predict_many(np.asarray(x)[None, ...])[0]
        return row

    def predict_many(self, xs: np.ndarray) -> Outputs:
        """Return the released outputs of any number of samples, one row per sample.

        The latency plan sends each sample as its own ciphertexts, the batch plan one sample
        per slot (thousands of samples per group of ciphertexts); either way requests are
        split by the card's sample and byte limits.

        Outputs are noise-flooded and rounded to multiples of the plan's ``output_precision``
        (raw CKKS decryptions would leak the secret key). Samples with an output outside the
        model's calibrated ranges are flagged: ``out_of_range`` of the result says which, and
        an ``OutOfRangeWarning`` is issued.
        """
        samples = np.asarray(xs)
        if len(samples) == 0:
            raise ValueError("predict_many needs at least one sample")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        prepared = preprocess_rows(samples, self.card.preprocessing, self.card.input_shape)
        units = self.spec.input_encoding.units(prepared)
        _add(timings, "encode", time.perf_counter() - start)
        spec, limits = self.spec, self.spec.limits
        unit_bytes = framed_size(
            spec.input_encoding.ciphertexts_per_unit, spec.costs.request_bytes_per_unit
        )
        per_request = max(1, limits.max_samples_per_request // spec.samples_per_unit)
        rows: list[np.ndarray] = []
        pending: list[bytes] = []
        pending_samples = pending_units = 0
        left = len(samples)
        for vectors in units:
            in_unit = min(spec.samples_per_unit, left)
            left -= in_unit
            if unit_bytes > limits.max_request_bytes:
                rows.append(self._predict_in_parts(vectors, in_unit, timings))
                continue
            start = time.perf_counter()
            ciphertexts = [self.keys.encrypt(v) for v in vectors]
            _add(timings, "encrypt", time.perf_counter() - start)
            size = framed_size(
                len(pending) + len(ciphertexts), sum(map(len, pending + ciphertexts))
            )
            if pending_units and (pending_units == per_request or size > limits.max_request_bytes):
                rows.append(self._predict_body(pending, pending_samples, timings))
                pending, pending_samples, pending_units = [], 0, 0
            pending += ciphertexts
            pending_samples += in_unit
            pending_units += 1
        if pending:
            rows.append(self._predict_body(pending, pending_samples, timings))
        self.last_timings = timings
        return flagged_outputs(np.concatenate(rows), self.card, stacklevel=2)

    def score_iter(
        self,
        rows: np.ndarray,
        *,
        group_rows: int | None = None,
        workers: int | None = None,
        skip: Collection[int] = (),
        dask: Any = None,
    ) -> Iterator[ScoredGroup]:
        """Yield the released outputs of many rows group by group, in order, as they arrive.

        Groups are encrypted on every core (a process pool) while the group before is sent
        and decrypted; a batch group holds as many rows as the plan has slots, a latency group
        as many as one request carries. ``last_timings`` adds up the stages as they go.

        With ``dask``, a Dask cluster's workers encrypt the groups and decrypt the answers
        instead: the secret key goes to every worker once, so the cluster must be your own.

        Args:
            rows: raw samples, one per row.
            group_rows: rows per group (at most, and by default, a whole group).
            workers: encrypting processes (default: every core; 1 encrypts in this process);
                with ``dask``, chunks per group (default: the cluster's threads).
            skip: indices of groups not to score (scored by an earlier run).
            dask: a scheduler address (``tcp://HOST:8786``, ``tls://HOST:8786``) or a
                ``distributed.Client`` (say, one made with a ``Security`` for TLS).

        Raises:
            ValueError: ``group_rows`` or ``workers`` out of range.
            DaskClusterError: the cluster cannot be reached, or failed during the run.
        """
        self.last_timings = {}
        return score_groups(
            self, rows, group_rows=group_rows, workers=workers, skip=skip, dask=dask
        )

    def classify(self, x: np.ndarray) -> str:
        """Return the label of the largest released output (``predict``).

        Rounding to the plan's precision can tie two outputs; the first label wins.

        Raises:
            ValueError: the model is a regression: it predicts values, not classes.
        """
        if self.card.task != Task.CLASSIFICATION:
            raise ValueError(
                f"model {self.card.name!r} is a {self.card.task.value} model: it predicts "
                f"{', '.join(self.card.labels)}, not a class; use predict() for the values"
            )
        return self.card.labels[int(np.argmax(self.predict(x)))]

    def _predict_body(
        self, ciphertexts: Sequence[Buffer], samples: int, timings: dict[str, float]
    ) -> np.ndarray:
        """Send one request body; return the decoded outputs of its ``samples`` samples."""
        return self._decode(self._post_body(ciphertexts, timings), samples, timings)

    def _post_body(self, ciphertexts: Sequence[Buffer], timings: dict[str, float]) -> list[bytes]:
        """Send one request body; return the output ciphertexts."""
        name, plan = self.card.name, self.plan
        return self._timed(
            lambda: self.client.predict_raw(name, self.context_id, ciphertexts, plan=plan),
            timings,
        )

    def _predict_in_parts(
        self, vectors: Iterable[np.ndarray], samples: int, timings: dict[str, float]
    ) -> np.ndarray:
        """Send one unit as an upload in parts, encrypting as it goes; decode its outputs."""
        vectors = list(vectors)

        def ciphertexts() -> Iterator[bytes]:
            for vector in vectors:
                start = time.perf_counter()
                ciphertext = self.keys.encrypt(vector)
                _add(timings, "encrypt", time.perf_counter() - start)
                yield ciphertext

        return self._decode(self._send_in_parts(ciphertexts, timings), samples, timings)

    def _send_group(self, ciphertexts: Sequence[Buffer], timings: dict[str, float]) -> list[bytes]:
        """Send encrypted units in one body, or one unit too large for a body as an upload.

        Returns the output ciphertexts: the caller decrypts them where its key is.
        """
        size = framed_size(len(ciphertexts), sum(map(len, ciphertexts)))
        if size <= self.spec.limits.max_request_bytes:
            return self._post_body(ciphertexts, timings)
        return self._send_in_parts(lambda: iter(ciphertexts), timings)

    def _send_in_parts(
        self, ciphertexts: Callable[[], Iterator[Buffer]], timings: dict[str, float]
    ) -> list[bytes]:
        """Send one unit's ``ciphertexts()`` as an upload in parts; return its output ciphertexts.

        The server deletes an upload once it has evaluated it, so a prediction retried after
        a dropped connection finds it gone when only the answer was lost: then the unit is
        uploaded once more.
        """
        try:
            return self._upload_and_predict(ciphertexts(), timings)
        except NotFoundError as exc:
            if exc.details.get("attempts", 1) <= 1 or isinstance(exc, ContextNotFoundError):
                raise
            return self._upload_and_predict(ciphertexts(), timings)

    def _upload_and_predict(
        self, ciphertexts: Iterator[Buffer], timings: dict[str, float]
    ) -> list[bytes]:
        """Send one unit's ciphertexts as an upload in parts, as they come; return the outputs."""
        name, plan, limit = self.card.name, self.plan, self.spec.limits.max_part_bytes
        upload = self._with_context(
            lambda: self.client.create_upload(name, self.context_id, plan=plan)
        )
        upload_id = upload["upload_id"]
        try:
            part: list[Buffer] = []
            index = 0
            for ciphertext in ciphertexts:
                if (
                    part
                    and framed_size(len(part) + 1, sum(map(len, part)) + len(ciphertext)) > limit
                ):
                    self._timed_part(upload_id, index, part, timings)
                    part, index = [], index + 1
                part.append(ciphertext)
            self._timed_part(upload_id, index, part, timings)
            outputs = self._timed(lambda: self.client.predict_upload(upload_id), timings)
        except BaseException:
            # Free the server's staging area now rather than when the upload expires.
            with contextlib.suppress(HEClientError):
                self.client.delete_upload(upload_id)
            raise
        return outputs

    def _timed_part(
        self, upload_id: str, index: int, part: Sequence[Buffer], timings: dict[str, float]
    ) -> None:
        start = time.perf_counter()
        self.client.upload_part(upload_id, index, part)
        _add(timings, "request", time.perf_counter() - start)

    def _timed(
        self, call: Callable[[], tuple[list[bytes], dict[str, float]]], timings: dict[str, float]
    ) -> list[bytes]:
        start = time.perf_counter()
        outputs, server = self._with_context(call)
        _add(timings, "request", time.perf_counter() - start)
        for stage, seconds in server.items():
            _add(timings, f"server_{stage}", seconds)
        return outputs

    def _decode(self, outputs: list[bytes], samples: int, timings: dict[str, float]) -> np.ndarray:
        start = time.perf_counter()
        spec = self.spec
        released = release(self.keys, outputs, spec.output_decoding, samples, spec.output_precision)
        _add(timings, "decrypt", time.perf_counter() - start)
        return released

    def _with_context(self, call: Callable[[], T]) -> T:
        """Run ``call``; if the server lost the context (expired, evicted), upload it once more."""
        try:
            return call()
        except ContextNotFoundError:
            self.context_id = self.client.upload_context(self.keys.public_context)
            return call()


def _check_key_bytes(card: ModelCard, spec: PlanCard, needed: int) -> None:
    """Refuse keys the server would refuse, before making or uploading them."""
    limit = spec.limits.max_context_bytes
    if needed <= limit:
        return
    others = [
        f"plan={other.kind.value!r} ({_mib(other.costs.public_key_bytes)} of keys)"
        for other in card.plans.values()
        if other.kind != spec.kind
        and other.costs.public_key_bytes <= other.limits.max_context_bytes
    ]
    instead = f"Use {' or '.join(others)}, or ask" if others else "Ask"
    raise KeysTooLargeError(
        f"the {spec.kind.value} plan of model {card.name!r} needs {_mib(needed)} of public keys "
        f"({spec.costs.galois_keys} Galois keys), but this server accepts contexts of at most "
        f"{_mib(limit)}; no keys were made. {instead} the operator to raise "
        "HE_SERVICE_MAX_CONTEXT_BYTES (and KEY_STORE_MAX_BYTES), or rebuild the model with a "
        "smaller key budget (he-models convert --key-budget)",
        details={"needed": needed, "limit": limit},
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _outputs(response: httpx.Response) -> tuple[list[bytes], dict[str, float]]:
    outputs = decode_frames(response.content, max_items=max(1, len(response.content) // 8))
    return outputs, _server_timing(response.headers.get("Server-Timing", ""))


def _server_timing(header: str) -> dict[str, float]:
    stages: dict[str, float] = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            try:
                stages[name] = float(rest[4:]) / 1000.0
            except ValueError:
                continue
    return stages


_SEND_CHUNK = 1 << 20


def _body(
    parts: Sequence[Buffer], media_type: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Return httpx arguments that send ``parts`` as one body, in pieces of at most 1 MiB.

    httpcore slices off what each send took from the rest of the buffer it was given, a copy
    of the rest every time: quadratic in the size of one piece (1.7 s for a 200 MB body sent
    whole). A list (not a generator) can be sent again when a request is retried.
    """
    pieces = [
        memoryview(part)[i : i + _SEND_CHUNK]
        for part in parts
        for i in range(0, len(part), _SEND_CHUNK)
    ]
    length = sum(map(len, parts))
    return {
        "content": pieces,
        "headers": {**(headers or {}), "Content-Type": media_type, "Content-Length": str(length)},
    }
