"""A latency plan: CKKS parameters, slot layouts and the steps that run on one sample.

The client sends ``input_ciphertexts`` ciphertexts per sample, laid out by the card's input
encoding. An :class:`InputStep` turns them into one ciphertext; then affine steps and polynomial
steps alternate. A plan can be simulated on plain slot vectors with ``numpy.roll`` in place of
rotations, which is how the compiler is tested without encryption.

Levels ("lazy rescaling"): an affine step followed by an activation does not rescale; the
activation's first rescale drops one prime of about ``scale * weight_scale^2`` that pays for
both. Only the last affine step ends on its own, in the last prime. So a network of ``k``
square activations needs ``k`` primes plus the last one, not ``2k + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from he_service.protocol.params import CkksParams

__all__ = [
    "AffineStep",
    "CubicStep",
    "InputStep",
    "Plan",
    "PolyStep",
    "QuarticStep",
    "SquareStep",
    "rotate",
]


def rotate(vector: np.ndarray, step: int) -> np.ndarray:
    """Rotate slots left like SEAL's ``rotate_vector``: ``out[j] = v[(j + step) % n]``."""
    return np.roll(vector, -step)


def _fold(x: np.ndarray, steps: tuple[int, ...]) -> np.ndarray:
    for step in steps:
        x = x + rotate(x, step)
    return x


@dataclass(frozen=True)
class InputStep:
    """``y = fold(sum_k plaintexts[k] * input[k]) + bias``: the first affine map.

    The client has already gathered, into every slot, the input value that slot's weight
    multiplies, so the map costs no rotation but the fold that sums each output's terms.
    """

    plaintexts: tuple[np.ndarray, ...]
    bias: np.ndarray
    fold_steps: tuple[int, ...]
    description: str

    def rotation_steps(self) -> set[int]:
        return set(self.fold_steps)

    def rotation_count(self) -> int:
        return len(self.fold_steps)

    def simulate(self, inputs: list[np.ndarray]) -> np.ndarray:
        total = np.zeros_like(self.bias)
        for plaintext, x in zip(self.plaintexts, inputs, strict=True):
            total = total + plaintext * x
        return _fold(total, self.fold_steps) + self.bias


@dataclass(frozen=True)
class AffineStep:
    """``y = fold(sum_t diag[t] * rot(x, stride * t)) + bias`` by baby-step giant-step.

    ``terms`` maps ``(giant, baby)`` to a diagonal already rotated by ``-stride*giant*baby_count``
    so the giant rotation can come after the plaintext products (one rotation per giant step).
    """

    stride: int
    baby_count: int
    terms: dict[tuple[int, int], np.ndarray]
    bias: np.ndarray
    fold_steps: tuple[int, ...]
    description: str

    @property
    def baby_steps(self) -> list[int]:
        return sorted({b for _, b in self.terms})

    @property
    def giant_steps(self) -> list[int]:
        return sorted({g for g, _ in self.terms})

    def _slots(self) -> int:
        return next(iter(self.terms.values())).size

    def rotation_steps(self) -> set[int]:
        slots = self._slots()
        steps = {(self.stride * b) % slots for b in self.baby_steps}
        steps |= {(self.stride * self.baby_count * g) % slots for g in self.giant_steps}
        return (steps | set(self.fold_steps)) - {0}

    def rotation_count(self) -> int:
        slots = self._slots()
        babies = {(self.stride * b) % slots for b in self.baby_steps} - {0}
        giants = [g for g in self.giant_steps if (self.stride * self.baby_count * g) % slots]
        return len(babies) + len(giants) + len(self.fold_steps)

    def simulate(self, x: np.ndarray) -> np.ndarray:
        babies = {b: rotate(x, self.stride * b) for b in self.baby_steps}
        total = np.zeros_like(x)
        for giant in self.giant_steps:
            inner = sum(
                (diag * babies[b] for (g, b), diag in self.terms.items() if g == giant),
                np.zeros_like(x),
            )
            total += rotate(inner, self.stride * self.baby_count * giant)
        return _fold(total, self.fold_steps) + self.bias


@dataclass(frozen=True)
class SquareStep:
    """``y = x * x`` on every slot (polynomial coefficients are folded into neighbours)."""

    description: str = "x^2"
    primes: int = 1

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return x * x


@dataclass(frozen=True)
class CubicStep:
    """``y = x^2 (c3 x + c2) + c1 x``: a cubic (its constant folded into the next map).

    Not depressed like the quartic: a fitted ReLU has a tiny x^3 coefficient, and shifting x by
    c2 / (3 c3) would evaluate huge terms that cancel, losing most of the precision.
    """

    c1: float
    c2: float
    c3: float
    description: str = "x^2 (c3 x + c2) + c1 x"
    primes: int = 2

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return x * x * (self.c3 * x + self.c2) + self.c1 * x


@dataclass(frozen=True)
class QuarticStep:
    """``y = (x^2 + k)^2 + m x``: every monic quartic after a shift of x, in two levels."""

    k: float
    m: float
    description: str = "(x^2 + k)^2 + m x"
    primes: int = 2

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return (x * x + self.k) ** 2 + self.m * x


PolyStep = SquareStep | CubicStep | QuarticStep
Step = InputStep | AffineStep | PolyStep


@dataclass(frozen=True)
class Plan:
    """A compiled model: what the client must send and what the server will do.

    ``steps`` is an :class:`InputStep`, then polynomial and affine steps alternating, ending with
    an affine step. ``weight_bits`` is the scale of the weights of an affine step that is followed
    by an activation, ``last_weight_bits`` that of the last affine step.
    """

    params: CkksParams
    params_reason: dict[str, Any]
    steps: tuple[Step, ...]
    weight_bits: int
    last_weight_bits: int
    input_encoding: dict[str, Any]
    output_decoding: dict[str, Any]

    @property
    def input_ciphertexts(self) -> int:
        return int(self.input_encoding["ciphertexts"])

    @property
    def galois_steps(self) -> tuple[int, ...]:
        steps: set[int] = set()
        for step in self.steps:
            if isinstance(step, InputStep | AffineStep):
                steps |= step.rotation_steps()
        return tuple(sorted(steps))

    def rotation_count(self) -> int:
        return sum(s.rotation_count() for s in self.steps if isinstance(s, InputStep | AffineStep))

    @property
    def depth(self) -> int:
        """Return the number of rescales (primes dropped) the plan performs."""
        return sum(s.primes for s in self.steps if not isinstance(s, InputStep | AffineStep))

    def simulate(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Run the plan on plain slots (no encryption, no noise)."""
        first = self.steps[0]
        assert isinstance(first, InputStep)
        value = first.simulate([np.asarray(x, dtype=np.float64) for x in inputs])
        for step in self.steps[1:]:
            assert not isinstance(step, InputStep)
            value = step.simulate(value)
        return value

    @property
    def output_primes(self) -> int:
        """Return the primes left in the response ciphertext."""
        return self.params.data_primes - self.depth

    def costs(self) -> dict[str, int]:
        """Return what one sample costs in bytes: public keys, request and response bodies."""
        return {
            "public_key_bytes": self.params.public_context_bytes(len(self.galois_steps)),
            "request_bytes_per_sample": self.input_ciphertexts
            * self.params.ciphertext_bytes(seeded=True),
            "response_bytes_per_sample": self.params.ciphertext_bytes(self.output_primes),
        }

    def summary(self) -> dict[str, Any]:
        return {
            **self.costs(),
            "depth": self.depth,
            "input_ciphertexts": self.input_ciphertexts,
            "rotations": self.rotation_count(),
            "galois_keys": len(self.galois_steps),
            # Every activation prime is one ciphertext product, hence one relinearization.
            "relinearizations": self.depth,
            "steps": [s.description for s in self.steps],
            "parameters": self.params_reason,
        }
