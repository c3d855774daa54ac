"""Choose CKKS parameters: the fewest, smallest primes that hold a plan at 128-bit security.

Every SEAL operation costs in proportion to the primes a ciphertext still carries, and key
bytes grow with their square, so the chain follows the graph's levels with lazy rescaling
(``plan.py``): one prime per square activation, two per cubic or quartic, and the last prime,
which holds the outputs. Prime sizes come from a precision: the values' scale ``2^S`` (their
noise floor: encryption, rescaling and key switching each add about ``N / 4`` slot units), the
weights' scale ``2^W`` (encoding rounds each weight by about ``sqrt(N / 12)`` slot units), and
the last layer's weights, whose prime also holds the outputs' magnitude.

Two regimes (see ``search.py``):

* ``products``: every rotation acts on a product (scale ``2^(S + W)``), so large primes are
  fine and the special prime may sit a little below them; no baby steps.
* ``babies``: ciphertexts are also rotated at rest (scale ``2^S``). Key switching adds noise
  ``~ 2^22.5 * q / P`` slot units at N=16384 besides its ``N / 4`` floor, so every data prime
  ``q`` stays at least 8 bits below the special prime ``P`` (60 bits), where the floor
  dominates. Smaller primes cost weight precision, which ``_balance`` in the compiler recovers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from he_service.engine.graph import Graph, PolyNode
from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams

__all__ = [
    "OUTPUT_HEADROOM_BITS",
    "REGIMES",
    "RING_DEGREES",
    "ChainChoice",
    "ParameterError",
    "Precision",
    "Regime",
    "choose_chains",
    "level_primes",
    "max_depth_by_ring",
]

# The last prime must hold scale * weight scale * |output|: 12 bits keep outputs below
# 2^11 = 2048 (the shipped models stay below 86 on their data, all-white and noise inputs).
OUTPUT_HEADROOM_BITS = 12
MAX_PRIME_BITS = 60
RING_DEGREES = (4096, 8192, 16384, 32768)


class ParameterError(ValueError):
    """No ring in the 128-bit table holds the plan."""


@dataclass(frozen=True)
class Precision:
    """Bits of the values' scale, of hidden layers' weights and of the last layer's weights."""

    scale_bits: int
    weight_bits: int
    last_weight_bits: int


@dataclass(frozen=True)
class Regime:
    """A family of parameters: whether ciphertexts rotate at rest, and precisions to try."""

    name: str
    allow_babies: bool
    precisions: tuple[Precision, ...]  # most precise first
    max_data_prime_bits: int  # babies: 8 bits below the special prime
    special_slack_bits: int  # the special prime may be this much below the largest data prime


def _product_precisions() -> tuple[Precision, ...]:
    """(scale, weight, last) most precise first; measured on mnist-cnn (max logit error, 8
    images): (18, 20, 24) 0.025, (18, 21, 22) 0.039, (20, 20, 16) 0.043, (16, 22, 18) 0.19."""
    options = [
        Precision(scale, weight, last)
        for scale in range(18, 31)
        for weight in range(12, 24)
        for last in range(16, 29, 2)
    ]
    return tuple(
        sorted(
            options,
            key=lambda o: (
                -min(o.weight_bits, o.last_weight_bits - 4, o.scale_bits + 2),
                -o.scale_bits,
                -o.last_weight_bits,
            ),
        )
    )


REGIMES = (
    Regime("products", False, _product_precisions(), MAX_PRIME_BITS, 10),
    Regime(
        "babies",
        True,
        # Measured on LeNet-5 (rms logit error, 8 images): (20, 16, 16) 0.33, (19, 15, 20) 0.85,
        # (18, 17, 16) 0.53, (22, 15, 18) 1.0, (24, 14, 16) 2.1: weights need 16 bits, values
        # rotated at rest need 20.
        (
            Precision(20, 16, 20),
            Precision(20, 16, 16),
            Precision(21, 15, 16),
            Precision(19, 16, 16),
            Precision(18, 15, 16),
            Precision(18, 14, 16),
            Precision(18, 12, 16),
        ),
        MAX_PRIME_BITS - 8,
        -8,
    ),
)


@dataclass(frozen=True)
class ChainChoice:
    """Parameters, the precision the evaluator encodes with, the regime, and why."""

    params: CkksParams
    precision: Precision
    regime: Regime
    reason: dict[str, Any]


def level_primes(graph: Graph, precision: Precision) -> list[int]:
    """Return the data-prime sizes, first dropped first, the output prime last.

    Level ``t``'s prime is the largest any activation starting there needs: ``S + 2W`` for a
    square (it pays for the map before it), ``S + W`` then ``S + 2W`` for a cubic or quartic
    (``x^2 + k`` stays at ``S W``, not at ``S``, where its cancellation would cost bits).
    """
    scale, weight = precision.scale_bits, precision.weight_bits
    depth = graph.depth
    primes = [0] * depth
    levels = graph.levels()
    for node in graph.nodes:
        if not isinstance(node, PolyNode):
            continue
        start = levels[node.source]
        if node.step.primes == 1:
            primes[start] = max(primes[start], scale + 2 * weight)
        else:
            primes[start] = max(primes[start], scale + weight)
            primes[start + 1] = max(primes[start + 1], scale + 2 * weight)
    # A level no activation starts at (a branch is shallower) still needs some prime.
    primes = [p or scale + 2 * weight for p in primes]
    primes.append(scale + precision.last_weight_bits + OUTPUT_HEADROOM_BITS)
    return primes


def choose_chains(graph: Graph, regime: Regime, degree: int, count: int = 3) -> list[ChainChoice]:
    """Return up to ``count`` of the most precise chains of this regime that fit ring ``degree``."""
    found: list[ChainChoice] = []
    for precision in regime.precisions:
        choice = _chain(graph, regime, degree, precision)
        if choice is not None:
            found.append(choice)
            if len(found) == count:
                break
    return found


def _chain(graph: Graph, regime: Regime, degree: int, precision: Precision) -> ChainChoice | None:
    budget = MAX_COEFF_BITS_128[degree]
    primes = level_primes(graph, precision)
    if max(primes) > regime.max_data_prime_bits:
        return None
    special = min(MAX_PRIME_BITS, budget - sum(primes))
    if special < max(primes) - regime.special_slack_bits:
        return None
    bits = (primes[-1], *reversed(primes[:-1]), special)  # SEAL drops the last first
    reason = {
        "regime": regime.name,
        "depth": graph.depth,
        "data_primes": len(primes),
        "total_coeff_bits": sum(bits),
        "max_coeff_bits_at_128_bit_security": budget,
        "scale_bits": precision.scale_bits,
        "weight_scale_bits": precision.weight_bits,
        "last_weight_scale_bits": precision.last_weight_bits,
        "reason": (
            f"N={degree}: {len(primes)} data primes for depth {graph.depth} with lazy "
            f"rescaling, {precision.scale_bits}-bit scale, {precision.weight_bits}-bit "
            f"weights, {special}-bit special prime, within the {budget}-bit budget at "
            f"128-bit security ({regime.name} regime: "
            + (
                "inputs are rotated too, so data primes stay 8 bits below the special prime)"
                if regime.allow_babies
                else "only products are rotated)"
            )
        ),
    }
    return ChainChoice(CkksParams(degree, bits, precision.scale_bits), precision, regime, reason)


def max_depth_by_ring() -> dict[int, int]:
    """Return the largest depth of square activations each ring holds at 128-bit security."""
    limits: dict[int, int] = {}
    for degree in RING_DEGREES:
        budget = MAX_COEFF_BITS_128[degree]
        cheapest = min(
            (p for r in REGIMES for p in r.precisions),
            key=lambda p: p.scale_bits + 2 * p.weight_bits,
        )
        level = cheapest.scale_bits + 2 * cheapest.weight_bits
        last = cheapest.scale_bits + cheapest.last_weight_bits + OUTPUT_HEADROOM_BITS
        depth = 0
        while last + (depth + 1) * level + max(level, last) - 10 <= budget:
            depth += 1
        limits[degree] = depth
    return limits
