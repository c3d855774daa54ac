"""Plan kinds, model tasks, and what a plan costs and allows, as both sides read them.

A *unit* is what one evaluation consumes: one sample's ciphertexts (``latency``) or one group
of up to ``slot_count`` samples, one ciphertext per input feature (``batch``). Byte costs are
per unit, so a client can plan its requests whatever the kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from he_service.protocol._fields import read_float, read_int, read_object
from he_service.protocol.errors import ProtocolError

__all__ = ["PlanCosts", "PlanKind", "PlanLimits", "Task"]


class PlanKind(StrEnum):
    """How a model is evaluated; the value is the ``plan`` query parameter and card key."""

    LATENCY = "latency"  # one sample per request unit: fastest answer, Galois keys needed
    BATCH = "batch"  # one sample per slot: thousands per unit, no Galois keys

    @classmethod
    def parse(cls, value: object) -> PlanKind:
        """Return the kind named ``value``.

        Raises:
            ProtocolError: no plan kind has this name.
        """
        for kind in cls:
            if value == kind.value:
                return kind
        shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "…"
        raise ProtocolError(f"unknown plan {shown!r}; plans are {', '.join(k.value for k in cls)}")


class Task(StrEnum):
    """What a model's outputs mean: class scores (logits) or predicted values."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"

    @classmethod
    def parse(cls, value: object) -> Task:
        """Return the task named ``value``.

        Raises:
            ProtocolError: no task has this name.
        """
        for task in cls:
            if value == task.value:
                return task
        raise ProtocolError(
            f"unknown task {value!r:.40}; tasks are {', '.join(t.value for t in cls)}"
        )


@dataclass(frozen=True)
class PlanLimits:
    """What one plan's requests may carry on this server.

    ``max_samples_per_request`` already accounts for ``max_request_bytes``: it is the
    configured sample limit or the units whose ciphertexts fit one body, whichever is fewer.
    A unit larger than one body (a batch group of a large model) is sent as an upload, in
    parts of at most ``max_part_bytes`` (``POST /v1/models/{name}/uploads``); the configured
    sample limit then holds per upload. ``max_context_bytes`` bounds the public keys.
    """

    max_samples_per_request: int
    max_request_bytes: int
    max_context_bytes: int
    max_part_bytes: int

    def to_json(self) -> dict[str, int]:
        return {
            "max_samples_per_request": self.max_samples_per_request,
            "max_request_bytes": self.max_request_bytes,
            "max_context_bytes": self.max_context_bytes,
            "max_part_bytes": self.max_part_bytes,
        }

    @classmethod
    def from_json(cls, doc: Any) -> PlanLimits:
        """Read limits sent by the server.

        Raises:
            ProtocolError: a field is missing or not a positive integer.
        """
        where = "limits"
        doc = read_object(doc, where)
        return cls(
            max_samples_per_request=read_int(doc, "max_samples_per_request", where, minimum=1),
            max_request_bytes=read_int(doc, "max_request_bytes", where, minimum=1),
            max_context_bytes=read_int(doc, "max_context_bytes", where, minimum=1),
            max_part_bytes=read_int(doc, "max_part_bytes", where, minimum=1),
        )


@dataclass(frozen=True)
class PlanCosts:
    """What using a plan costs the client: key bytes to make and upload, bytes per unit.

    Byte counts are upper bounds (uncompressed SEAL sizes plus headers); a request body adds
    the framing (``framed_bytes``). ``expected_max_logit_error`` is the engine's estimate of
    the largest absolute output error encryption adds, when it has one.
    """

    public_key_bytes: int
    request_bytes_per_unit: int
    response_bytes_per_unit: int
    samples_per_unit: int
    rotations: int
    galois_keys: int
    expected_max_logit_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "public_key_bytes": self.public_key_bytes,
            "request_bytes_per_unit": self.request_bytes_per_unit,
            "response_bytes_per_unit": self.response_bytes_per_unit,
            "samples_per_unit": self.samples_per_unit,
            "rotations": self.rotations,
            "galois_keys": self.galois_keys,
            "expected_max_logit_error": self.expected_max_logit_error,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | Any) -> PlanCosts:
        """Read costs sent by the server.

        Raises:
            ProtocolError: a field is missing or of the wrong type.
        """
        where = "costs"
        doc = read_object(doc, where)
        return cls(
            public_key_bytes=read_int(doc, "public_key_bytes", where, minimum=1),
            request_bytes_per_unit=read_int(doc, "request_bytes_per_unit", where, minimum=1),
            response_bytes_per_unit=read_int(doc, "response_bytes_per_unit", where, minimum=1),
            samples_per_unit=read_int(doc, "samples_per_unit", where, minimum=1),
            rotations=read_int(doc, "rotations", where),
            galois_keys=read_int(doc, "galois_keys", where),
            expected_max_logit_error=read_float(doc, "expected_max_logit_error", where),
        )
