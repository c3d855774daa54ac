from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest
from flask import Flask
from PIL import Image

from clients import (
    BadRequestError,
    ContextNotFoundError,
    HEClient,
    KeySet,
    KeysTooLargeError,
    ModelSession,
    ParameterMismatchError,
    ServerError,
)
from clients._errors import error_from_response
from clients.cli import _print_prediction, load_sample
from he_service import create_app
from he_service.protocol import Task, decode_key_bundle


def test_saved_keys_reload_and_reuse_the_uploaded_context(
    client: HEClient, session: ModelSession, tmp_path: Path
) -> None:
    path = tmp_path / "keys.bin"
    session.save_keys(path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = client.model("mnist-cnn", keys=path)
    assert again.context_id == session.context_id  # same public keys: nothing re-uploaded
    x = np.zeros((1, 28, 28))
    ciphertext = again.encrypt(x)
    # Keys loaded from the file decrypt what the original session's keys encrypt.
    np.testing.assert_allclose(
        again.keys._decrypt_slots(session.keys.encrypt(np.ones(4096))).real[:4], 1.0, atol=1e-2
    )
    assert ciphertext


def test_public_context_never_holds_the_secret_key(session: ModelSession) -> None:
    bundle = decode_key_bundle(session.public_context())
    assert set(bundle.sections) == {"relin_keys", "galois_keys"}
    assert bundle.galois_steps == session.spec.galois_steps


def test_keys_for_other_parameters_are_refused_locally(client: HEClient) -> None:
    card = client.card("mnist-cnn")
    keys = KeySet.generate(card.plan("latency").ckks, ())
    with pytest.raises(ValueError, match="do not fit"):
        client.model("mnist-cnn", keys=keys)


def test_an_evicted_context_is_uploaded_again(
    client: HEClient, session: ModelSession, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    client.delete_context(session.context_id)
    images, labels = mnist_test_images
    assert int(np.argmax(session.predict(images[2]))) == labels[2]
    assert client.has_context(session.context_id)


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (400, {"error": {"code": "bad_request", "message": "m"}}, BadRequestError),
        (404, {"error": {"code": "context_not_found", "message": "m"}}, ContextNotFoundError),
        (409, {"error": {"code": "parameter_mismatch", "message": "m"}}, ParameterMismatchError),
        (502, "not json", ServerError),
    ],
)
def test_errors_map_to_sdk_classes(status: int, body: object, kind: type) -> None:
    error = error_from_response(status, body)
    assert isinstance(error, kind) and error.status == status


def test_load_sample_reads_png_resizes_and_npy(tmp_path: Path) -> None:
    Image.fromarray(np.full((56, 56), 200, dtype=np.uint8)).save(tmp_path / "big.png")
    image = load_sample(tmp_path / "big.png", (1, 28, 28))
    assert image.shape == (1, 28, 28) and abs(image.mean() - 200) < 1
    assert load_sample(tmp_path / "big.png", (1, 28, 28), invert=True).mean() < 56
    np.save(tmp_path / "x.npy", np.zeros(784))
    assert load_sample(tmp_path / "x.npy", (1, 28, 28)).shape == (1, 28, 28)
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(ValueError, match="holds 5 values"):
        load_sample(tmp_path / "bad.npy", (1, 28, 28))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_sample(tmp_path / "junk.png", (1, 28, 28))


# --- requests follow the card's byte limits ----------------------------------------------------


class _Recording(httpx.BaseTransport):
    """An in-process transport that records the size of every predict body."""

    def __init__(self, app: Flask) -> None:
        self._inner = httpx.WSGITransport(app=app)
        self.predict_bodies: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/predict"):
            self.predict_bodies.append(len(request.read()))
        return self._inner.handle_request(request)


def test_samples_per_request_follow_the_body_limit_and_predict_many_splits_by_bytes(
    mnist_test_images: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    limit = 2 << 20  # one mnist-cnn sample is up to 787 KB: two fit, three do not
    app = create_app({"max_predict_bytes": limit, "key_store_dir": tmp_path})
    transport = _Recording(app)
    with HEClient("http://testserver", transport=transport) as client:
        session = client.model("mnist-cnn")
        assert session.spec.limits.max_samples_per_request == 2  # not the configured 16
        assert session.spec.limits.max_request_bytes == limit
        assert client.card("breast-cancer-mlp").plan("latency").limits.max_samples_per_request == 10
        images, labels = mnist_test_images
        logits = session.predict_many(images[:5])
    assert len(transport.predict_bodies) == 3
    assert all(size <= limit for size in transport.predict_bodies)
    assert np.mean(logits.argmax(axis=1) == labels[:5]) >= 0.8


def test_keys_over_the_server_limit_are_refused_before_they_are_made(
    session: ModelSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app({"max_context_bytes": 8 << 20, "key_store_dir": tmp_path})
    with HEClient("http://testserver", transport=httpx.WSGITransport(app=app)) as client:
        card = client.card("mnist-cnn")
        latency = card.plan("latency")
        assert latency.costs.public_key_bytes > latency.limits.max_context_bytes == 8 << 20

        def no_keys(*_: object) -> KeySet:
            raise AssertionError("keys were generated")

        with monkeypatch.context() as patch:
            patch.setattr(KeySet, "generate", no_keys)
            with pytest.raises(
                KeysTooLargeError, match=r"needs \d+\.\d MiB of public keys"
            ) as info:
                client.model("mnist-cnn")
        message = str(info.value)
        assert "at most 8.0 MiB" in message and "plan='batch'" in message
        assert "HE_SERVICE_MAX_CONTEXT_BYTES" in message
        assert info.value.details == {"needed": latency.costs.public_key_bytes, "limit": 8 << 20}
        with pytest.raises(KeysTooLargeError):  # keys made before: refused before uploading
            client.model("mnist-cnn", keys=session.keys)
        assert client.model("mnist-cnn", plan="batch").context_id  # 1.3 MB of keys fit


# --- regression models -------------------------------------------------------------------------


def _as_regression(session: ModelSession) -> ModelSession:
    card = dataclasses.replace(session.card, task=Task.REGRESSION, labels=("low", "high"))
    return ModelSession(session.client, card, session.plan, session.keys)


@pytest.fixture(scope="module")
def breast(client: HEClient) -> ModelSession:
    return client.model("breast-cancer-mlp")


def test_classify_refuses_a_regression_model(breast: ModelSession) -> None:
    assert breast.classify(np.zeros(30)) in breast.card.labels
    with pytest.raises(ValueError, match="regression model: it predicts low, high"):
        _as_regression(breast).classify(np.zeros(30))


def test_cli_prints_values_with_names_for_regression_and_a_class_otherwise(
    breast: ModelSession, capsys: pytest.CaptureFixture[str]
) -> None:
    _print_prediction(_as_regression(breast), Path("x.npy"), np.array([1.5, -2.25]))
    out = capsys.readouterr().out
    assert "x.npy: predicted low = 1.5, high = -2.25" in out and "class" not in out
    _print_prediction(breast, Path("x.npy"), np.array([1.5, -2.25]))
    out = capsys.readouterr().out
    assert f"x.npy: predicted class {breast.card.labels[0]}" in out and "logits: 1.500" in out
