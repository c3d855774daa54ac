"""``HEClient``: talk to the service; ``ModelSession``: encrypt, predict, decrypt for one model."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from clients._crypto import KeySet
from clients._errors import ContextNotFoundError, TransportError, error_from_response
from he_service.protocol import (
    CONTEXT_HEADER,
    MEDIA_TYPE,
    ModelCard,
    decode_batch,
    decode_frames,
    decode_output,
    encode_batch,
    encode_frames,
    encode_input,
    preprocess,
)

__all__ = ["HEClient", "ModelSession"]


class HEClient:
    """A connection to an encrypted-inference service.

    Use it as a context manager; ``transport`` lets tests run the app in-process
    (``httpx.WSGITransport(app=create_app(...))``); ``token`` is the API token when the service
    requires one (sent as ``Authorization: Bearer``).
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        token: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, transport=transport, headers=headers
        )

    def __enter__(self) -> HEClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path} failed: {exc}") from exc
        if response.status_code >= 400 and method != "HEAD":
            try:
                body = response.json()
            except ValueError:
                body = None
            raise error_from_response(response.status_code, body)
        return response

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
            content=public_context,
            headers={"Content-Type": "application/octet-stream"},
        )
        context_id: str = response.json()["context_id"]
        return context_id

    def delete_context(self, context_id: str) -> None:
        """Ask the service to forget a context."""
        self._request("DELETE", f"/v1/contexts/{context_id}")

    def model(
        self, name: str, *, plan: str = "latency", keys: KeySet | Path | str | None = None
    ) -> ModelSession:
        """Open a session for one plan of one model: read the card, make keys, upload them.

        Args:
            name: the served model.
            plan: ``"latency"`` (one sample per request, fastest answer) or ``"batch"`` (one
                sample per slot: thousands of samples per request, least time per sample).
            keys: a ``KeySet``, or a key file written by ``ModelSession.save_keys``; by default
                fresh keys are generated with the plan's parameters.

        Returns:
            A session whose ``predict``/``predict_many`` return decrypted outputs.

        Raises:
            ProtocolError: the model does not offer this plan.
            ValueError: the given keys do not fit the plan.
        """
        card = self.card(name)
        spec = card.plan(plan)
        if isinstance(keys, str | Path):
            keys = KeySet.load(keys)
        if keys is None:
            keys = KeySet.generate(spec.ckks, spec.galois_steps)
        elif keys.params != spec.ckks or not set(spec.galois_steps) <= set(keys.galois_steps):
            raise ValueError(
                f"the given keys do not fit the {plan} plan of model {name!r}: they were made "
                "for other CKKS parameters or lack Galois steps"
            )
        session = ModelSession(self, card, plan, keys)
        session.ensure_context()
        return session

    def predict_raw(
        self, name: str, context_id: str, ciphertexts: list[bytes], *, plan: str = "latency"
    ) -> tuple[list[bytes], dict[str, float]]:
        """Post framed ciphertexts; returns the output ciphertexts and server stage seconds."""
        response = self._request(
            "POST",
            f"/v1/models/{name}/predict",
            params={"plan": plan},
            content=encode_frames(ciphertexts),
            headers={CONTEXT_HEADER: context_id, "Content-Type": MEDIA_TYPE},
        )
        return decode_frames(response.content, max_items=len(ciphertexts)), _server_timing(
            response.headers.get("Server-Timing", "")
        )


class ModelSession:
    """Keys and card for one plan of one model; encrypts, sends, decrypts."""

    def __init__(self, client: HEClient, card: ModelCard, plan: str, keys: KeySet) -> None:
        self.client, self.card, self.plan, self.keys = client, card, plan, keys
        self.spec = card.plan(plan)
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
        """Preprocess, encode and encrypt one raw sample as the latency plan's card says."""
        sample = preprocess(x, self.card.preprocessing, self.card.input_shape)
        return [self.keys.encrypt(v) for v in encode_input(sample, self.spec.input_encoding)]

    def decrypt(self, ciphertext: bytes) -> np.ndarray:
        """Decrypt and decode one latency-plan output ciphertext into the model's outputs."""
        return decode_output(self.keys.decrypt(ciphertext), self.spec.output_decoding)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return the decrypted outputs (logits) for one raw sample."""
        return self.predict_many(np.asarray(x)[None, ...])[0]

    def predict_many(self, xs: np.ndarray) -> np.ndarray:
        """Return decrypted outputs for any number of samples, one row per sample.

        The latency plan sends up to the card's limit of samples per request, each as its own
        ciphertexts; the batch plan packs one sample per slot, so thousands of samples share
        each ciphertext, and splits the rows into full ciphertext groups.
        """
        samples = np.asarray(xs)
        if len(samples) == 0:
            raise ValueError("predict_many needs at least one sample")
        timings: dict[str, float] = {}
        if self.plan == "batch":
            result = self._predict_batch(samples, timings)
        else:
            rows: list[np.ndarray] = []
            for chunk in _chunks(samples, self.spec.max_samples_per_request):
                start = time.perf_counter()
                ciphertexts = [ct for x in chunk for ct in self.encrypt(x)]
                _add(timings, "encrypt", time.perf_counter() - start)
                outputs = self._timed_post(ciphertexts, timings)
                start = time.perf_counter()
                rows.extend(self.decrypt(ct) for ct in outputs)
                _add(timings, "decrypt", time.perf_counter() - start)
            result = np.stack(rows)
        self.last_timings = timings
        return result

    def _predict_batch(self, samples: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        slots = self.spec.ckks.slot_count
        outputs_per_group = int(self.spec.output_decoding["outputs"])
        start = time.perf_counter()
        groups = encode_batch(
            np.stack(
                [preprocess(x, self.card.preprocessing, self.card.input_shape) for x in samples]
            ),
            slots,
        )
        _add(timings, "encode", time.perf_counter() - start)
        per_request = max(1, self.spec.max_samples_per_request // slots)
        decrypted: list[np.ndarray] = []
        for first in range(0, len(groups), per_request):
            chunk = groups[first : first + per_request]
            start = time.perf_counter()
            ciphertexts = [self.keys.encrypt(row) for group in chunk for row in group]
            _add(timings, "encrypt", time.perf_counter() - start)
            outputs = self._timed_post(ciphertexts, timings)
            start = time.perf_counter()
            for g in range(len(chunk)):
                block = outputs[g * outputs_per_group : (g + 1) * outputs_per_group]
                decrypted.append(np.stack([self.keys.decrypt(ct) for ct in block]))
            _add(timings, "decrypt", time.perf_counter() - start)
        return decode_batch(decrypted, len(samples))

    def _timed_post(self, ciphertexts: list[bytes], timings: dict[str, float]) -> list[bytes]:
        start = time.perf_counter()
        outputs, server = self._post(ciphertexts)
        _add(timings, "request", time.perf_counter() - start)
        for stage, seconds in server.items():
            _add(timings, f"server_{stage}", seconds)
        return outputs

    def _post(self, ciphertexts: list[bytes]) -> tuple[list[bytes], dict[str, float]]:
        try:
            return self.client.predict_raw(
                self.card.name, self.context_id, ciphertexts, plan=self.plan
            )
        except ContextNotFoundError:  # expired or evicted: upload again, once
            self.context_id = self.client.upload_context(self.keys.public_context)
            return self.client.predict_raw(
                self.card.name, self.context_id, ciphertexts, plan=self.plan
            )

    def classify(self, x: np.ndarray) -> str:
        """Return the label of the largest decrypted output."""
        return self.card.labels[int(np.argmax(self.predict(x)))]


def _chunks(samples: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


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
