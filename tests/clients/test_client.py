from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import (
    BadRequestError,
    ContextNotFoundError,
    HEClient,
    KeySet,
    ModelSession,
    ParameterMismatchError,
    ServerError,
)
from clients._errors import error_from_response
from clients.cli import load_sample
from he_service.protocol import decode_key_bundle


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
        again.keys.decrypt(session.keys.encrypt(np.ones(4096)))[:4], 1.0, atol=1e-2
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
