"""A latency plan: CKKS parameters, keys, and the program that runs one sample.

The program follows the normalised graph (``graph.py``): a ``LinearStep`` per linear node
(each term a ``TermPlan`` from ``methods.py``: window sums, a product, window sums, plus the
bias) and a ``PolyApply`` per polynomial node. Every value has a layout (``layout.py``).

The client sends ``input_ciphertexts`` ciphertexts per sample laid out by the card's index
table (the input layout, or the gathered first map's). A plan can be simulated on plain slot
vectors with ``numpy.roll`` in place of rotations, which is how the compiler is tested without
encryption and how its noise is estimated.

Levels ("lazy rescaling"): a linear step does not rescale; the activation after it drops one
prime of about ``scale * weight_scale^2`` that pays for both. Only the output step ends on its
own, in the last prime. A linear step whose terms come from different depths (a residual
join) first brings the shallower ones down to the deepest one's level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from he_service.engine.keys import KeyPlan
from he_service.engine.layout import Layout
from he_service.engine.methods import GatherInput, TermPlan
from he_service.engine.poly import CubicStep, PolyStep, QuarticStep, SquareStep
from he_service.engine.schedule import NumpyBackend, Rotation
from he_service.protocol.params import CkksParams

__all__ = [
    "CubicStep",
    "LinearStep",
    "Plan",
    "PolyApply",
    "PolyStep",
    "QuarticStep",
    "SquareStep",
]


@dataclass(frozen=True, eq=False)
class LinearStep:
    """``y = sum of terms + bias`` for one linear node, produced in layout ``out``."""

    node: int
    terms: tuple[TermPlan, ...]
    bias: np.ndarray  # a slot vector: the bias at the output's slots, zero elsewhere
    out: Layout
    level: int  # primes consumed before it runs
    description: str

    def rotations(self) -> list[Rotation]:
        return [r for term in self.terms for r in term.rotations()]

    @property
    def products(self) -> int:
        return sum(term.products for term in self.terms)


@dataclass(frozen=True, eq=False)
class PolyApply:
    """A polynomial activation of node ``source``'s value, slot-wise."""

    node: int
    source: int
    step: PolyStep
    level: int


Step = LinearStep | PolyApply


@dataclass(frozen=True, eq=False)
class Plan:
    """A compiled model: parameters, keys, the client's layout and the program."""

    params: CkksParams
    params_reason: dict[str, Any]
    steps: tuple[Step, ...]
    input_index: np.ndarray  # (ciphertexts, period): input element per slot, -1 for zero
    input_length: int
    output_length: int
    output_period: int
    keys: KeyPlan
    weight_bits: int
    last_weight_bits: int
    estimates: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ciphertexts(self) -> int:
        return int(self.input_index.shape[0])

    @property
    def input_encoding(self) -> dict[str, Any]:
        return {
            "kind": "gather",
            "slot_count": self.params.slot_count,
            "ciphertexts": self.input_ciphertexts,
            "period": int(self.input_index.shape[1]),
            "length": self.input_length,
            "index": self.input_index.tolist(),
        }

    @property
    def output_decoding(self) -> dict[str, Any]:
        return {"kind": "prefix", "length": self.output_length, "period": self.output_period}

    @property
    def galois_steps(self) -> tuple[int, ...]:
        return self.keys.steps

    def linear_steps(self) -> list[LinearStep]:
        return [s for s in self.steps if isinstance(s, LinearStep)]

    def rotation_count(self) -> int:
        """Return the rotations one evaluation performs, counting composed steps' hops."""
        return sum(len(self.keys.hops(r.step)) for s in self.linear_steps() for r in s.rotations())

    @property
    def depth(self) -> int:
        """Return the primes the deepest path drops."""
        last = self.steps[-1]
        assert isinstance(last, LinearStep)
        return last.level

    @property
    def output_primes(self) -> int:
        return self.params.data_primes - self.depth

    def costs(self) -> dict[str, int]:
        """Return what one sample costs in bytes: public keys, request and response bodies."""
        return {
            "public_key_bytes": self.params.public_context_bytes(len(self.galois_steps)),
            "request_bytes_per_sample": self.input_ciphertexts
            * self.params.ciphertext_bytes(seeded=True),
            "response_bytes_per_sample": self.params.ciphertext_bytes(self.output_primes),
        }

    def simulate(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run the plan on plain slot vectors (no encryption, no noise)."""
        values: dict[int, np.ndarray] = {}
        raw = [np.asarray(x, dtype=np.float64) for x in inputs]
        values[0] = raw[0]
        for step in self.steps:
            if isinstance(step, PolyApply):
                values[step.node] = step.step.simulate(values[step.source])
                continue
            total = step.bias.copy()
            for term in step.terms:
                total = total + simulate_term(
                    term, raw if term.source == 0 else [values[term.source]]
                )
            values[step.node] = total
        last = self.steps[-1]
        return values[last.node]

    def summary(self) -> dict[str, Any]:
        relins = sum(
            1 for s in self.steps if isinstance(s, PolyApply) for _ in range(s.step.primes)
        )
        return {
            **self.costs(),
            **self.estimates,
            "depth": self.depth,
            "input_ciphertexts": self.input_ciphertexts,
            "rotations": self.rotation_count(),
            "galois_keys": len(self.galois_steps),
            "relinearizations": relins,
            "steps": [
                s.description if isinstance(s, LinearStep) else s.step.description
                for s in self.steps
            ],
            "parameters": self.params_reason,
        }


def simulate_term(term: TermPlan, inputs: list[np.ndarray]) -> np.ndarray:
    """Run one term on plain slot vectors."""
    if isinstance(term.product, GatherInput):
        value = term.product.simulate(inputs)
    else:
        value = inputs[0]
        for window in term.pre:
            value = window.simulate(value)
        value = term.product.run(value, NumpyBackend(term.product.plaintexts()))
    for window in term.post:
        value = window.simulate(value)
    return value
