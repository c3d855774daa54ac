"""Choose CKKS parameters: the smallest ring that holds a plan's depth at 128-bit security."""

from __future__ import annotations

from typing import Any

from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams

__all__ = [
    "OUTPUT_HEADROOM_BITS",
    "SPECIAL_PRIME_EXTRA_BITS",
    "ParameterError",
    "choose_params",
]

# The last remaining prime must hold scale * |output|: 12 bits keep outputs below 2^11 = 2048
# (the shipped models stay below 86 on their data, all-white and random-noise inputs).
OUTPUT_HEADROOM_BITS = 12
# Key switching (rotations, relinearization) adds noise in proportion to q_max / special
# prime: a special prime 24 bits above the scale cut mnist-cnn's logit error 10x (measured:
# 2.7e-2 with [39, 27 x 5, 39], 2.8e-3 with [38, 26 x 5, 50], same 218-bit budget).
SPECIAL_PRIME_EXTRA_BITS = 24
_MAX_PRIME_BITS = 60
_MIN_SCALE_BITS = 25  # below this, rescale noise starts to flip argmaxes of real models
_MAX_SCALE_BITS = 40  # more precision than float32 weights carry buys nothing
_RING_DEGREES = (4096, 8192, 16384, 32768)


class ParameterError(ValueError):
    """No ring in the 128-bit table holds the plan."""


def choose_params(depth: int, slots_needed: int) -> tuple[CkksParams, dict[str, Any]]:
    """Pick the smallest N (and prime sizes) with enough slots and levels.

    The chain is ``[q0, depth x scale, special]``: ``q0`` carries the output headroom, each
    middle prime equals the scale so that rescaling keeps values exact, and the special prime
    is larger still to keep key-switching noise small.

    Args:
        depth: the number of rescales the plan performs.
        slots_needed: the widest slot layout of the plan.

    Returns:
        The parameters and a JSON-able explanation for the model card.

    Raises:
        ParameterError: the depth or width exceeds what N=32768 allows at 128-bit security.
    """
    for degree in _RING_DEGREES:
        if degree // 2 < slots_needed:
            continue
        budget = MAX_COEFF_BITS_128[degree]
        chain = _chain(budget, depth)
        if chain is None:
            continue
        scale_bits, special = chain
        bits = (scale_bits + OUTPUT_HEADROOM_BITS, *([scale_bits] * depth), special)
        why = {
            "depth": depth,
            "slots_needed": slots_needed,
            "total_coeff_bits": sum(bits),
            "max_coeff_bits_at_128_bit_security": budget,
            "reason": (
                f"N={degree} is the smallest ring with >= {slots_needed} slots whose "
                f"{budget}-bit modulus budget (HomomorphicEncryption.org, 128-bit) holds "
                f"{depth} rescales at a {scale_bits}-bit scale"
            ),
        }
        return CkksParams(degree, bits, scale_bits), why
    raise ParameterError(
        f"the network needs multiplicative depth {depth} and {slots_needed} slots; N=32768 at "
        f"128-bit security holds at most depth {_max_depth(MAX_COEFF_BITS_128[32768])} "
        "and 16384 slots"
    )


def _chain(budget: int, depth: int) -> tuple[int, int] | None:
    """Return (scale bits, special prime bits) that fit the budget, or None.

    A large special prime is worth more than a bit of scale (see above), so the largest
    special-prime margin that fits wins, then the largest scale.
    """
    for extra in range(SPECIAL_PRIME_EXTRA_BITS, OUTPUT_HEADROOM_BITS - 1, -1):
        for scale_bits in range(_MAX_SCALE_BITS, _MIN_SCALE_BITS - 1, -1):
            special = min(_MAX_PRIME_BITS, scale_bits + extra)
            if scale_bits * (depth + 1) + OUTPUT_HEADROOM_BITS + special <= budget:
                return scale_bits, special
    return None


def _max_depth(budget: int) -> int:
    depth = 0
    while _chain(budget, depth + 1) is not None:
        depth += 1
    return depth
