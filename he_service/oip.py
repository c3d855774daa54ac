"""The Open Inference Protocol (KServe v2) codec for the ``/v2`` routes: no Flask, no engine.

An infer request carries one ``BYTES`` tensor, one element per input ciphertext, either in
JSON (each element a base64 string) or with Triton's binary-data extension: the
``Inference-Header-Content-Length`` header gives the size of the JSON header, and the tensor's
``parameters.binary_data_size`` bytes follow it, each element a 4-byte little-endian length
then its bytes. ``parameters.context_id`` names the uploaded context and ``parameters.plan``
the plan, as ``X-Context-Id`` and ``?plan=`` do for v1. The answer carries the output
ciphertexts the same way, in binary when the request asks for binary outputs.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass
from typing import Any

from he_service.protocol import ProtocolError
from he_service.protocol.card import ModelCard

__all__ = [
    "HEADER_LENGTH",
    "TENSOR",
    "InferRequest",
    "encode_infer_response",
    "model_metadata",
    "parse_infer_request",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
TENSOR = "ciphertexts"  # the name of the one input and the one output tensor
PLATFORM = "he-inference-ckks"
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class InferRequest:
    """What the ``/v2`` infer route needs from a request."""

    request_id: str | None
    context_id: str
    plan: str | None
    ciphertexts: list[bytes]
    binary_output: bool


def model_metadata(card: ModelCard) -> dict[str, Any]:
    """Return the v2 metadata of a model: one ``BYTES`` tensor in, one out, and card essentials."""
    tensor = {"name": TENSOR, "datatype": "BYTES", "shape": [-1]}
    return {
        "name": card.name,
        "versions": ["1"],
        "platform": PLATFORM,
        "inputs": [tensor],
        "outputs": [tensor],
        "parameters": {
            "card": f"/v1/models/{card.name}",
            "description": card.description,
            "input_shape": list(card.input_shape),
            "task": card.task.value,
            "labels": list(card.labels),
            "plans": sorted(kind.value for kind in card.plans),
        },
    }


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse an infer request whose size the route has already bounded.

    Args:
        body: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` header, if any.

    Returns:
        The request's ciphertexts and parameters.

    Raises:
        ProtocolError: not the protocol's JSON, not one 1-D ``BYTES`` tensor, elements that
            do not match the shape, or a missing ``context_id`` parameter.
    """
    header, binary = _split(body, header_length)
    try:
        document = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"the request is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError("the request is a JSON object with an 'inputs' list")
    parameters = _object(document.get("parameters"), "parameters")
    context_id = parameters.get("context_id")
    if not isinstance(context_id, str) or not context_id:
        raise ProtocolError(
            "missing parameters.context_id: upload keys with POST /v1/contexts and pass its id"
        )
    plan = parameters.get("plan")
    if plan is not None and not isinstance(plan, str):
        raise ProtocolError("parameters.plan is a string: 'latency' or 'batch'")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise ProtocolError(f"'inputs' is a list of one tensor, {TENSOR!r} (BYTES)")
    ciphertexts = _tensor_elements(_object(inputs[0], "inputs[0]"), binary)
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("the request's id is a string")
    return InferRequest(
        request_id=request_id,
        context_id=context_id,
        plan=plan,
        ciphertexts=ciphertexts,
        binary_output=_binary_output(document, parameters),
    )


def encode_infer_response(
    model: str, request_id: str | None, outputs: list[bytes], *, binary: bool
) -> tuple[bytes, int | None]:
    """Return the body of an infer answer and its JSON header's length (``None``: all JSON)."""
    tensor: dict[str, Any] = {"name": TENSOR, "datatype": "BYTES", "shape": [len(outputs)]}
    document: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": [tensor]}
    if request_id is not None:
        document["id"] = request_id
    if not binary:
        tensor["data"] = [base64.b64encode(item).decode("ascii") for item in outputs]
        return json.dumps(document).encode(), None
    data = b"".join(_LENGTH.pack(len(item)) + item for item in outputs)
    tensor["parameters"] = {"binary_data_size": len(data)}
    header = json.dumps(document).encode()
    return header + data, len(header)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
        raise ProtocolError(
            f"{HEADER_LENGTH} is the byte length of the JSON header, at most the body's "
            f"{len(body)} bytes"
        )
    size = int(header_length)
    return body[:size], body[size:]


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is a JSON object")
    return value


def _tensor_elements(tensor: dict[str, Any], binary: bytes) -> list[bytes]:
    """Return the elements of the input tensor, from its JSON data or the binary section."""
    if tensor.get("name") != TENSOR:
        raise ProtocolError(f"the input tensor is named {TENSOR!r}, not {tensor.get('name')!r}")
    if tensor.get("datatype") != "BYTES":
        raise ProtocolError(
            f"the input tensor's datatype is BYTES (one element per ciphertext), not "
            f"{str(tensor.get('datatype'))[:20]!r}"
        )
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or not isinstance(shape[0], int)
        or shape[0] < 1
    ):
        raise ProtocolError("the input tensor's shape is [n], n >= 1 ciphertexts")
    count = shape[0]
    size = _object(tensor.get("parameters"), "inputs[0].parameters").get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError("binary data follows the JSON header but no tensor declares it")
        elements = _base64_elements(tensor.get("data"))
    else:
        if not isinstance(size, int) or size != len(binary):
            raise ProtocolError(
                f"binary_data_size is the {len(binary)} bytes after the JSON header"
            )
        elements = _binary_elements(binary)
    if len(elements) != count:
        raise ProtocolError(f"the input tensor's shape is [{count}] but it holds {len(elements)}")
    return elements


def _base64_elements(data: Any) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ProtocolError("the input tensor's data is a list of base64 strings, or binary")
    try:
        return [base64.b64decode(item, validate=True) for item in data]
    except binascii.Error:
        raise ProtocolError("an element of the input tensor is not base64") from None


def _binary_elements(data: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise ProtocolError("the binary tensor data ends inside an element's length")
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            raise ProtocolError("the binary tensor data ends inside an element")
        elements.append(data[offset : offset + size])
        offset += size
    return elements


def _binary_output(document: dict[str, Any], parameters: dict[str, Any]) -> bool:
    """Whether the answer's tensor goes in binary (Triton's request or output parameter)."""
    if parameters.get("binary_data_output") is True:
        return True
    outputs = document.get("outputs")
    if not isinstance(outputs, list):
        return False
    return any(
        isinstance(output, dict)
        and _object(output.get("parameters"), "outputs[].parameters").get("binary_data") is True
        for output in outputs
    )
