"""The app against its own OpenAPI document (``/v1/openapi.json``), with schemathesis in-process.

Generated requests (valid and schema-violating) must never get a server error, and every answer
must be documented: its status, content type, headers and body schema. The binary bodies of
contexts and ciphertexts cannot be generated validly from a schema, so a second test sends real
keys and ciphertexts and checks the documented success answers the same way.
"""

from __future__ import annotations

import base64
import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from clients import HEClient
from he_service import __version__, create_app
from he_service.config import Config
from he_service.openapi import openapi_document
from he_service.protocol import MEDIA_TYPE, encode_frames

# Ciphertexts and key bundles go on the wire as the bytes they are.
schemathesis.serializer.alias(MEDIA_TYPE, "application/octet-stream")

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
    unsupported_method,
]
# positive_data_acceptance is left out on purpose: a schema-valid binary body is random bytes,
# which the service must refuse with a 400.
EXAMPLES = 25
BREAST = "breast-cancer-mlp"


def _app_config(store_dir: Path) -> dict[str, object]:
    overrides: dict[str, object] = {"key_store_max_bytes": 1 << 30}
    if "key_store_dir" in {field.name for field in dataclasses.fields(Config)}:
        overrides["key_store_dir"] = store_dir  # never the user's cache directory
    return overrides


CASES: dict[str, Counter[int]] = defaultdict(Counter)  # answers per operation


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    lines = [
        f"{operation:<36} {sum(statuses.values()):>4}  {dict(sorted(statuses.items()))}"
        for operation, statuses in CASES.items()
    ]
    total = sum(sum(statuses.values()) for statuses in CASES.values())
    print(f"\nschemathesis cases ({total} in all)\n" + "\n".join(lines))


@pytest.fixture(scope="module")
def schema_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return create_app(_app_config(tmp_path_factory.mktemp("contexts")))


CONFIG = schemathesis.Config.from_dict(
    {"seed": 0, "generation": {"mode": "all", "max-examples": EXAMPLES, "deterministic": True}}
)
# The document is a pure function of the version, so the tests are collected without an app;
# test_the_served_document_is_the_one_tested checks that the app serves exactly this one.
schema = schemathesis.openapi.from_dict(openapi_document(__version__), config=CONFIG)


@pytest.fixture(scope="module")
def api_schema(schema_app: Flask) -> Any:
    return schemathesis.openapi.from_wsgi("/v1/openapi.json", schema_app, config=CONFIG)


def test_the_served_document_is_the_one_tested(schema_app: Flask) -> None:
    served = schema_app.test_client().get("/v1/openapi.json").get_json()
    assert served == openapi_document(__version__)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_generated_requests_get_documented_answers(
    case: schemathesis.Case, schema_app: Flask
) -> None:
    response = case.call_and_validate(app=schema_app, checks=CHECKS)
    CASES[f"{case.operation.method.upper()} {case.operation.path}"][response.status_code] += 1


@pytest.fixture(scope="module")
def he_client(schema_app: Flask) -> Iterator[HEClient]:
    transport = httpx.WSGITransport(app=schema_app)
    with HEClient("http://testserver", transport=transport) as client:
        yield client


def _call(api_schema: Any, path: str, method: str, status: int, **parts: Any) -> Any:
    case = api_schema[path][method].Case(**parts)
    response = case.call_and_validate(checks=CHECKS)
    assert response.status_code == status, response.text[:300]
    return response


def test_documented_success_answers_conform(api_schema: Any, he_client: HEClient) -> None:
    session = he_client.model(BREAST)
    context_id = session.context_id
    public = session.public_context()
    _call(api_schema, "/v1/health", "GET", 200)
    _call(api_schema, "/v1/models", "GET", 200)
    _call(api_schema, "/v1/models/{name}", "GET", 200, path_parameters={"name": BREAST})
    _call(api_schema, "/v1/openapi.json", "GET", 200)
    _call(api_schema, "/v1/contexts", "POST", 200, body=public, media_type=MEDIA_TYPE)
    _call(
        api_schema,
        "/v1/contexts/{context_id}",
        "HEAD",
        200,
        path_parameters={"context_id": context_id},
    )
    body = encode_frames(session.encrypt(np.zeros(30)))
    response = _call(
        api_schema,
        "/v1/models/{name}/predict",
        "POST",
        200,
        path_parameters={"name": BREAST},
        query={"plan": "latency"},
        headers={"X-Context-Id": context_id},
        body=body,
        media_type=MEDIA_TYPE,
    )
    assert "affine;dur=" in response.headers["server-timing"][0]
    _call(api_schema, "/v2/health/live", "GET", 200)
    _call(api_schema, "/v2/health/ready", "GET", 200)
    name = {"path_parameters": {"name": BREAST}}
    _call(api_schema, "/v2/models/{name}", "GET", 200, **name)
    _call(api_schema, "/v2/models/{name}/ready", "GET", 200, **name)
    ciphertexts = session.encrypt(np.zeros(30))
    tensor = {"name": "ciphertexts", "datatype": "BYTES", "shape": [len(ciphertexts)]}
    infer = {
        "inputs": [{**tensor, "data": [base64.b64encode(c).decode() for c in ciphertexts]}],
        "parameters": {"context_id": context_id},
    }
    response = _call(api_schema, "/v2/models/{name}/infer", "POST", 200, **name, body=infer)
    assert response.json()["outputs"][0]["shape"] == [1]
    uploads = {"path_parameters": {"name": BREAST}, "headers": {"X-Context-Id": context_id}}
    created = _call(api_schema, "/v1/models/{name}/uploads", "POST", 201, **uploads)
    upload = {"upload_id": created.json()["upload_id"]}
    _call(
        api_schema,
        "/v1/uploads/{upload_id}/parts/{index}",
        "PUT",
        200,
        path_parameters={**upload, "index": 0},
        body=body,
        media_type=MEDIA_TYPE,
    )
    response = _call(
        api_schema, "/v1/uploads/{upload_id}/predict", "POST", 200, path_parameters=upload
    )
    assert "affine;dur=" in response.headers["server-timing"][0]
    created = _call(api_schema, "/v1/models/{name}/uploads", "POST", 201, **uploads)
    upload = {"upload_id": created.json()["upload_id"]}
    _call(api_schema, "/v1/uploads/{upload_id}", "DELETE", 204, path_parameters=upload)
    _call(api_schema, "/v1/uploads/{upload_id}", "DELETE", 404, path_parameters=upload)
    ids = {"context_id": context_id}
    _call(api_schema, "/v1/contexts/{context_id}", "DELETE", 204, path_parameters=ids)
    _call(api_schema, "/v1/contexts/{context_id}", "HEAD", 404, path_parameters=ids)
    _call(api_schema, "/v1/contexts/{context_id}", "DELETE", 404, path_parameters=ids)
    _call(api_schema, "/v1/contexts", "POST", 201, body=public, media_type=MEDIA_TYPE)
