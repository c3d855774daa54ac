"""The Open Inference Protocol routes (``/v2``), driven by Triton's own HTTP client.

The real ``he-service serve`` (waitress behind the front) serves breast-cancer-mlp on
loopback; ``tritonclient.http`` reads health and metadata and runs encrypted inferences with
ciphertexts as BYTES tensors, in JSON (base64) and with the binary-data extension. The answers
must be the very ciphertexts v1 answers for the same input.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from clients import HEClient, ModelSession
from clients._release import release
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.oip import parse_infer_request
from he_service.protocol import ProtocolError, preprocess
from models.datasets import load_breast_cancer_split
from tests.load_client import BREAST, ServedProcess, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    served = start_server(tmp_path_factory.mktemp("oip"), workers=None, models=(BREAST,))
    try:
        yield served
    finally:
        served.stop()
    assert not served.server_errors(), served.server_errors()


@pytest.fixture(scope="module")
def client(server: ServedProcess) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="module")
def session(server: ServedProcess) -> Iterator[ModelSession]:
    with HEClient(server.url) as he_client:
        yield he_client.model(BREAST)


def _bytes_input(ciphertexts: list[bytes], *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("ciphertexts", [len(ciphertexts)], "BYTES")
    # Without the binary extension, BYTES elements travel as JSON strings: base64 here.
    items = ciphertexts if binary else [base64.b64encode(c) for c in ciphertexts]
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_), binary_data=binary)
    return tensor


def _infer(
    client: triton.InferenceServerClient,
    ciphertexts: list[bytes],
    parameters: dict[str, str],
    *,
    binary_in: bool = True,
    binary_out: bool = True,
) -> list[bytes]:
    result = client.infer(
        BREAST,
        [_bytes_input(ciphertexts, binary=binary_in)],
        outputs=[triton.InferRequestedOutput("ciphertexts", binary_data=binary_out)],
        parameters=parameters,
    )
    answer = result.as_numpy("ciphertexts")
    assert answer is not None
    if binary_out:
        return [bytes(item) for item in answer]
    return [base64.b64decode(item) for item in answer]


def test_health_metadata_and_readiness(
    client: triton.InferenceServerClient, session: ModelSession
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(BREAST)
    assert not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata(BREAST)
    assert metadata["name"] == BREAST
    assert metadata["inputs"] == [{"name": "ciphertexts", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == metadata["inputs"]
    parameters = metadata["parameters"]
    assert parameters["card"] == f"/v1/models/{BREAST}"
    assert parameters["input_shape"] == list(session.card.input_shape)
    assert parameters["labels"] == list(session.card.labels)
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("no-such-model")
    assert unknown.value.status() == "404"
    assert BREAST in str(unknown.value.message())


@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False)])
def test_encrypted_inference_answers_as_v1(
    client: triton.InferenceServerClient,
    session: ModelSession,
    binary_in: bool,
    binary_out: bool,
) -> None:
    raw = load_breast_cancer_split(0).x_test[:2]
    artifact = load_artifact(DEFAULT_MODELS_DIR / BREAST)
    spec = session.spec
    for x in raw:
        ciphertexts = session.encrypt(x)
        v1, _ = session.client.predict_raw(BREAST, session.context_id, ciphertexts)
        v2 = _infer(
            client,
            ciphertexts,
            {"context_id": session.context_id, "plan": "latency"},
            binary_in=binary_in,
            binary_out=binary_out,
        )
        assert v2 == v1  # the same evaluation of the same ciphertexts
        released = release(session.keys, v2, spec.output_decoding, 1, spec.output_precision)[0]
        plain = forward_plain(artifact, preprocess(x, artifact.preprocessing, (30,)))
        np.testing.assert_allclose(released, plain, atol=2 * spec.output_precision)


def test_a_batch_group_through_v2_answers_as_v1(
    client: triton.InferenceServerClient, server: ServedProcess
) -> None:
    raw = load_breast_cancer_split(0).x_test[:20]
    artifact = load_artifact(DEFAULT_MODELS_DIR / BREAST)
    prepared = np.stack([preprocess(x, artifact.preprocessing, (30,)) for x in raw])
    with HEClient(server.url) as he_client:
        batch = he_client.model(BREAST, plan="batch")
        spec = batch.spec
        (vectors,) = spec.input_encoding.units(prepared)
        ciphertexts = [batch.keys.encrypt(v) for v in vectors]
        v1, _ = he_client.predict_raw(BREAST, batch.context_id, ciphertexts, plan="batch")
    parameters = {"context_id": batch.context_id, "plan": "batch"}
    v2 = _infer(client, ciphertexts, parameters)
    assert v2 == v1
    released = release(batch.keys, v2, spec.output_decoding, len(raw), spec.output_precision)
    plain = np.stack([forward_plain(artifact, x) for x in prepared])
    np.testing.assert_allclose(released, plain, atol=2 * spec.output_precision)
    partial = _refused(client, ciphertexts[:-1], parameters)
    assert (partial.status(), "per group" in str(partial.message())) == ("400", True)


def _refused(
    client: triton.InferenceServerClient, ciphertexts: list[bytes], parameters: dict[str, str]
) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        _infer(client, ciphertexts, parameters)
    assert isinstance(refused.value.message(), str)  # {"error": "..."}, the protocol's format
    return refused.value


def test_bad_inferences_get_protocol_errors(
    client: triton.InferenceServerClient, session: ModelSession, server: ServedProcess
) -> None:
    ciphertexts = session.encrypt(np.zeros(30))
    context = {"context_id": session.context_id}
    missing = _refused(client, ciphertexts, {})
    assert (missing.status(), "context_id" in str(missing.message())) == ("400", True)
    unknown = _refused(client, ciphertexts, {"context_id": "0" * 64})
    assert unknown.status() == "404"
    plan = _refused(client, ciphertexts, {**context, "plan": "fastest"})
    assert plan.status() == "400"
    garbage = _refused(client, [b"not a ciphertext"], context)
    assert garbage.status() == "400"

    floats = triton.InferInput("ciphertexts", [1], "FP32")
    floats.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException) as datatype:
        client.infer(BREAST, [floats], parameters=context)
    assert (datatype.value.status(), "BYTES" in str(datatype.value.message())) == ("400", True)
    with pytest.raises(InferenceServerException) as model:
        client.infer("no-such-model", [_bytes_input(ciphertexts, binary=True)], parameters=context)
    assert model.value.status() == "404"

    # What tritonclient cannot send: JSON that contradicts itself.
    element = base64.b64encode(ciphertexts[0]).decode()
    tensor = {"name": "ciphertexts", "datatype": "BYTES", "shape": [2], "data": [element]}
    bad = {
        "shape": {"inputs": [tensor], "parameters": context},
        "base64": {"inputs": [{**tensor, "shape": [1], "data": ["%%"]}], "parameters": context},
        "rank": {"inputs": [{**tensor, "shape": [1, 1]}], "parameters": context},
        "inputs": {"inputs": [], "parameters": context},
    }
    url = f"{server.url}/v2/models/{BREAST}/infer"
    for case, body in bad.items():
        answer = httpx.post(url, content=json.dumps(body))
        assert answer.status_code == 400, case
        assert isinstance(answer.json()["error"], str), case
    header = httpx.post(url, content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert (header.status_code, "Inference-Header-Content-Length" in header.json()["error"]) == (
        400,
        True,
    )


def test_an_oversized_body_is_refused_before_it_is_read(
    server: ServedProcess, session: ModelSession
) -> None:
    limit = max(session.card.plan(kind).limits.max_request_bytes for kind in ("latency", "batch"))
    port = int(server.url.rsplit(":", 1)[1])
    head = (
        f"POST /v2/models/{BREAST}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode())  # no body: the answer comes from the headers alone
        answer = b""
        while chunk := sock.recv(65536):  # the server closes after the answer
            answer += chunk
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert isinstance(json.loads(body)["error"], str)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_TENSORISH = st.fixed_dictionaries(
    {
        "inputs": st.lists(
            st.dictionaries(
                st.sampled_from(["name", "datatype", "shape", "data", "parameters"]), _JSON
            ),
            max_size=2,
        ),
        "parameters": _JSON,
        "id": _JSON,
    }
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.one_of(st.binary(max_size=256), _TENSORISH.map(lambda d: json.dumps(d).encode())),
    st.binary(max_size=64),
    st.one_of(st.none(), st.text(max_size=4)),
)
@example(b"{}", b"", "\u00b2")  # a digit to str.isdigit, not to int
def test_the_parser_refuses_anything_malformed_with_a_protocol_error(
    header: bytes, binary: bytes, header_length: str | None
) -> None:
    try:
        request = parse_infer_request(header + binary, header_length)
    except ProtocolError:
        return
    assert isinstance(request.context_id, str) and request.ciphertexts
