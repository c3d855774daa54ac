"""The OpenAPI 3.1 document of HTTP API v1 and of the v2 routes (served at ``/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from he_service.openapi_v2 import V2_ERROR, V2_ERROR_RESPONSE, V2_PATHS
from he_service.protocol import MEDIA_TYPE

__all__ = ["PUBLIC_PATHS", "openapi_document"]

# Routes anyone may call, with or without a token (load balancers and orchestrators probe them).
PUBLIC_PATHS = frozenset({"/v1/health", "/v2/health/live", "/v2/health/ready"})

_ERROR = {"$ref": "#/components/responses/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_CONTEXT = {
    "name": "context_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}
_UPLOAD_ID = {
    "name": "upload_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}
_PLAN = {
    "name": "plan",
    "in": "query",
    "required": False,
    "description": "latency (default): one sample per unit of the card's ciphertexts; batch: "
    "one sample per slot, one ciphertext per feature per group of samples",
    "schema": {"type": "string", "enum": ["latency", "batch"]},
}
_CONTEXT_HEADER = {
    "name": "X-Context-Id",
    "in": "header",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}
_BINARY = {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}
_FRAMES = {
    "description": "framed output ciphertexts, in the order of the units",
    "headers": {"Server-Timing": {"schema": {"type": "string"}}},
    "content": _BINARY,
}
_UPLOAD = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": [
                "upload_id",
                "expires_at",
                "parts",
                "ciphertexts",
                "max_ciphertexts",
                "max_part_bytes",
            ],
            "properties": {
                "upload_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "expires_at": {"type": "string", "format": "date-time"},
                "parts": {"type": "integer", "minimum": 0},
                "ciphertexts": {"type": "integer", "minimum": 0},
                "max_ciphertexts": {"type": "integer", "minimum": 1},
                "max_part_bytes": {"type": "integer", "minimum": 1},
            },
        }
    }
}
_UPLOADS_DESCRIPTION = (
    "A request whose ciphertexts exceed one body (a batch group of a large model) is sent in "
    "parts: open an upload for the model, plan and context; PUT its framed ciphertexts as "
    "parts numbered from 0 without gaps (each at most the card's limits.max_part_bytes; "
    "sending a part again replaces it); then POST .../predict, which evaluates the parts' "
    "ciphertexts in order, answers like /v1/models/{name}/predict and deletes the upload. "
    "Parts are staged beside the contexts (disk or Redis), shared by every worker; an upload "
    "expires uploads_ttl_seconds after its last part."
)
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_CONTEXT_STORED = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["context_id", "expires_at"],
            "properties": {
                "context_id": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "expires_at": {"type": "string", "format": "date-time"},
            },
        }
    }
}
_MODELS = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["models", "refused"],
            "properties": {
                "models": {"type": "array", "items": {"type": "object"}},
                "refused": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "reason"],
                        "properties": {"name": {"type": "string"}, "reason": {"type": "string"}},
                    },
                },
            },
        }
    }
}
_COUNT = {"type": "integer", "minimum": 1}
_PLAN_CARD = {
    "type": "object",
    "required": [
        "kind",
        "ckks",
        "input_encoding",
        "output_decoding",
        "limits",
        "costs",
        "output_precision",
    ],
    "properties": {
        "kind": {"type": "string", "enum": ["latency", "batch"]},
        "ckks": {"type": "object"},
        "input_encoding": {"type": "object"},
        "output_decoding": {"type": "object"},
        # Limits of this server; max_samples_per_request already accounts for the body limit.
        "limits": {
            "type": "object",
            "required": [
                "max_samples_per_request",
                "max_request_bytes",
                "max_context_bytes",
                "max_part_bytes",
            ],
            "properties": {
                "max_samples_per_request": _COUNT,
                "max_request_bytes": _COUNT,
                "max_context_bytes": _COUNT,
                "max_part_bytes": _COUNT,
            },
        },
        # Upper bounds per unit: one sample (latency) or one group of slot_count samples (batch).
        "costs": {
            "type": "object",
            "required": [
                "public_key_bytes",
                "request_bytes_per_unit",
                "response_bytes_per_unit",
                "samples_per_unit",
                "rotations",
                "galois_keys",
            ],
            "properties": {
                "public_key_bytes": _COUNT,
                "request_bytes_per_unit": _COUNT,
                "response_bytes_per_unit": _COUNT,
                "samples_per_unit": _COUNT,
                "rotations": {"type": "integer", "minimum": 0},
                "galois_keys": {"type": "integer", "minimum": 0},
                "expected_max_logit_error": {"type": ["number", "null"]},
            },
        },
        # Clients round decrypted outputs to multiples of this step (a power of two at or
        # above expected_max_logit_error): no released digit is finer than the noise.
        "output_precision": {"type": "number", "exclusiveMinimum": 0},
        "details": {"type": "object"},
    },
}
_CARD = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["card_version", "name", "input", "output", "plans"],
            "properties": {
                "card_version": {"type": "integer"},
                "name": {"type": "string"},
                "description": {"type": "string"},
                "input": {"type": "object"},
                "output": {
                    "type": "object",
                    "required": ["task", "labels", "ranges"],
                    "properties": {
                        "task": {"type": "string", "enum": ["classification", "regression"]},
                        "labels": {"type": "array", "items": {"type": "string"}},
                        # Per output, [low, high] seen on calibration data with a margin;
                        # clients flag outputs outside as unreliable. Null: none recorded.
                        "ranges": {
                            "type": ["array", "null"],
                            "items": {
                                "type": "array",
                                "items": {"type": "number"},
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        },
                    },
                },
                "plans": {"type": "object", "additionalProperties": _PLAN_CARD},
                "details": {"type": "object"},
            },
        }
    }
}
_HEALTH = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["status", "version", "models", "refused", "contexts"],
            "properties": {
                # degraded: some artifacts were refused (see refused), the others are served
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "version": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "refused": {"type": "object", "additionalProperties": {"type": "string"}},
                "contexts": {"type": "integer", "minimum": 0},
                # unavailable: the key store did not answer at once (contexts: the last count)
                "storage": {"type": "string", "enum": ["ok", "unavailable"]},
            },
        }
    }
}


def _ok(description: str, content: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if content:
        answer["content"] = content
    return answer


def openapi_document(version: str) -> dict[str, Any]:
    """Return the OpenAPI document of the v1 and v2 routes."""
    document = _routes(version)
    document["paths"].update(V2_PATHS)
    document["components"]["responses"]["V2Error"] = V2_ERROR_RESPONSE
    # With API tokens on, every route but health needs one, and each counts against a rate.
    for path, operations in document["paths"].items():
        if path in PUBLIC_PATHS:
            continue
        error = V2_ERROR if path.startswith("/v2/") else _ERROR
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {}]
            operation["responses"].update({"400": error, "401": error, "429": error})
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "API token"}
    }
    return document


def _routes(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "he-inference",
            "version": version,
            "description": "Encrypted inference: CKKS ciphertexts in, CKKS ciphertexts out.",
        },
        "paths": {
            "/v1/health": {
                "get": {
                    "summary": "Status, version, loaded models",
                    "responses": {"200": _ok("healthy", _HEALTH)},
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "Model summaries, and the artifacts refused with their reasons",
                    "responses": {"200": _ok("models", _MODELS)},
                }
            },
            "/v1/models/{name}": {
                "get": {
                    "summary": "Model card: shapes, preprocessing, CKKS parameters, encodings",
                    "parameters": [_NAME],
                    "responses": {"200": _ok("card", _CARD), "404": _ERROR},
                }
            },
            "/v1/contexts": {
                "post": {
                    "summary": "Upload public evaluation keys (never a secret key)",
                    "requestBody": {"required": True, "content": _BINARY},
                    "responses": {
                        "200": _ok("already stored", _CONTEXT_STORED),
                        "201": _ok("stored", _CONTEXT_STORED),
                        "400": _ERROR,
                        "409": _ERROR,
                        "413": _ERROR,
                    },
                }
            },
            "/v1/contexts/{context_id}": {
                "head": {
                    "summary": "Is this context stored?",
                    "parameters": [_CONTEXT],
                    "responses": {"200": _ok("stored"), "404": _ok("not stored")},
                },
                "delete": {
                    "summary": "Forget a context",
                    "parameters": [_CONTEXT],
                    "responses": {"204": _ok("deleted"), "404": _ERROR},
                },
            },
            "/v1/models/{name}/predict": {
                "post": {
                    "summary": "Evaluate the model on framed input ciphertexts",
                    "description": "The body holds whole units, at most the card's "
                    "limits.max_samples_per_request samples and limits.max_request_bytes bytes.",
                    "parameters": [_NAME, _PLAN, _CONTEXT_HEADER],
                    "requestBody": {"required": True, "content": _BINARY},
                    "responses": {
                        "200": _FRAMES,
                        "400": _ERROR,
                        "404": _ERROR,
                        "409": _ERROR,
                        "413": _ERROR,
                    },
                }
            },
            "/v1/models/{name}/uploads": {
                "post": {
                    "summary": "Open an upload: a request sent in parts",
                    "description": _UPLOADS_DESCRIPTION,
                    "parameters": [_NAME, _PLAN, _CONTEXT_HEADER],
                    "responses": {
                        "201": _ok("upload opened", _UPLOAD),
                        "400": _ERROR,
                        "404": _ERROR,
                        "409": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            "/v1/uploads/{upload_id}/parts/{index}": {
                "put": {
                    "summary": "Send (or replace) one part: framed input ciphertexts",
                    "parameters": [
                        _UPLOAD_ID,
                        {
                            "name": "index",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "requestBody": {"required": True, "content": _BINARY},
                    "responses": {
                        "200": _ok("part stored; the upload's parts so far", _UPLOAD),
                        "400": _ERROR,
                        "404": _ERROR,
                        "413": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            "/v1/uploads/{upload_id}/predict": {
                "post": {
                    "summary": "Evaluate an upload's ciphertexts, then delete the upload",
                    "description": "Answers like /v1/models/{name}/predict. If the context is "
                    "gone (404 context_not_found), the upload is kept: upload the context again "
                    "and retry.",
                    "parameters": [_UPLOAD_ID],
                    "responses": {
                        "200": _FRAMES,
                        "400": _ERROR,
                        "404": _ERROR,
                        "409": _ERROR,
                        "413": _ERROR,
                        "503": _ERROR,
                    },
                }
            },
            "/v1/uploads/{upload_id}": {
                "delete": {
                    "summary": "Abandon an upload and free its parts",
                    "parameters": [_UPLOAD_ID],
                    "responses": {"204": _ok("deleted"), "404": _ERROR, "503": _ERROR},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (text exposition format)",
                    "responses": {
                        "200": _ok("metrics", {"text/plain": {"schema": {"type": "string"}}})
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _ok("document", _JSON_OBJECT)},
                }
            },
        },
        "components": {
            "responses": {
                "Error": {
                    "description": "error",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["error"],
                                "properties": {
                                    "error": {
                                        "type": "object",
                                        "required": ["code", "message"],
                                        "properties": {
                                            "code": {"type": "string"},
                                            "message": {"type": "string"},
                                        },
                                    }
                                },
                            }
                        }
                    },
                }
            }
        },
    }
