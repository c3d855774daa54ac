"""An evaluation plan: CKKS parameters, slot layouts and the steps that run on a ciphertext.

Every step consumes exactly one level. A plan can be simulated on plain slot vectors with
``numpy.roll`` in place of rotations, which is how the compiler is tested without encryption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from he_service.protocol.params import CkksParams

__all__ = ["AffineStep", "Plan", "SquareStep", "rotate"]


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

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return x * x


Step = AffineStep | SquareStep


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

    def simulate(self, slots: np.ndarray) -> np.ndarray:
        """Run the plan on plain slots (no encryption, no noise)."""
        value = np.asarray(slots, dtype=np.float64)
        for step in self.steps:
            value = step.simulate(value)
        return value

    def summary(self) -> dict[str, Any]:
        return {
            "depth": len(self.steps),
            "rotations": self.rotation_count(),
            "relinearizations": sum(isinstance(s, SquareStep) for s in self.steps),
            "steps": [s.description for s in self.steps],
            "parameters": self.params_reason,
        }
