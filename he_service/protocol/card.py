"""The model card: everything a client needs to encrypt for a model and read its answer.

A model offers one or more *plans*, each with its own CKKS parameters, keys and encodings:
``latency`` (one sample per request, a few ciphertexts, Galois keys for its rotations) and
``batch`` (one sample per slot, thousands of samples per ciphertext, no Galois keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from he_service.protocol.errors import ProtocolError
from he_service.protocol.params import CkksParams

__all__ = ["CARD_VERSION", "PLAN_KINDS", "ModelCard", "PlanCard"]

CARD_VERSION = 2
PLAN_KINDS = ("latency", "batch")


@dataclass(frozen=True)
class PlanCard:
    """How to encrypt for one plan of a model, and how to read its answer."""

    ckks: CkksParams
    galois_steps: tuple[int, ...]
    input_encoding: dict[str, Any]
    output_decoding: dict[str, Any]
    max_samples_per_request: int
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "ckks": {**self.ckks.to_json(), "galois_steps": list(self.galois_steps)},
            "input_encoding": self.input_encoding,
            "output_decoding": self.output_decoding,
            "limits": {"max_samples_per_request": self.max_samples_per_request},
            "details": self.details,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PlanCard:
        return cls(
            ckks=CkksParams.from_json(doc["ckks"]),
            galois_steps=tuple(int(s) for s in doc["ckks"]["galois_steps"]),
            input_encoding=dict(doc["input_encoding"]),
            output_decoding=dict(doc["output_decoding"]),
            max_samples_per_request=int(doc["limits"]["max_samples_per_request"]),
            details=dict(doc.get("details", {})),
        )


@dataclass(frozen=True)
class ModelCard:
    """Public description of a served model and the encrypted protocols it speaks."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any]
    labels: tuple[str, ...]
    plans: dict[str, PlanCard]
    details: dict[str, Any]

    def plan(self, kind: str) -> PlanCard:
        """Return one plan's card.

        Raises:
            ProtocolError: the model does not offer this plan.
        """
        if kind not in self.plans:
            raise ProtocolError(
                f"model {self.name!r} offers plans {sorted(self.plans)}, not {kind!r}"
            )
        return self.plans[kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "card_version": CARD_VERSION,
            "name": self.name,
            "description": self.description,
            "input": {"shape": list(self.input_shape), "preprocessing": self.preprocessing},
            "output": {"labels": list(self.labels)},
            "plans": {kind: plan.to_json() for kind, plan in self.plans.items()},
            "details": self.details,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelCard:
        """Read a card sent by the server.

        Raises:
            ProtocolError: the card is of another version or lacks a field.
        """
        if not isinstance(doc, Mapping):
            raise ProtocolError("a model card is a JSON object")
        if doc.get("card_version") != CARD_VERSION:
            raise ProtocolError(
                f"model card version {doc.get('card_version')!r} is not {CARD_VERSION}; "
                "upgrade the client"
            )
        try:
            return cls(
                name=doc["name"],
                description=doc.get("description", ""),
                input_shape=tuple(doc["input"]["shape"]),
                preprocessing=dict(doc["input"]["preprocessing"]),
                labels=tuple(doc["output"]["labels"]),
                plans={kind: PlanCard.from_json(p) for kind, p in dict(doc["plans"]).items()},
                details=dict(doc.get("details", {})),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError(f"model card lacks or mangles field {exc}") from None
