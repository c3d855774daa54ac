"""An evaluation plan: CKKS parameters, slot layouts and the steps that run on a ciphertext.

Every step consumes exactly one level. A plan can be simulated on plain slot vectors with
``numpy.roll`` in place of rotations, which is how the compiler is tested without encryption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from he_service.protocol.params import CkksParams

__all__ = ["AffineStep", "CubicStep", "Plan", "PolyStep", "QuarticStep", "SquareStep", "rotate"]


def rotate(vector: np.ndarray, step: int) -> np.ndarray:
    """Rotate slots left like SEAL's ``rotate_vector``: ``out[j] = v[(j + step) % n]``."""
    return np.roll(vector, -step)


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
    levels: int = field(default=1, init=False)

    @property
    def baby_steps(self) -> list[int]:
        return sorted({b for _, b in self.terms})

    @property
    def giant_steps(self) -> list[int]:
        return sorted({g for g, _ in self.terms})

    def rotation_steps(self) -> set[int]:
        steps = {self.stride * b for b in self.baby_steps if b}
        steps |= {self.stride * self.baby_count * g for g in self.giant_steps if g}
        return steps | set(self.fold_steps)

    def rotation_count(self) -> int:
        return (
            len([b for b in self.baby_steps if b])
            + len([g for g in self.giant_steps if g])
            + len(self.fold_steps)
        )

    def simulate(self, x: np.ndarray) -> np.ndarray:
        babies = {b: rotate(x, self.stride * b) for b in self.baby_steps}
        total = np.zeros_like(x)
        for giant in self.giant_steps:
            inner = sum(
                (diag * babies[b] for (g, b), diag in self.terms.items() if g == giant),
                np.zeros_like(x),
            )
            total += rotate(inner, self.stride * self.baby_count * giant)
        for step in self.fold_steps:
            total = total + rotate(total, step)
        return total + self.bias


@dataclass(frozen=True)
class SquareStep:
    """``y = x * x`` on every slot (polynomial coefficients are folded into neighbours)."""

    description: str = "x^2"
    levels: int = field(default=1, init=False)

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return x * x


@dataclass(frozen=True)
class CubicStep:
    """``y = x * (x^2 + k)``: every monic cubic after a shift of x, in two levels."""

    k: float
    description: str = "x (x^2 + k)"
    levels: int = field(default=2, init=False)

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return x * (x * x + self.k)


@dataclass(frozen=True)
class QuarticStep:
    """``y = (x^2 + k)^2 + m x``: every monic quartic after a shift of x, in two levels."""

    k: float
    m: float
    description: str = "(x^2 + k)^2 + m x"
    levels: int = field(default=2, init=False)

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return (x * x + self.k) ** 2 + self.m * x


PolyStep = SquareStep | CubicStep | QuarticStep
Step = AffineStep | PolyStep


@dataclass(frozen=True)
class Plan:
    """A compiled model: what the client must send and what the server will do."""

    params: CkksParams
    params_reason: dict[str, Any]
    steps: tuple[Step, ...]
    input_encoding: dict[str, Any]
    output_decoding: dict[str, Any]

    @property
    def galois_steps(self) -> tuple[int, ...]:
        steps: set[int] = set()
        for step in self.steps:
            if isinstance(step, AffineStep):
                steps |= step.rotation_steps()
        return tuple(sorted(steps))

    def rotation_count(self) -> int:
        return sum(s.rotation_count() for s in self.steps if isinstance(s, AffineStep))

    @property
    def depth(self) -> int:
        """Return the number of rescales (levels) the plan consumes."""
        return sum(step.levels for step in self.steps)

    def simulate(self, slots: np.ndarray) -> np.ndarray:
        """Run the plan on plain slots (no encryption, no noise)."""
        value = np.asarray(slots, dtype=np.float64)
        for step in self.steps:
            value = step.simulate(value)
        return value

    def summary(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "rotations": self.rotation_count(),
            # Every activation level is one ciphertext product, hence one relinearization.
            "relinearizations": sum(s.levels for s in self.steps if not isinstance(s, AffineStep)),
            "steps": [s.description for s in self.steps],
            "parameters": self.params_reason,
        }
