"""Polynomial activations as the engine evaluates them, and how a fitted polynomial maps to one.

A fitted ``p(x)`` is written ``scale * step(x + shift) + offset``: the shift goes into the bias
of the map before, the scale and offset into the map after, so only ``step`` costs levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_POLY_DEGREE",
    "CubicStep",
    "PolyStep",
    "QuarticStep",
    "SquareStep",
    "depressed",
    "significant",
]

MAX_POLY_DEGREE = 4


@dataclass(frozen=True)
class SquareStep:
    """``y = x * x`` on every slot (polynomial coefficients are folded into neighbours)."""

    description: str = "x^2"
    primes: int = 1

    @property
    def degree(self) -> int:
        return 2

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x * x)


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

    @property
    def degree(self) -> int:
        return 3

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x * x * (self.c3 * x + self.c2) + self.c1 * x)


@dataclass(frozen=True)
class QuarticStep:
    """``y = (x^2 + k)^2 + m x``: every monic quartic after a shift of x, in two levels."""

    k: float
    m: float
    description: str = "(x^2 + k)^2 + m x"
    primes: int = 2

    @property
    def degree(self) -> int:
        return 4

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return np.asarray((x * x + self.k) ** 2 + self.m * x)


PolyStep = SquareStep | CubicStep | QuarticStep


def significant(coeffs: tuple[float, ...]) -> np.ndarray:
    """Drop leading coefficients that are rounding noise next to the others.

    Dividing by a leading coefficient of 1e-17 would shift by 1e16 and wreck the ciphertext.
    """
    values = np.array(coeffs, dtype=np.float64)
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    degree = values.size - 1
    while degree > 0 and abs(values[degree]) <= 1e-12 * largest:
        degree -= 1
    return values[: degree + 1]


def depressed(coeffs: np.ndarray) -> tuple[PolyStep, float, float, float]:
    """Write ``p(x) = scale * step(x + shift) + offset`` with the cheapest step.

    Dividing by the leading coefficient and shifting x by ``c[d-1] / (d c[d])`` removes the
    x^(d-1) term; what is left is x^2 or (x^2 + k)^2 + m x, plus a constant. The
    shift goes into the previous bias, the scale and constant into the next map: no level.
    """
    degree = len(coeffs) - 1
    if degree == 3:  # see CubicStep: a cubic is evaluated as it is, only its constant moves
        c0, c1, c2, c3 = (float(c) for c in coeffs)
        return CubicStep(c1, c2, c3), 0.0, 1.0, c0
    lead = float(coeffs[-1])
    shift = float(coeffs[-2] / (degree * lead))
    monic = np.polynomial.Polynomial(coeffs / lead)
    r = (monic(np.polynomial.Polynomial([-shift, 1.0]))).coef
    r = np.concatenate([r, np.zeros(degree + 1 - r.size)])
    if degree == 2:
        return SquareStep(), shift, lead, lead * float(r[0])
    k = float(r[2]) / 2.0
    return QuarticStep(k, float(r[1])), shift, lead, lead * (float(r[0]) - k * k)
