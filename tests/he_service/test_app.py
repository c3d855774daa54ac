"""The HTTP API in-process: happy path, then every kind of bad input, then a good request."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flask import Flask

from clients import (
    BadRequestError,
    ContextNotFoundError,
    HEClient,
    KeySet,
    ModelNotFoundError,
    ModelSession,
    NotFoundError,
    ParameterMismatchError,
    PayloadTooLargeError,
)
from he_service import create_app
from he_service.protocol import (
    CkksParams,
    GatherEncoding,
    ModelCard,
    PlanCard,
    PlanKind,
    PrefixDecoding,
    Task,
    decode_key_bundle,
    encode_frames,
    encode_key_bundle,
)


def _json_error(app: Flask, method: str, path: str, status: int, **kwargs: object) -> dict:
    response = app.test_client().open(path, method=method, **kwargs)
    assert response.status_code == status, response.data[:300]
    body = response.get_json()
    assert set(body["error"]) >= {"code", "message"}
    assert "Traceback" not in response.get_data(as_text=True)
    return body["error"]


def test_health_lists_the_shipped_model(client: HEClient) -> None:
    health = client.health()
    assert health["status"] == "ok" and "mnist-cnn" in health["models"]


def test_card_describes_parameters_and_encodings(client: HEClient) -> None:
    card = client.card("mnist-cnn")
    assert card.input_shape == (1, 28, 28)
    latency = card.plan("latency")
    assert latency.ckks.poly_modulus_degree == 8192
    assert isinstance(latency.input_encoding, GatherEncoding)
    assert latency.input_encoding.ciphertexts == 4
    assert isinstance(latency.output_decoding, PrefixDecoding)
    assert latency.galois_steps and all(0 < s < 4096 for s in latency.galois_steps)
    assert "reason" in latency.details["parameters"]
    assert card.task is Task.CLASSIFICATION
    # What the client pays, before it pays it.
    assert latency.costs.galois_keys == len(latency.galois_steps)
    assert latency.costs.public_key_bytes == latency.details["public_key_bytes"]
    assert latency.costs.request_bytes_per_unit == latency.details["request_bytes_per_sample"]
    assert latency.costs.rotations == latency.details["rotations"] > 0
    assert latency.limits.max_context_bytes == 128 << 20
    assert latency.limits.max_request_bytes == 16 << 20


def test_card_round_trips_through_json(client: HEClient) -> None:
    card = client.card("mnist-cnn")
    assert ModelCard.from_json(card.to_json()) == card
    for kind in (PlanKind.LATENCY, PlanKind.BATCH):
        assert PlanCard.from_json(card.plan(kind).to_json()) == card.plan(kind)


def test_openapi_lists_every_route(app: Flask) -> None:
    doc = app.test_client().get("/v1/openapi.json").get_json()
    assert set(doc["paths"]) == {
        "/v1/health",
        "/v1/models",
        "/v1/models/{name}",
        "/v1/contexts",
        "/v1/contexts/{context_id}",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/uploads",
        "/v1/uploads/{upload_id}/parts/{index}",
        "/v1/uploads/{upload_id}/predict",
        "/v1/uploads/{upload_id}",
        "/v1/openapi.json",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
    }


def test_context_id_is_sha256_and_reupload_is_free(client: HEClient, session: ModelSession) -> None:
    data = session.public_context()
    assert session.context_id == hashlib.sha256(data).hexdigest()
    assert client.has_context(session.context_id)
    assert client.upload_context(data) == session.context_id  # 200, already stored


def test_prediction_has_server_timing_and_matches_plaintext(
    session: ModelSession, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_test_images
    logits = session.predict(images[0])
    assert logits.shape == (10,)
    assert {"encrypt", "request", "server_affine", "server_activation", "decrypt"} <= set(
        session.last_timings
    )
    assert int(np.argmax(logits)) == labels[0]


@pytest.mark.parametrize("body", [b"", b"\x00" * 10, np.random.default_rng(0).bytes(5000)])
def test_garbage_contexts_get_400(app: Flask, body: bytes) -> None:
    error = _json_error(app, "POST", "/v1/contexts", 400, data=body)
    assert error["code"] == "bad_request"


def test_truncated_context_gets_400(client: HEClient, session: ModelSession) -> None:
    data = session.public_context()
    with pytest.raises(BadRequestError, match="truncated"):
        client.upload_context(data[: len(data) // 2])


def test_context_with_a_secret_key_is_refused(client: HEClient, session: ModelSession) -> None:
    from he_service.protocol import save_seal

    bundle = decode_key_bundle(session.public_context())
    sections = {**bundle.sections, "secret_key": save_seal(session.keys.secret_key)}
    leaky = encode_key_bundle(type(bundle)(bundle.params, bundle.galois_steps, sections))
    with pytest.raises(BadRequestError, match="secret key.*public context") as info:
        client.upload_context(leaky)
    assert info.value.status == 400


def test_context_for_other_parameters_gets_409(client: HEClient) -> None:
    keys = KeySet.generate(CkksParams(4096, (39, 30, 39), 30), ())
    with pytest.raises(ParameterMismatchError, match="no served model uses") as info:
        client.upload_context(keys.public_context)
    assert info.value.status == 409


def test_context_lacking_galois_steps_gets_409_naming_them(
    client: HEClient, session: ModelSession, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    steps = session.spec.galois_steps
    partial = KeySet.generate(session.spec.ckks, steps[:-2])
    context_id = client.upload_context(partial.public_context)
    ciphertext = partial.encrypt(np.zeros(session.spec.ckks.slot_count))
    with pytest.raises(ParameterMismatchError, match="Galois") as info:
        client.predict_raw("mnist-cnn", context_id, [ciphertext] * 4)
    assert info.value.details["missing"] == list(steps[-2:])
    client.delete_context(context_id)


def test_unknown_model_and_context_get_404(client: HEClient, session: ModelSession) -> None:
    served = ", ".join(sorted(m["name"] for m in client.models()))
    with pytest.raises(ModelNotFoundError, match=f"served models: {served}"):
        client.card("nope")
    with pytest.raises(ModelNotFoundError):
        client.predict_raw("nope", session.context_id, [b"x"])
    with pytest.raises(ContextNotFoundError):
        client.predict_raw("mnist-cnn", "0" * 64, session.encrypt(np.zeros((1, 28, 28))))
    assert not client.has_context("0" * 64)
    with pytest.raises(NotFoundError):
        client.delete_context("0" * 64)


def test_bad_context_header_gets_400(app: Flask) -> None:
    _json_error(app, "POST", "/v1/models/mnist-cnn/predict", 400, data=b"x")
    _json_error(
        app,
        "POST",
        "/v1/models/mnist-cnn/predict",
        400,
        data=b"x",
        headers={"X-Context-Id": "../../etc"},
    )


@pytest.mark.parametrize("streamed", [True, False], ids=["terminated-input", "bounded-stream"])
@pytest.mark.parametrize(
    "kind",
    ["empty", "random", "random-frame", "truncated", "trailing", "huge-item", "no-items"],
)
def test_garbage_ciphertexts_get_400(
    app: Flask, session: ModelSession, kind: str, streamed: bool
) -> None:
    # The body is read frame by frame: from the server's input as it is when the server says
    # the input ends there (the real front), else through werkzeug's length-bounded stream.
    good = session.encrypt(np.zeros((1, 28, 28)))
    huge = bytearray(encode_frames(good))
    huge[8:16] = (1 << 40).to_bytes(8, "little")  # the first item declares a terabyte
    body = {
        "empty": b"",
        "random": np.random.default_rng(1).bytes(3000),
        "random-frame": encode_frames([np.random.default_rng(2).bytes(3000)] * 4),
        "truncated": encode_frames(good)[: len(good[0]) // 2],
        "trailing": encode_frames(good) + b"\0" * 7,
        "huge-item": bytes(huge),
        "no-items": encode_frames([]),
    }[kind]
    error = _json_error(
        app,
        "POST",
        "/v1/models/mnist-cnn/predict",
        400,
        data=body,
        headers={"X-Context-Id": session.context_id},
        environ_overrides={"wsgi.input_terminated": True} if streamed else {},
    )
    assert error["code"] == "bad_request"


def _raw_predict(app: Flask, session: ModelSession, frames: list[bytes]) -> dict:
    return _json_error(
        app,
        "POST",
        "/v1/models/mnist-cnn/predict",
        400,
        data=encode_frames(frames),
        headers={"X-Context-Id": session.context_id},
    )


def test_wrong_count_slot_count_scale_and_level_get_400(app: Flask, session: ModelSession) -> None:
    good = session.encrypt(np.zeros((1, 28, 28)))
    error = _raw_predict(app, session, good[:3])
    assert "takes 4 ciphertexts per sample; got 3" in error["message"]
    small = KeySet.generate(CkksParams(4096, (39, 30, 39), 30), ())
    error = _raw_predict(app, session, [small.encrypt(np.zeros(2048))] * 4)
    assert "not valid for the model's CKKS parameters" in error["message"]

    import tenseal.sealapi as seal

    from he_service.protocol import save_seal, seal_context

    context = seal_context(session.spec.ckks)
    plain = seal.Plaintext()
    seal.CKKSEncoder(context).encode([0.5] * 16, session.spec.ckks.scale * 4, plain)
    ct = seal.Ciphertext()
    seal.Encryptor(context, session.keys.secret_key).encrypt_symmetric(plain, ct)
    assert "scale" in _raw_predict(app, session, [save_seal(ct)] * 4)["message"]
    seal.CKKSEncoder(context).encode([0.5] * 16, session.spec.ckks.scale, plain)
    seal.Encryptor(context, session.keys.secret_key).encrypt_symmetric(plain, ct)
    seal.Evaluator(context).mod_switch_to_next_inplace(ct)
    assert "wrong level" in _raw_predict(app, session, [save_seal(ct)] * 4)["message"]


def test_too_many_samples_get_413(client: HEClient, session: ModelSession) -> None:
    one = session.encrypt(np.zeros((1, 28, 28)))
    limit = session.spec.limits.max_samples_per_request
    with pytest.raises(PayloadTooLargeError, match=f"limit of {limit} samples"):
        client.predict_raw("mnist-cnn", session.context_id, one * (limit + 1))


def test_unknown_plan_gets_400(app: Flask, session: ModelSession) -> None:
    error = _json_error(
        app,
        "POST",
        "/v1/models/mnist-cnn/predict?plan=fastest",
        400,
        data=b"x",
        headers={"X-Context-Id": session.context_id},
    )
    assert "not 'fastest'" in error["message"]


def test_bodies_over_the_limit_get_413_before_parsing() -> None:
    # One mnist-cnn sample is up to 787 KB: a 1 MiB predict body still holds one.
    small = create_app({"max_context_bytes": 1000, "max_predict_bytes": 1 << 20})
    error = _json_error(small, "POST", "/v1/contexts", 413, data=b"\x00" * 2000)
    assert error["limit"] == 1000
    error = _json_error(
        small,
        "POST",
        "/v1/models/mnist-cnn/predict",
        413,
        data=b"\x00" * (2 << 20),
        headers={"X-Context-Id": "0" * 64},
    )
    assert error["limit"] == 1 << 20


def test_unknown_routes_and_methods_get_json_errors(app: Flask) -> None:
    assert _json_error(app, "GET", "/v1/nope", 404)["code"] == "not_found"
    assert _json_error(app, "PUT", "/v1/health", 405)["code"] == "method_not_allowed"


def test_server_still_serves_after_all_bad_input(
    session: ModelSession, mnist_test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = mnist_test_images
    # Runs last in this module (pytest keeps file order): a good request still succeeds.
    assert int(np.argmax(session.predict(images[1]))) == labels[1]
