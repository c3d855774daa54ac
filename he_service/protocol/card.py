"""The model card: everything a client needs to encrypt for a model and read its answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from he_service.protocol.errors import ProtocolError
from he_service.protocol.params import CkksParams

__all__ = ["CARD_VERSION", "ModelCard"]

CARD_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """Public description of a served model and the encrypted protocol it speaks."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any]
    labels: tuple[str, ...]
    ckks: CkksParams
    galois_steps: tuple[int, ...]
    input_encoding: dict[str, Any]
    output_decoding: dict[str, Any]
    max_samples_per_request: int
    details: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "card_version": CARD_VERSION,
            "name": self.name,
            "description": self.description,
            "input": {"shape": list(self.input_shape), "preprocessing": self.preprocessing},
            "output": {"labels": list(self.labels), "decoding": self.output_decoding},
            "ckks": {**self.ckks.to_json(), "galois_steps": list(self.galois_steps)},
            "input_encoding": self.input_encoding,
            "limits": {"max_samples_per_request": self.max_samples_per_request},
            "details": self.details,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelCard:
        """Read a card sent by the server.

        Raises:
            ProtocolError: the card is of another version or lacks a field.
        """
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
                ckks=CkksParams.from_json(doc["ckks"]),
                galois_steps=tuple(doc["ckks"]["galois_steps"]),
                input_encoding=dict(doc["input_encoding"]),
                output_decoding=dict(doc["output"]["decoding"]),
                max_samples_per_request=int(doc["limits"]["max_samples_per_request"]),
                details=dict(doc.get("details", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"model card lacks field {exc}") from None
