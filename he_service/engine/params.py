"""Choose CKKS parameters: the fewest, smallest primes that hold a plan at 128-bit security.

Every SEAL operation costs in proportion to the primes a ciphertext still carries (a rotation
is 8.9 ms with 6 primes, 3.2 ms with 3, at N=8192), so the chain is built from the plan's steps
with lazy rescaling (see ``plan.py``): one prime per square activation, two per cubic or
quartic, and the last prime, which holds the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from he_service.engine.plan import CubicStep, PolyStep, QuarticStep, SquareStep
from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams

__all__ = [
    "OUTPUT_HEADROOM_BITS",
    "ChainChoice",
    "ParameterError",
    "choose_params",
]

# The last prime must hold scale * weight scale * |output|: 12 bits keep outputs below
# 2^11 = 2048 (the shipped models stay below 86 on their data, all-white and noise inputs).
OUTPUT_HEADROOM_BITS = 12
_MAX_PRIME_BITS = 60
_RING_DEGREES = (4096, 8192, 16384, 32768)
# Key switching (rotations, relinearization) adds noise of about 2^14 * q_max / special prime
# in slot units (measured at N=8192). The engine rotates and relinearizes only ciphertexts
# whose scale is >= 2^40 (products before their rescale), so a special prime up to 10 bits
# below the largest data prime keeps that noise below 2^-16.
_SPECIAL_SLACK_BITS = 10


def _candidates() -> list[tuple[int, int, int]]:
    """Return (scale, weight, last-weight) bit sizes, most precise first.

    Weight rounding dominates the error: CKKS rounds an encoded weight by about sqrt(N/12)
    ~ 2^5 slot units, on every slot, so the last layer, which also multiplies the partial sums
    a ``window`` layer leaves in unused slots, needs about 4 bits more than the others. Fresh
    and rescale noise is about 2^10 slot units, which a scale of 2^18 keeps below 2^-8 of a
    value. Measured on mnist-cnn (max logit error, 8 images): (18, 20, 24) 0.025,
    (18, 21, 22) 0.039, (20, 20, 16) 0.043, (16, 22, 18) 0.19, (26, 16, 18) 1.9.
    """
    options = [
        (scale, weight, last)
        for scale in range(18, 31)
        for weight in range(12, 24)
        for last in range(16, 29, 2)
    ]
    return sorted(options, key=lambda o: (-min(o[1], o[2] - 4, o[0] + 2), -o[0], -o[2]))


_CANDIDATES = _candidates()


class ParameterError(ValueError):
    """No ring in the 128-bit table holds the plan."""


@dataclass(frozen=True)
class ChainChoice:
    """Parameters plus the weight scales the evaluator encodes with."""

    params: CkksParams
    weight_bits: int
    last_weight_bits: int
    reason: dict[str, Any]


def data_primes(activations: Sequence[PolyStep], scale: int, weight: int, last: int) -> list[int]:
    """Return the data-prime sizes, first dropped first, last (output) prime at the end."""
    primes: list[int] = []
    for step in activations:
        if isinstance(step, CubicStep | QuarticStep):
            # x^2 + k stays at scale * weight (not at scale, where its cancellation would cost
            # bits); the second product brings the result back to the scale.
            primes += [scale + weight, scale + 2 * weight]
        else:
            primes.append(scale + 2 * weight)  # pays for the affine map and the square
    primes.append(scale + last + OUTPUT_HEADROOM_BITS)
    return primes


def choose_params(activations: Sequence[PolyStep], slots_needed: int) -> ChainChoice:
    """Pick the smallest N, then the most precise chain that fits its 128-bit budget.

    Args:
        activations: the plan's polynomial steps, in order.
        slots_needed: the widest slot layout of the plan.

    Returns:
        The parameters, weight scales and a JSON-able explanation for the model card.

    Raises:
        ParameterError: the depth or width exceeds what N=32768 allows at 128-bit security.
    """
    for degree in _RING_DEGREES:
        if degree // 2 < slots_needed:
            continue
        budget = MAX_COEFF_BITS_128[degree]
        for scale, weight, last in _CANDIDATES:
            primes = data_primes(activations, scale, weight, last)
            special = min(_MAX_PRIME_BITS, budget - sum(primes))
            if max(primes) > _MAX_PRIME_BITS or special < max(primes) - _SPECIAL_SLACK_BITS:
                continue
            bits = (primes[-1], *reversed(primes[:-1]), special)  # SEAL drops the last first
            reason = {
                "depth": sum(step.primes for step in activations),
                "data_primes": len(primes),
                "slots_needed": slots_needed,
                "total_coeff_bits": sum(bits),
                "max_coeff_bits_at_128_bit_security": budget,
                "weight_scale_bits": weight,
                "last_weight_scale_bits": last,
                "reason": (
                    f"N={degree} is the smallest ring with >= {slots_needed} slots whose "
                    f"{budget}-bit budget (HomomorphicEncryption.org, 128-bit) holds "
                    f"{len(activations)} activations with lazy rescaling: {len(primes)} data "
                    f"primes at a {scale}-bit scale and {weight}-bit weights"
                ),
            }
            return ChainChoice(CkksParams(degree, bits, scale), weight, last, reason)
    raise ParameterError(
        f"the network needs {len(activations)} activations "
        f"({sum(s.primes for s in activations)} levels) and {slots_needed} slots; N=32768 at "
        f"128-bit security holds at most {max_activations()} square activations "
        "and 16384 slots"
    )


def max_activations() -> int:
    """Return how many square activations the largest ring holds."""
    budget = MAX_COEFF_BITS_128[_RING_DEGREES[-1]]
    scale, weight, last = min(_CANDIDATES, key=lambda o: o[0] + 2 * o[1] + o[2])
    count = 0
    while True:
        primes = data_primes([SquareStep()] * (count + 1), scale, weight, last)
        if sum(primes) + max(primes) - _SPECIAL_SLACK_BITS > budget:
            return count
        count += 1
