"""CKKS parameters for a batch plan: the ring, the prime chain, scale and weight precision.

Scales grow through an affine map and the following activation; primes are dropped only after
the next affine map ("lazy rescaling"), as many as bring the scale back to ``2^scale_bits``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from he_service.engine.batch.plan import BatchPoly, FloatAffine
from he_service.engine.graph import CompileError
from he_service.engine.params import OUTPUT_HEADROOM_BITS
from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams

__all__ = ["ParameterChoice", "choose_parameters"]

_MAX_PRIME_BITS = 60
# Primes must be 1 mod 2N; below ~20 bits there are too few of them for N up to 32768.
_MIN_PRIME_BITS = 20
_RING_DEGREES = (8192, 16384, 32768)
# (scale bits, hidden weight bits, last-layer weight bits), most precise first. The scale is
# the noise floor of every value (fresh encryption and rescale rounding); weight bits set how
# finely weights are rounded; the last layer's weights only cost bits of its own prime.
_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (26, 16, 22),
    (25, 16, 22),
    (25, 16, 20),
    (25, 15, 20),
    (24, 15, 20),
    (24, 14, 20),
    (24, 14, 18),
    (23, 14, 18),
    (23, 13, 18),
    (22, 13, 16),
    (22, 12, 16),
)


@dataclass(frozen=True)
class ParameterChoice:
    """The chosen parameters, each affine map's weight scale and rescales, and why."""

    params: CkksParams
    weight_scales: tuple[float, ...]
    rescales: tuple[int, ...]
    reason: dict[str, Any]


def _weight_scale(matrix: np.ndarray, bits: int) -> float:
    """Return the factor that rounds the largest weight to ``bits`` bits."""
    largest = float(np.max(np.abs(matrix))) if matrix.size else 0.0
    return float(2.0**bits / largest) if largest > 0 else float(2.0**bits)


def _growth(poly: BatchPoly, scale_bits: float) -> float:
    """Return the output scale (bits) of an activation whose input has this scale."""
    return poly.degree * scale_bits - math.log2(abs(poly.coeffs[-1]))


def _prime_sizes(bits: float) -> list[int]:
    """Cut ``bits`` into the fewest primes of at most 60 bits, as equal as possible."""
    count = math.ceil(bits / _MAX_PRIME_BITS)
    total = round(bits)
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _schedule(
    log_scales: Sequence[float], polys: Sequence[BatchPoly], scale_bits: int
) -> tuple[list[list[int]], int, list[tuple[float, int]]] | None:
    """Plan the rescales in bits, from nominal prime sizes (a b-bit prime is about 2^b).

    After each affine map, drop primes worth the scale's excess over ``2^scale_bits`` (none if
    that is too small for a prime, as after a first map); the output keeps 12 bits of headroom
    in the last prime.

    Returns:
        The primes dropped after each affine map, the output prime, and every scale reached
        (bits) with the number of primes dropped by then; None if the output would need a
        prime above 60 bits.
    """
    scale = float(scale_bits)
    drops: list[list[int]] = []
    dropped = 0
    checkpoints = [(scale, 0)]
    for k, log_s in enumerate(log_scales):
        scale += log_s
        checkpoints.append((scale, dropped))
        last = k == len(log_scales) - 1
        excess = scale - scale_bits
        if last and scale + OUTPUT_HEADROOM_BITS + 1 <= _MAX_PRIME_BITS:
            excess = 0.0  # the output fits one prime as it is: no rescale needed
        primes = _prime_sizes(excess) if excess >= _MIN_PRIME_BITS else []
        drops.append(primes)
        scale -= sum(primes)
        dropped += len(primes)
        if not last:
            scale = _growth(polys[k], scale)
            checkpoints.append((scale, dropped))
    output = math.ceil(scale + OUTPUT_HEADROOM_BITS + 1)
    if output > _MAX_PRIME_BITS:
        return None
    return drops, max(output, _MIN_PRIME_BITS), checkpoints


def choose_parameters(
    affines: Sequence[FloatAffine],
    polys: Sequence[BatchPoly],
    poly_modulus_degree: int | None = None,
    candidates: Sequence[tuple[int, int, int]] | None = None,
) -> ParameterChoice:
    """Pick the ring, then the fewest primes, then the most precise candidate.

    Every SEAL operation costs in proportion to the primes a ciphertext carries, so fewer
    primes win over precision (every candidate is precise enough for the shipped models).
    The special prime only needs to match the largest data prime: relinearization happens
    before the rescale, at scales of 2^60 and more, where key-switching noise is negligible;
    what the budget leaves goes to it anyway.

    Args:
        affines: the network's affine maps.
        polys: its activations, one between each two affine maps.
        poly_modulus_degree: the ring degree to use; by default the smallest that fits.
        candidates: (scale bits, weight bits, last-layer weight bits), most precise first; by
            default the calibrated list.

    Raises:
        CompileError: no candidate fits 128-bit parameters.
    """
    degrees = (poly_modulus_degree,) if poly_modulus_degree else _RING_DEGREES
    for degree in degrees:
        budget = MAX_COEFF_BITS_128[degree]
        options = []
        for rank, candidate in enumerate(candidates or _CANDIDATES):
            scale_bits, weight, last = candidate
            bits = [weight] * (len(affines) - 1) + [last]
            scales = [_weight_scale(a.matrix, b) for a, b in zip(affines, bits, strict=True)]
            planned = _schedule([math.log2(s) for s in scales], polys, scale_bits)
            if planned is None:
                continue
            drops, output, checkpoints = planned
            # SEAL drops the last data prime first.
            data = [output] + [p for group in reversed(drops) for p in reversed(group)]
            if sum(data) + max(data) > budget:
                continue
            # SEAL refuses a product whose scale reaches the modulus left at its level.
            if any(reached >= sum(data[: len(data) - n]) - 1 for reached, n in checkpoints):
                continue
            options.append((len(data), rank, data, drops, candidate, bits, scales))
        if not options:
            continue
        best = min(options, key=lambda option: option[:2])
        count, _, data, drops, (scale_bits, weight, last), bits, scales = best
        special = min(_MAX_PRIME_BITS, budget - sum(data))
        reason = {
            "mode": "batch: one sample per slot, no rotations",
            "data_primes": count,
            "total_coeff_bits": sum(data) + special,
            "max_coeff_bits_at_128_bit_security": budget,
            "scale_bits": scale_bits,
            "weight_bits": bits,
            "rescales_after_affine": [len(g) for g in drops],
            "reason": (
                f"N={degree}: {degree // 2} samples per ciphertext; {count} data primes, the "
                f"fewest that hold {len(polys)} activation(s) with lazy rescaling; then the most "
                f"precise scale ({scale_bits} bits) and weight rounding ({weight} bits, "
                f"{last} in the last layer) within the {budget}-bit 128-bit budget; "
                f"{special}-bit special prime"
            ),
        }
        params = CkksParams(degree, (*data, special), scale_bits)
        return ParameterChoice(params, tuple(scales), tuple(len(g) for g in drops), reason)
    raise CompileError(
        f"the network's {len(polys)} activation(s) do not fit CKKS parameters at 128-bit "
        f"security with N <= {max(degrees)}; use fewer or lower-degree activations"
    )
