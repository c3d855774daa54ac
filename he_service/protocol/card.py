"""The model card: everything a client needs to encrypt for a model and read its answer.

A model offers one or more *plans* (``PlanKind``), each with its own CKKS parameters, keys,
encodings, limits and costs: ``latency`` (one sample per request unit, a few ciphertexts,
Galois keys for its rotations) and ``batch`` (one sample per slot, thousands of samples per
unit, no Galois keys).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from he_service.protocol._fields import object_field, read_float, read_object, read_str
from he_service.protocol.batch_encoding import BatchDecoding, BatchEncoding
from he_service.protocol.encoding import GatherEncoding, PrefixDecoding
from he_service.protocol.errors import ProtocolError
from he_service.protocol.outputs import OutputRanges, read_output_ranges
from he_service.protocol.params import CkksParams
from he_service.protocol.plans import PlanCosts, PlanKind, PlanLimits, Task

__all__ = ["CARD_VERSION", "InputEncoding", "ModelCard", "OutputDecoding", "PlanCard"]

# 3: plans publish their output precision, models their calibrated output ranges.
CARD_VERSION = 3
InputEncoding = GatherEncoding | BatchEncoding
OutputDecoding = PrefixDecoding | BatchDecoding
# The one place that says which encodings each plan kind speaks.
_CODECS: dict[PlanKind, tuple[type[InputEncoding], type[OutputDecoding]]] = {
    PlanKind.LATENCY: (GatherEncoding, PrefixDecoding),
    PlanKind.BATCH: (BatchEncoding, BatchDecoding),
}


@dataclass(frozen=True)
class PlanCard:
    """How to encrypt for one plan of a model, what it costs, and how to read its answer.

    ``output_precision`` is the step clients round decrypted outputs to (``outputs.py``).
    """

    kind: PlanKind
    ckks: CkksParams
    galois_steps: tuple[int, ...]
    input_encoding: InputEncoding
    output_decoding: OutputDecoding
    limits: PlanLimits
    costs: PlanCosts
    output_precision: float
    details: dict[str, Any]

    def __post_init__(self) -> None:
        if not (math.isfinite(self.output_precision) and self.output_precision > 0):
            raise ProtocolError(
                f"output_precision must be a positive number, got {self.output_precision!r:.40}"
            )
        encoding, decoding = _CODECS[self.kind]
        if not isinstance(self.input_encoding, encoding) or not isinstance(
            self.output_decoding, decoding
        ):
            raise ProtocolError(
                f"a {self.kind.value} plan speaks {encoding.kind}/{decoding.kind} encodings, not "
                f"{self.input_encoding.kind}/{self.output_decoding.kind}"
            )
        if self.input_encoding.slot_count != self.ckks.slot_count:
            raise ProtocolError(
                f"input encoding fills {self.input_encoding.slot_count} slots; the parameters "
                f"have {self.ckks.slot_count}"
            )

    @property
    def samples_per_unit(self) -> int:
        return self.input_encoding.samples_per_unit

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "ckks": {**self.ckks.to_json(), "galois_steps": list(self.galois_steps)},
            "input_encoding": self.input_encoding.to_json(),
            "output_decoding": self.output_decoding.to_json(),
            "limits": self.limits.to_json(),
            "costs": self.costs.to_json(),
            "output_precision": self.output_precision,
            "details": self.details,
        }

    @classmethod
    def from_json(cls, doc: Any) -> PlanCard:
        """Read one plan of a card sent by the server.

        Raises:
            ProtocolError: a field is missing, malformed, or inconsistent with the others.
        """
        doc = read_object(doc, "plan")
        kind = PlanKind.parse(doc.get("kind"))
        encoding, decoding = _CODECS[kind]
        ckks = object_field(doc, "ckks", "plan")
        params = CkksParams.from_json(ckks)
        steps = ckks.get("galois_steps")
        if not isinstance(steps, list) or not all(
            type(s) is int and 0 < s < params.slot_count for s in steps
        ):
            raise ProtocolError("ckks.galois_steps must be rotation steps in (0, slot count)")
        details = doc.get("details", {})
        precision = read_float(doc, "output_precision", "plan")
        if precision is None:
            raise ProtocolError("plan.output_precision is missing")
        return cls(
            kind=kind,
            ckks=params,
            galois_steps=tuple(steps),
            input_encoding=encoding.from_json(doc.get("input_encoding")),
            output_decoding=decoding.from_json(doc.get("output_decoding")),
            limits=PlanLimits.from_json(doc.get("limits")),
            costs=PlanCosts.from_json(doc.get("costs")),
            output_precision=precision,
            details=dict(read_object(details, "plan.details")),
        )


@dataclass(frozen=True)
class ModelCard:
    """Public description of a served model and the encrypted protocols it speaks.

    ``output_ranges`` are the calibrated ranges of the outputs (``outputs.py``), ``None`` for
    an artifact that records none.
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any]
    task: Task
    labels: tuple[str, ...]  # class names, or output names of a regression
    plans: dict[PlanKind, PlanCard]
    output_ranges: OutputRanges | None
    details: dict[str, Any]

    def plan(self, kind: PlanKind | str) -> PlanCard:
        """Return one plan's card.

        Raises:
            ProtocolError: the model does not offer this plan.
        """
        card = next((plan for key, plan in self.plans.items() if key == kind), None)
        if card is None:
            offered = sorted(k.value for k in self.plans)
            shown = str(kind) if len(str(kind)) <= 40 else str(kind)[:40] + "…"
            raise ProtocolError(f"model {self.name!r} offers plans {offered}, not {shown!r}")
        return card

    def to_json(self) -> dict[str, Any]:
        return {
            "card_version": CARD_VERSION,
            "name": self.name,
            "description": self.description,
            "input": {"shape": list(self.input_shape), "preprocessing": self.preprocessing},
            "output": {
                "task": self.task.value,
                "labels": list(self.labels),
                "ranges": None
                if self.output_ranges is None
                else [list(pair) for pair in self.output_ranges],
            },
            "plans": {kind.value: plan.to_json() for kind, plan in self.plans.items()},
            "details": self.details,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | Any) -> ModelCard:
        """Read a card sent by the server.

        Raises:
            ProtocolError: the card is of another version, or lacks or mangles a field.
        """
        doc = read_object(doc, "a model card")
        if doc.get("card_version") != CARD_VERSION:
            raise ProtocolError(
                f"model card version {doc.get('card_version')!r:.40} is not {CARD_VERSION}; "
                "upgrade the client"
            )
        where = "card"
        inputs, output = object_field(doc, "input", where), object_field(doc, "output", where)
        shape, labels = inputs.get("shape"), output.get("labels")
        if (
            not isinstance(shape, list)
            or not shape
            or not all(type(n) is int and n >= 1 for n in shape)
        ):
            raise ProtocolError("card input.shape must be a list of positive integers")
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise ProtocolError("card output.labels must be a list of strings")
        plans: dict[PlanKind, PlanCard] = {}
        for key, value in object_field(doc, "plans", where).items():
            plan = PlanCard.from_json(value)
            if plan.kind != key:
                raise ProtocolError(f"card plan {key!r:.40} describes a {plan.kind.value} plan")
            plans[plan.kind] = plan
        description = doc.get("description", "")
        return cls(
            name=read_str(doc, "name", where),
            description=description if isinstance(description, str) else "",
            input_shape=tuple(shape),
            preprocessing=dict(object_field(inputs, "preprocessing", "card.input")),
            task=Task.parse(output.get("task")),
            labels=tuple(labels),
            plans=plans,
            output_ranges=read_output_ranges(
                output.get("ranges"), len(labels), "card.output.ranges"
            ),
            details=dict(read_object(doc.get("details", {}), "card.details")),
        )
