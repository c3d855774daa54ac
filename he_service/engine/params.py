"""Choose CKKS parameters: the smallest ring that holds a plan's depth at 128-bit security."""

from __future__ import annotations

from typing import Any

from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams

__all__ = ["OUTPUT_HEADROOM_BITS", "ParameterError", "choose_params"]

# The last remaining prime must hold scale * |output|: 12 bits keep outputs below 2^11 = 2048
# (mnist-cnn reaches 416 on training digits and 1945 on an all-white image).
OUTPUT_HEADROOM_BITS = 12
_MIN_SCALE_BITS = 25  # below this, rescale noise starts to flip argmaxes of real models
_MAX_SCALE_BITS = 40  # more precision than float32 weights carry buys nothing
_RING_DEGREES = (4096, 8192, 16384, 32768)


class ParameterError(ValueError):
    """No ring in the 128-bit table holds the plan."""


def choose_params(depth: int, slots_needed: int) -> tuple[CkksParams, dict[str, Any]]:
    """Pick the smallest N (and prime sizes) with enough slots and levels.

    The chain is ``[q0, depth x scale, special]``: ``q0`` and the special prime carry the
    output headroom; each middle prime equals the scale so that rescaling keeps values exact.

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
        scale_bits = min(_MAX_SCALE_BITS, (budget - 2 * OUTPUT_HEADROOM_BITS) // (depth + 2))
        if scale_bits < _MIN_SCALE_BITS:
            continue
        edge = scale_bits + OUTPUT_HEADROOM_BITS
        bits = (edge, *([scale_bits] * depth), edge)
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
        f"128-bit security holds at most depth "
        f"{(MAX_COEFF_BITS_128[32768] - 2 * OUTPUT_HEADROOM_BITS) // _MIN_SCALE_BITS - 2} "
        "and 16384 slots"
    )
