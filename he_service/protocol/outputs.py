"""What a released output is worth: a plan's output precision and a model's calibrated ranges.

Both sides read these from the card. The *output precision* of a plan is the step of the grid
the client SDK rounds decrypted outputs to: the smallest power of two at or above the engine's
estimate of the largest error encryption adds (``PlanCosts.expected_max_logit_error``), so no
released digit is finer than the noise. The *output ranges* are, per output, the values seen
on the model's calibration data widened by a margin (``conversion.output_bound`` of the
manifest); an output outside them came from an input unlike that data, where the polynomial
activations are not accurate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from he_service.protocol._fields import is_finite_number
from he_service.protocol.errors import ProtocolError

__all__ = ["OutputRanges", "output_step", "read_output_ranges", "rows_out_of_range"]

OutputRanges = tuple[tuple[float, float], ...]


def output_step(error_bound: float) -> float:
    """Return the output precision for an error bound: the next power of two at or above it.

    Raises:
        ValueError: the bound is not a positive finite number.
    """
    if not (math.isfinite(error_bound) and error_bound > 0):
        raise ValueError(f"an error bound must be a positive number, got {error_bound!r}")
    return math.ldexp(1.0, math.ceil(math.log2(error_bound)))


def read_output_ranges(value: Any, outputs: int, where: str) -> OutputRanges | None:
    """Read ``[[low, high], ...]``, one pair per output, or ``None`` (no calibrated ranges).

    Raises:
        ProtocolError: not one pair of finite numbers ``low <= high`` per output.
    """
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != outputs:
        raise ProtocolError(f"{where} must list one [low, high] pair per output ({outputs})")
    ranges = []
    for pair in value:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(is_finite_number(v) for v in pair)
            or pair[0] > pair[1]
        ):
            raise ProtocolError(
                f"{where} must hold [low, high] pairs of finite numbers, low <= high"
            )
        ranges.append((float(pair[0]), float(pair[1])))
    return tuple(ranges)


def rows_out_of_range(values: np.ndarray, ranges: OutputRanges) -> np.ndarray:
    """Return, per row of outputs ``(samples, outputs)``, whether any output is outside its range.

    Raises:
        ValueError: the rows do not have one value per range.
    """
    rows = np.asarray(values, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != len(ranges):
        raise ValueError(
            f"expected rows of {len(ranges)} outputs (one per calibrated range), got shape "
            f"{rows.shape}"
        )
    bounds = np.asarray(ranges, dtype=np.float64).reshape(-1, 2)
    outside = (rows < bounds[:, 0]) | (rows > bounds[:, 1])
    return np.asarray(outside.any(axis=1))
