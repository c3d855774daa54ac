"""The Open Inference Protocol (``/v2``) part of the OpenAPI document (``he_service.openapi``)."""

from __future__ import annotations

from typing import Any

from he_service.oip import HEADER_LENGTH, TENSOR

__all__ = ["V2_ERROR", "V2_ERROR_RESPONSE", "V2_PATHS"]

# The protocol's error format, for every answer of a /v2 route that is not a success.
V2_ERROR = {"$ref": "#/components/responses/V2Error"}
V2_ERROR_RESPONSE = {
    "description": "error (Open Inference Protocol format)",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_TENSOR_META = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
    },
}
_FLAG = {
    "application/json": {
        "schema": {
            "type": "object",
            "additionalProperties": {"type": ["boolean", "string"]},
        }
    }
}
_METADATA = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _TENSOR_META},
                "outputs": {"type": "array", "items": _TENSOR_META},
                # The card's essentials; parameters.card is the path of the full v1 card.
                "parameters": {"type": "object"},
            },
        }
    }
}
_INPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": [TENSOR]},
        "datatype": {"type": "string", "enum": ["BYTES"]},
        "shape": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 1,
            "maxItems": 1,
        },
        # Base64 of each ciphertext, unless parameters.binary_data_size says the data follows
        # the JSON header (the binary-data extension).
        "data": {"type": "array", "items": {"type": "string"}},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs", "parameters"],
    "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": _INPUT, "minItems": 1, "maxItems": 1},
        "outputs": {"type": "array", "items": {"type": "object"}},
        "parameters": {
            "type": "object",
            "required": ["context_id"],
            "properties": {
                "context_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "plan": {"type": "string", "enum": ["latency", "batch"]},
                "binary_data_output": {"type": "boolean"},
            },
        },
    },
}
_INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}
_INFER_DESCRIPTION = (
    "One BYTES tensor named ciphertexts, one element per input ciphertext (whole units of the "
    "plan, as for /v1/models/{name}/predict), base64 in JSON or, with the binary-data "
    f"extension, after a JSON header of {HEADER_LENGTH} bytes, each element a 4-byte "
    "little-endian length then its bytes. parameters.context_id names the uploaded context, "
    "parameters.plan the plan (latency by default). The answer carries the output "
    "ciphertexts the same way, in binary when the request sets parameters.binary_data_output "
    "or an output's parameters.binary_data. The body counts against the plan's "
    "limits.max_request_bytes."
)
_ANSWERS = {"400": V2_ERROR, "404": V2_ERROR}

V2_PATHS: dict[str, Any] = {
    "/v2/health/live": {
        "get": {
            "summary": "Open Inference Protocol: is the server live?",
            "responses": {"200": {"description": "live", "content": _FLAG}},
        }
    },
    "/v2/health/ready": {
        "get": {
            "summary": "Open Inference Protocol: are the models and the key store ready?",
            "responses": {
                "200": {"description": "ready", "content": _FLAG},
                "503": {"description": "not ready", "content": _FLAG},
            },
        }
    },
    "/v2/models/{name}": {
        "get": {
            "summary": "Open Inference Protocol: model metadata (the card's essentials)",
            "parameters": [_NAME],
            "responses": {"200": {"description": "metadata", "content": _METADATA}, **_ANSWERS},
        }
    },
    "/v2/models/{name}/ready": {
        "get": {
            "summary": "Open Inference Protocol: is this model ready?",
            "parameters": [_NAME],
            "responses": {"200": {"description": "ready", "content": _FLAG}, **_ANSWERS},
        }
    },
    "/v2/models/{name}/infer": {
        "post": {
            "summary": "Open Inference Protocol: evaluate the model on input ciphertexts",
            "description": _INFER_DESCRIPTION,
            "parameters": [_NAME],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _INFER_REQUEST}},
            },
            "responses": {
                "200": {
                    "description": "output ciphertexts, in the order of the units",
                    "headers": {"Server-Timing": {"schema": {"type": "string"}}},
                    "content": {
                        "application/json": {"schema": _INFER_RESPONSE},
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        },
                    },
                },
                **_ANSWERS,
                "409": V2_ERROR,
                "413": V2_ERROR,
                "503": V2_ERROR,
            },
        }
    },
}
