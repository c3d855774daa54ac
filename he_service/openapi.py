"""The OpenAPI 3.1 document of HTTP API v1 (served at ``/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from he_service.protocol import MEDIA_TYPE

__all__ = ["openapi_document"]

_ERROR = {"$ref": "#/components/responses/Error"}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_CONTEXT = {
    "name": "context_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
}
_BINARY = {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}
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
_HEALTH = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["status", "version", "models", "contexts"],
            "properties": {
                "status": {"type": "string", "enum": ["ok"]},
                "version": {"type": "string"},
                "models": {"type": "array", "items": {"type": "string"}},
                "contexts": {"type": "integer", "minimum": 0},
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
    """Return the OpenAPI document of the v1 routes."""
    document = _routes(version)
    # With API tokens on, every route but health needs one, and each counts against a rate.
    for path, operations in document["paths"].items():
        if path == "/v1/health":
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {}]
            operation["responses"].update({"400": _ERROR, "401": _ERROR, "429": _ERROR})
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
                    "summary": "Model summaries",
                    "responses": {"200": _ok("models", _JSON_OBJECT)},
                }
            },
            "/v1/models/{name}": {
                "get": {
                    "summary": "Model card: shapes, preprocessing, CKKS parameters, encodings",
                    "parameters": [_NAME],
                    "responses": {"200": _ok("card", _JSON_OBJECT), "404": _ERROR},
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
                    "parameters": [
                        _NAME,
                        {
                            "name": "plan",
                            "in": "query",
                            "required": False,
                            "description": "latency: one sample per unit of the card's "
                            "ciphertexts; batch: one sample per slot, one ciphertext per feature",
                            "schema": {"type": "string", "enum": ["latency", "batch"]},
                        },
                        {
                            "name": "X-Context-Id",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        },
                    ],
                    "requestBody": {"required": True, "content": _BINARY},
                    "responses": {
                        "200": {
                            "description": "framed output ciphertexts",
                            "headers": {"Server-Timing": {"schema": {"type": "string"}}},
                            "content": _BINARY,
                        },
                        "400": _ERROR,
                        "404": _ERROR,
                        "409": _ERROR,
                        "413": _ERROR,
                    },
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
