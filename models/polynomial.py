"""Polynomial activations: the torch module and the least-squares fit that produces it.

CKKS evaluates additions and multiplications only, so every activation of a converted network
is a polynomial ``sum_k c_k x^k``. It is fitted on the range ``[lo, hi]`` of the
pre-activations observed on calibration data and is only trustworthy there: outside that range
even a good fit of ReLU grows like ``x^degree``. The fitted range therefore travels with the
polynomial (in the module and in the artifact's manifest), so that evaluation can say how often
held-out data leaves it and fine-tuning can keep the network inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_DEGREE",
    "PolyActivation",
    "PolyFit",
    "fit_polynomial",
    "levels_of_degree",
    "relu_square",
]

# The artifact format holds up to 9 coefficients; the engine evaluates degree <= 4 today.
MAX_DEGREE = 8
# Relative RMS error (fit error / spread of the activation's outputs) accepted by the automatic
# degree choice. On standard-normal pre-activations (range about +-4.6) degree 2 fits ReLU to
# 0.24 and degree 4 to 0.14, sigmoid to 0.17 and 0.05: the default picks degree 4 for ReLU and
# degree 3 for sigmoid unless the user caps the degree.
DEFAULT_TOLERANCE = 0.15
# Share of the least-squares weight given to a uniform grid over [lo, hi]; the rest follows the
# observed distribution. Without the grid the fit ignores the sparse tails of the range, where
# the polynomial would then stray far (twice as far for ReLU at degree 2).
_GRID_WEIGHT = 0.05
_QUANTILES = 2049
_NEGLIGIBLE = 1e-9
_GRID_POINTS = 257


def levels_of_degree(degree: int) -> int:
    """Return the multiplicative levels the engine spends on a polynomial of this degree.

    Degree <= 1 is affine and merges into the neighbouring linear maps (0 levels); degree 2
    costs one level, degrees 3-4 two levels, and in general ``ceil(log2(degree))``.

    Args:
        degree: the polynomial degree (highest non-zero coefficient).

    Returns:
        The number of levels.
    """
    if degree <= 1:
        return 0
    return int(degree - 1).bit_length()


class PolyActivation(nn.Module):
    """Element-wise polynomial ``sum_k coeffs[k] * x**k`` fitted on ``[lo, hi]``.

    The coefficients are fixed Python floats (lowest degree first), not parameters: the
    exported polynomial is exactly the one that was fitted and reported. ``source`` names the
    activation it replaces, e.g. ``ReLU()``.
    """

    def __init__(
        self, coeffs: Sequence[float], lo: float, hi: float, source: str = "", fit_error: float = 0
    ) -> None:
        super().__init__()
        if not coeffs:
            raise ValueError("a polynomial needs at least one coefficient")
        if not lo <= hi:
            raise ValueError(f"empty range [{lo}, {hi}]")
        self.coeffs: tuple[float, ...] = tuple(float(c) for c in coeffs)
        self.lo = float(lo)
        self.hi = float(hi)
        self.source = source
        self.fit_error = float(fit_error)

    @property
    def degree(self) -> int:
        """Return the index of the highest non-zero coefficient."""
        return max((i for i, c in enumerate(self.coeffs) if c != 0.0), default=0)

    @property
    def levels(self) -> int:
        """Return the multiplicative levels this polynomial costs on ciphertexts."""
        return levels_of_degree(self.degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate the polynomial element-wise by Horner's rule.

        Args:
            x: any tensor.

        Returns:
            A tensor of the same shape and dtype.
        """
        result = torch.full_like(x, self.coeffs[-1])
        for c in reversed(self.coeffs[:-1]):
            result = result * x + c
        return result

    def range_excess(self, x: torch.Tensor) -> torch.Tensor:
        """Return the mean squared distance of ``x`` outside ``[lo, hi]``, relative to the range.

        Zero when every value lies inside the fitted range; used as a fine-tuning penalty.

        Args:
            x: the pre-activations this module receives.

        Returns:
            A scalar tensor.
        """
        mid = (self.lo + self.hi) / 2.0
        half = max((self.hi - self.lo) / 2.0, 1e-12)
        outside = torch.relu((x - mid).abs() - half) / half
        return (outside * outside).mean()

    def extra_repr(self) -> str:
        coeffs = ", ".join(f"{c:.4g}" for c in self.coeffs)
        return f"coeffs=[{coeffs}], range=[{self.lo:.4g}, {self.hi:.4g}], source={self.source!r}"


def relu_square(radius: float) -> PolyActivation:
    """Return the degree-2 least-squares fit of ReLU on the uniform interval ``[-r, r]``.

    ``3r/32 + x/2 + 15x^2/(32r)``, in closed form: a fixed activation for networks trained
    directly with polynomials (differentially private training cannot calibrate ranges on the
    private data, so the range is chosen, not measured).

    Args:
        radius: ``r`` > 0, the half width of the range.

    Returns:
        The activation, with range ``[-r, r]``.
    """
    if not radius > 0:
        raise ValueError(f"the radius must be positive, got {radius}")
    return PolyActivation(
        (3 * radius / 32, 0.5, 15 / (32 * radius)), -radius, radius, source="ReLU() on [-r, r]"
    )


@dataclass(frozen=True)
class PolyFit:
    """A least-squares polynomial fit and its error on the observed distribution.

    ``rms_error`` is the root-mean-square of ``p(x) - f(x)`` over the observed values;
    ``relative_error`` divides it by the standard deviation of ``f(x)`` over the same values,
    so 0.1 means the fit error is a tenth of the activation's own spread.
    """

    coeffs: tuple[float, ...]
    lo: float
    hi: float
    degree: int
    rms_error: float
    relative_error: float
    max_error: float


def fit_polynomial(
    function: Callable[[np.ndarray], np.ndarray],
    samples: np.ndarray,
    degree: int,
    *,
    lo: float | None = None,
    hi: float | None = None,
) -> PolyFit:
    """Fit ``function`` by a polynomial of ``degree`` on the observed ``samples``.

    The fit is a weighted least-squares problem over two point sets: 2,049 quantiles of the
    samples (the observed distribution, 95% of the weight) and a uniform grid over
    ``[lo, hi]`` (5%), so that the polynomial is accurate where values are frequent and stays
    close to the activation across the whole calibrated range. Quantiles make the fit
    deterministic and independent of the number of samples.

    Args:
        function: the activation, applied element-wise to a float64 array.
        samples: observed pre-activations (any shape; flattened).
        degree: polynomial degree, 1..8.
        lo: lower end of the range; defaults to the smallest sample.
        hi: upper end of the range; defaults to the largest sample.

    Returns:
        The fit, coefficients lowest degree first.

    Raises:
        ValueError: for a degree out of range or no finite samples.
    """
    if not 1 <= degree <= MAX_DEGREE:
        raise ValueError(f"polynomial degree must be 1..{MAX_DEGREE}, got {degree}")
    values = np.asarray(samples, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("no finite pre-activations to fit on")
    low = float(values.min()) if lo is None else float(lo)
    high = float(values.max()) if hi is None else float(hi)
    if high - low < 1e-6 * max(1.0, abs(low), abs(high)):
        # A unit that always sees the same value: any polynomial through that point works,
        # but the fit needs a non-empty interval to be well posed.
        pad = 1e-3 * max(1.0, abs(low))
        low, high = low - pad, high + pad
    quantiles = np.quantile(values, np.linspace(0.0, 1.0, _QUANTILES))
    grid = np.linspace(low, high, _GRID_POINTS)
    points = np.concatenate([quantiles, grid])
    weights = np.concatenate(
        [
            np.full(_QUANTILES, (1.0 - _GRID_WEIGHT) / _QUANTILES),
            np.full(_GRID_POINTS, _GRID_WEIGHT / _GRID_POINTS),
        ]
    )
    # Fit in t = x / s with |t| <= 1: a Vandermonde matrix in x would be badly conditioned.
    s = max(abs(low), abs(high))
    vander = np.vander(points / s, degree + 1, increasing=True)
    root = np.sqrt(weights)
    solution, *_ = np.linalg.lstsq(vander * root[:, None], function(points) * root, rcond=None)
    # Coefficients at rounding-noise level (an activation that is linear on the range, like
    # Hardsigmoid on [-3, 3], gives c2 ~ 1e-17) are zeros: kept, they would raise the degree,
    # cost a level, and make the engine divide by them.
    solution[np.abs(solution) < _NEGLIGIBLE * np.abs(solution).max()] = 0.0
    coeffs = tuple(float(a / s**k) for k, a in enumerate(solution))
    target = function(quantiles)
    error = np.polynomial.polynomial.polyval(quantiles, coeffs) - target
    rms = float(np.sqrt(np.mean(error * error)))
    spread = float(np.std(target))
    relative = rms / spread if spread > 1e-12 else (0.0 if rms <= 1e-12 else float("inf"))
    return PolyFit(
        coeffs=coeffs,
        lo=low,
        hi=high,
        degree=degree,
        rms_error=rms,
        relative_error=relative,
        max_error=float(np.max(np.abs(error))),
    )
