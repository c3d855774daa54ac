"""The process memory budget: requests reserve before work, models that cannot fit are refused,
out-of-memory inside SEAL is a 503 and the worker answers the next request."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import zstandard
from flask import Flask

from clients import HEClient, ModelSession
from he_service import create_app
from he_service.app import V2_PARSE_PEAK
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import compile_model
from he_service.memory import MemoryBudget, MemoryBusy, MemoryLimitExceeded
from he_service.protocol import CkksParams, KeyBundle, encode_key_bundle, preprocess
from he_service.serving import resident_bytes

MODEL = "breast-cancer-mlp"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(DEFAULT_MODELS_DIR / MODEL, root / MODEL)
    return root


@pytest.fixture(scope="module")
def resident(models: Path) -> int:
    return resident_bytes(compile_model(load_artifact(models / MODEL)))


def _session(app: Flask) -> Iterator[tuple[HEClient, ModelSession]]:
    with HEClient("http://testserver", transport=httpx.WSGITransport(app=app)) as client:
        yield client, client.model(MODEL, plan="batch")


def test_budget_reserves_refuses_and_releases() -> None:
    budget = MemoryBudget(100, retry_after=3)
    with budget.reserve(60, "a"):
        with pytest.raises(MemoryBusy) as busy:
            with budget.reserve(50, "b"):
                pass
        assert busy.value.retry_after == 3
        with budget.reserve(40, "c"):
            assert budget.in_use == 100
    assert budget.in_use == 0
    with pytest.raises(MemoryLimitExceeded, match="budget of 100 bytes"):
        with budget.reserve(101, "d"):
            pass
    # Threads share it: never more than the capacity in use at once.
    peak, lock, barrier = [0], threading.Lock(), threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(200):
            try:
                with budget.reserve(30, "t"):
                    with lock:
                        peak[0] = max(peak[0], budget.in_use)
            except MemoryBusy:
                pass

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert 0 < peak[0] <= 100 and budget.in_use == 0


def test_a_request_larger_than_the_budget_gets_413_naming_it(models: Path, resident: int) -> None:
    budget = resident + (8 << 20)  # the model and its keys fit; one batch group never can
    app = create_app({"models_dir": models, "memory_budget_bytes": budget})
    service = app.extensions["he_service"]
    for _, session in _session(app):
        x = np.zeros((1, *session.card.input_shape))
        response = app.test_client().post(
            f"/v1/models/{MODEL}/predict?plan=batch",
            data=_batch_body(session, x),
            headers={"X-Context-Id": session.context_id},
        )
        assert response.status_code == 413
        error = response.get_json()["error"]
        assert error["limit"] == budget and "memory_budget_bytes" in error["message"]
        assert service.budget.in_use == resident  # nothing stays reserved


def test_a_request_that_fits_later_gets_503_with_retry_after(models: Path, resident: int) -> None:
    app = create_app({"models_dir": models, "memory_budget_bytes": resident + (512 << 20)})
    service = app.extensions["he_service"]
    for _, session in _session(app):
        x = np.zeros((1, *session.card.input_shape))
        expected = session.predict_many(x)
        plan = service.registry.model(MODEL).plan("batch")
        needed = plan.request_memory_bytes(plan.inputs_per_unit)
        body = _batch_body(session, x)
        # Work in flight holds all but half of what this request needs.
        with service.budget.reserve(service.budget.free - needed // 2, "other requests"):
            response = app.test_client().post(
                f"/v1/models/{MODEL}/predict?plan=batch",
                data=body,
                headers={"X-Context-Id": session.context_id},
            )
            assert response.status_code == 503
            assert int(response.headers["Retry-After"]) >= 1
            assert "memory" in response.get_json()["error"]["message"]
        assert np.allclose(session.predict_many(x), expected, atol=1e-2)  # free again: served
        assert service.budget.in_use == resident


def _batch_body(session: ModelSession, x: np.ndarray) -> bytes:
    from he_service.protocol import encode_frames, preprocess

    sample = preprocess(x[0], session.card.preprocessing, session.card.input_shape)
    (vectors,) = session.spec.input_encoding.units(sample[None])
    return encode_frames([session.keys.encrypt(v) for v in vectors])


def test_models_over_the_budget_are_refused_at_start_the_rest_served(
    tmp_path: Path, resident: int
) -> None:
    root = tmp_path / "models"
    for name in (MODEL, "mnist-cnn"):
        shutil.copytree(DEFAULT_MODELS_DIR / name, root / name)
    app = create_app({"models_dir": root, "memory_budget_bytes": resident + (1 << 20)})
    health = app.test_client().get("/v1/health").get_json()
    assert health["models"] == [MODEL]
    assert "memory budget" in health["refused"]["mnist-cnn"]


def test_a_key_section_larger_than_its_keys_is_refused_before_inflation(models: Path) -> None:
    app = create_app({"models_dir": models})
    card = app.test_client().get(f"/v1/models/{MODEL}").get_json()
    params = CkksParams.from_json(card["plans"]["batch"]["ckks"])
    bound = params.key_switch_key_bytes(seeded=False)
    # Compressed just under the 8x ratio: far larger than a key once inflated.
    payload = (os.urandom(1 << 16) + bytes(7 << 16)) * max(1, (4 * bound) >> 19)
    frame = zstandard.ZstdCompressor(level=1).compress(payload)
    header = (0xA15E).to_bytes(2, "little") + bytes([16, 4, 0, 2]) + bytes(2)
    section = header + (16 + len(frame)).to_bytes(8, "little") + frame
    assert len(section) < bound < len(payload)  # passes the size check, not the inflation bound
    bundle = encode_key_bundle(KeyBundle(params, (), {"relin_keys": section}))
    answer = app.test_client().post("/v1/contexts", data=bundle)
    assert answer.status_code == 400
    assert "inflates beyond" in answer.get_json()["error"]["message"]
    # Larger than the keys even compressed: refused on its length alone.
    huge = header + (16 + bound + 1).to_bytes(8, "little") + bytes(bound + 1)
    bundle = encode_key_bundle(KeyBundle(params, (), {"relin_keys": huge}))
    answer = app.test_client().post("/v1/contexts", data=bundle)
    assert answer.status_code == 400
    assert "its keys hold at most" in answer.get_json()["error"]["message"]


_OUT_OF_MEMORY = r"""
import resource, sys, time
import httpx, numpy as np
from clients import HEClient
from he_service import create_app
from he_service.protocol import encode_frames, preprocess

app = create_app({"models_dir": sys.argv[1], "memory_budget_bytes": 1 << 40})
with HEClient("http://testserver", transport=httpx.WSGITransport(app=app)) as client:
    session = client.model("digits-cnn", plan="batch")
    sample = preprocess(np.zeros(session.card.input_shape), session.card.preprocessing,
                        session.card.input_shape)
    (vectors,) = session.spec.input_encoding.units(sample[None])
    body = encode_frames([session.keys.encrypt(v) for v in vectors])  # about 20 MB
    http = app.test_client()
    with open("/proc/self/status") as status:
        size = next(int(l.split()[1]) for l in status if l.startswith("VmSize")) * 1024
    # The body's copies fit; SEAL's working set of one group (hundreds of MB) does not.
    margin = 10 * len(body) + (128 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (size + margin, resource.RLIM_INFINITY))
    answer = http.post("/v1/models/digits-cnn/predict?plan=batch", data=body,
                       headers={"X-Context-Id": session.context_id})
    print("big", answer.status_code, answer.headers.get("Retry-After"), flush=True)
    print("message", answer.get_json()["error"]["message"], flush=True)
    print("health", http.get("/v1/health").status_code, flush=True)  # still answering
    time.sleep(60)  # the worker stops itself (SIGTERM) instead of spinning
"""


def test_out_of_memory_inside_seal_is_503_and_the_worker_stops_instead_of_spinning(
    tmp_path: Path,
) -> None:
    """SEAL's pool stays locked after its bad_alloc: the worker answers 503, then restarts."""
    root = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR / "digits-cnn", root / "digits-cnn")
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_MEMORY, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert done.returncode == -signal.SIGTERM, (done.stdout, done.stderr[-2000:])
    assert lines["big"].split() == ["503", "5"], done.stdout
    assert "ran out of memory" in lines["message"] and "restarts" in lines["message"]
    assert lines["health"] == "200"


def test_a_v2_body_is_charged_for_its_parse_before_it_is_read(models: Path, resident: int) -> None:
    app = create_app({"models_dir": models, "memory_budget_bytes": resident + (512 << 20)})
    service = app.extensions["he_service"]
    for _, session in _session(app):
        x = np.zeros((1, *session.card.input_shape))
        expected = session.predict_many(x)
        body = _v2_json_body(session, x)
        # Room for the evaluation, not for the parse's peak: refused before the body is read.
        with service.budget.reserve(
            service.budget.free - V2_PARSE_PEAK * len(body) + 1, "other requests"
        ):
            busy = _v2_infer(app, body)
            assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
            assert isinstance(busy.json()["error"], str)  # the v2 error format
        assert service.budget.in_use == resident
        served = _v2_infer(app, body)
        assert served.status_code == 200, served.text[:200]
        assert service.budget.in_use == resident
        assert np.allclose(session.predict_many(x), expected, atol=1e-2)


def _v2_json_body(session: ModelSession, x: np.ndarray) -> bytes:
    sample = preprocess(x[0], session.card.preprocessing, session.card.input_shape)
    (vectors,) = session.spec.input_encoding.units(sample[None])
    elements = [base64.b64encode(session.keys.encrypt(v)).decode() for v in vectors]
    tensor = {"name": "ciphertexts", "datatype": "BYTES", "shape": [len(elements)]}
    parameters = {"context_id": session.context_id, "plan": "batch"}
    return json.dumps({"inputs": [{**tensor, "data": elements}], "parameters": parameters}).encode()


def _v2_infer(app: Flask, body: bytes) -> httpx.Response:
    with httpx.Client(transport=httpx.WSGITransport(app=app)) as http:
        return http.post(f"http://testserver/v2/models/{MODEL}/infer", content=body)
