"""CKKS parameters for a batch plan: the ring, the prime chain, scale and weight precision.

Scales grow through an affine map and the following activation; primes are dropped only after
the next affine map ("lazy rescaling"), as many as bring the scale back to ``2^scale_bits``.
The schedule is planned twice: in bits, with a b-bit prime counted as ``2^b``, to choose the
prime sizes; then with the exact primes of those sizes, as SEAL's double arithmetic will
compute every scale, to choose the exact weight scales (``exact_scales``).

Residual joins (an affine layer whose terms read values of different depths):

* **Levels.** The layer runs at the deepest term's level. A shallower term's ciphertexts are
  brought down one prime at a time, by a modulus switch (the scale stays; on SEAL memory this
  only means reading fewer limbs) or, where the term's scale is far above the others', by a
  rescale (the scale drops by that prime) as long as it stays ``_ALIGN_MARGIN_BITS`` above
  ``2^scale_bits``. Lazy rescaling leaves values at very different scales: an activation's
  output sits at about ``2^(d * scale_bits)`` and the request at ``2^scale_bits``.
* **Scales.** Every term's products must land on one scale ``T``: the largest term's natural
  product scale (its source scale times its weight scale, ``2^bits / max|w|``). Every other
  term keeps ``bits`` to ``bits + 1`` bits of weight precision and makes up the rest with an
  exact power of two, ``2^shift`` (a modular multiplication of its products: no loss, no
  larger integers), choosing its weight scale so that ``scale * weight_scale * 2^shift = T``
  to the last bit of SEAL's double arithmetic.
* **Shared primes.** Parallel branches with activations drop primes at the same levels, and a
  level has one prime. The first layer to reach a level sizes its primes; a later layer there
  drops as many of those as cover its excess over ``2^scale_bits`` and, when that is more,
  raises ``T`` (its shifts) so that it lands exactly on ``2^scale_bits``.

A chain (one term per layer) never aligns, shifts or shares: it keeps its parameters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from he_service.engine.batch.activation import activation_scale
from he_service.engine.batch.plan import INPUT, BatchPoly, FloatLinear, FloatPoly, FloatStep
from he_service.engine.graph import CompileError
from he_service.engine.params import OUTPUT_HEADROOM_BITS
from he_service.protocol.params import MAX_COEFF_BITS_128, CkksParams, seal_context

__all__ = ["LayerSchedule", "ParameterChoice", "TermScale", "choose_parameters"]

_MAX_PRIME_BITS = 60
# Primes must be 1 mod 2N; below ~20 bits there are too few of them for N up to 32768.
_MIN_PRIME_BITS = 20
_RING_DEGREES = (8192, 16384, 32768)
# A join term is rescaled to meet the others only when its scale is this far above theirs
# (less would not save a prime), and never closer than this to 2^scale_bits: rescaling an
# unrelinearized square adds about sqrt(N) times the usual rounding noise.
_ALIGN_MIN_GAP_BITS = _MIN_PRIME_BITS
_ALIGN_MARGIN_BITS = 12
_ALIGN_MAX_CHOICES = 12
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
class LayerSchedule:
    """Where an affine layer runs, how its terms get there, and which primes it drops.

    ``reference`` is the term whose natural product scale the layer keeps; ``None`` means the
    layer drops primes sized by an earlier layer and lands exactly on ``2^scale_bits``.
    """

    level: int
    align: tuple[tuple[bool, ...], ...]  # per term, per prime in between: rescale?
    reference: int | None
    drops: int
    weight_bits: int


@dataclass(frozen=True)
class TermScale:
    """A term's exact weight scale, power-of-two shift, and its source's scale once aligned."""

    weight_scale: float
    shift: int
    source_scale: float


@dataclass(frozen=True)
class ParameterChoice:
    """The chosen parameters, every affine layer's schedule and exact scales, and why."""

    params: CkksParams
    schedule: dict[int, LayerSchedule]
    product_scales: dict[int, float]  # per affine layer: the scale of its products
    term_scales: dict[int, tuple[TermScale, ...]]
    reason: dict[str, Any] = field(default_factory=dict)


def _weight_scale(largest: float, bits: int) -> float:
    """Return the factor that rounds the largest weight to ``bits`` bits."""
    return float(2.0**bits / largest) if largest > 0 else float(2.0**bits)


def _growth(poly: BatchPoly, scale_bits: float) -> float:
    """Return the output scale (bits) of an activation whose input has this scale."""
    return poly.degree * scale_bits - math.log2(abs(poly.coeffs[-1]))


def _prime_sizes(bits: float) -> list[int]:
    """Cut ``bits`` into the fewest primes of at most 60 bits, as equal as possible."""
    count = math.ceil(bits / _MAX_PRIME_BITS)
    total = round(bits)
    return [total // count + (1 if i < total % count else 0) for i in range(count)]


def _align(
    between: Sequence[int], natural: float, scale: float, target: float, floor: float
) -> tuple[bool, ...]:
    """Choose which primes between a term's level and its layer's to rescale by.

    A rescale lowers the term's product scale toward ``target`` (the scale the deepest terms
    reach anyway); the term's own scale stays at least ``floor``. Among the choices that
    reach the target, the fewest rescales (each costs a SEAL call per ciphertext).
    """
    keep = tuple(False for _ in between)
    if not between or natural - target < _ALIGN_MIN_GAP_BITS:
        return keep
    if len(between) > _ALIGN_MAX_CHOICES:
        return keep  # a skip over this many levels is not worth searching
    best, best_key = keep, (max(natural, target), 0, 0.0)
    for mask in itertools.product((False, True), repeat=len(between)):
        cut = sum(p for p, f in zip(between, mask, strict=True) if f)
        if not cut or scale - cut < floor:
            continue
        key = (max(natural - cut, target), sum(mask), float(cut))
        if key < best_key:
            best, best_key = mask, key
    return best


@dataclass
class _Nominal:
    """A schedule in bits: the primes (first dropped first), the output prime, checkpoints."""

    primes: list[int]
    output: int
    schedule: dict[int, LayerSchedule]
    checkpoints: list[tuple[float, int]]  # every scale reached, with the primes dropped by then


def _schedule(
    steps: Sequence[FloatStep],
    polys: Mapping[int, BatchPoly],
    largest: Mapping[int, tuple[float, ...]],
    candidate: tuple[int, int, int],
) -> _Nominal | None:
    """Plan levels, alignments and rescales in bits (see the module docstring).

    After each affine map, drop primes worth the scale's excess over ``2^scale_bits`` (none if
    that is too small for a prime, as after a first map); the output keeps 12 bits of headroom
    in the last prime.

    Returns:
        The nominal schedule; None if the output would need a prime above 60 bits.
    """
    scale_bits, weight, last = candidate
    base = float(scale_bits)
    primes: list[int] = []
    levels = {INPUT: 0}
    scales = {INPUT: base}
    checkpoints = [(base, 0)]
    schedule: dict[int, LayerSchedule] = {}
    final = len(steps) - 1
    for index, step in enumerate(steps):
        if isinstance(step, FloatPoly):
            levels[index] = levels[step.source]
            scales[index] = _growth(polys[index], scales[step.source])
            checkpoints.append((scales[index], levels[index]))
            continue
        bits = last if index == final else weight
        sources = [source for source, _ in step.terms]
        level = max(levels[s] for s in sources)
        natural = [
            scales[s] + bits - math.log2(w) for s, w in zip(sources, largest[index], strict=True)
        ]
        target = max(n for n, s in zip(natural, sources, strict=True) if levels[s] == level)
        align = []
        for t, source in enumerate(sources):
            between = primes[levels[source] : level]
            flags = _align(between, natural[t], scales[source], target, base + _ALIGN_MARGIN_BITS)
            cut = sum(p for p, f in zip(between, flags, strict=True) if f)
            natural[t] -= cut
            if between:
                checkpoints.append((scales[source] - cut, level))
            align.append(flags)
        product = max(natural)
        reference: int | None = natural.index(product)
        checkpoints.append((product, level))
        excess = product - base
        if index == final and product + OUTPUT_HEADROOM_BITS + 1 <= _MAX_PRIME_BITS:
            excess = 0.0  # the output fits one prime as it is: no rescale needed
        used: list[int] = []
        appended = False
        if excess >= _MIN_PRIME_BITS:
            while level + len(used) < len(primes) and sum(used) < excess - 0.5:
                used.append(primes[level + len(used)])
            remaining = excess - sum(used)
            if level + len(used) == len(primes) and remaining >= _MIN_PRIME_BITS:
                new = _prime_sizes(remaining)
                primes += new
                used += new
                appended = True
        if used and not appended and sum(used) > excess:
            product, reference = base + sum(used), None  # land exactly on 2^scale_bits
        schedule[index] = LayerSchedule(level, tuple(align), reference, len(used), bits)
        levels[index] = level + len(used)
        scales[index] = product - sum(used)
        checkpoints.append((scales[index], levels[index]))
    if levels[final] != len(primes):
        raise CompileError("internal error: the output is not at the end of the prime chain")
    output = math.ceil(scales[final] + OUTPUT_HEADROOM_BITS + 1)
    if output > _MAX_PRIME_BITS:
        return None
    return _Nominal(primes, max(output, _MIN_PRIME_BITS), schedule, checkpoints)


def _largest(steps: Sequence[FloatStep]) -> dict[int, tuple[float, ...]]:
    """Return the largest |weight| of every term of every affine layer."""
    return {
        index: tuple(float(np.max(np.abs(m))) if m.size else 0.0 for _, m in step.terms)
        for index, step in enumerate(steps)
        if isinstance(step, FloatLinear)
    }


def choose_parameters(
    steps: Sequence[FloatStep],
    polys: Mapping[int, BatchPoly],
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
        steps: the exact network (affine layers and activations, in order).
        polys: the activation of every ``FloatPoly`` step, by index.
        poly_modulus_degree: the ring degree to use; by default the smallest that fits.
        candidates: (scale bits, weight bits, last-layer weight bits), most precise first; by
            default the calibrated list.

    Raises:
        CompileError: no candidate fits 128-bit parameters.
    """
    largest = _largest(steps)
    affines = len(largest)
    degrees = (poly_modulus_degree,) if poly_modulus_degree else _RING_DEGREES
    for degree in degrees:
        budget = MAX_COEFF_BITS_128[degree]
        options = []
        for rank, candidate in enumerate(candidates or _CANDIDATES):
            planned = _schedule(steps, polys, largest, candidate)
            if planned is None:
                continue
            # SEAL drops the last data prime first.
            data = [planned.output, *reversed(planned.primes)]
            if sum(data) + max(data) > budget:
                continue
            # SEAL refuses a product whose scale reaches the modulus left at its level.
            if any(reached >= sum(data[: len(data) - n]) - 1 for reached, n in planned.checkpoints):
                continue
            options.append((len(data), rank, data, planned, candidate))
        if not options:
            continue
        count, _, data, planned, (scale_bits, weight, last) = min(
            options, key=lambda option: option[:2]
        )
        special = min(_MAX_PRIME_BITS, budget - sum(data))
        params = CkksParams(degree, (*data, special), scale_bits)
        products, terms = exact_scales(steps, polys, planned.schedule, params, largest)
        ordered = sorted(planned.schedule.items())
        joins = sum(1 for _, s in ordered if len(s.align) > 1)
        reason = {
            "mode": "batch: one sample per slot, no rotations",
            "data_primes": count,
            "total_coeff_bits": sum(data) + special,
            "max_coeff_bits_at_128_bit_security": budget,
            "scale_bits": scale_bits,
            "weight_bits": [s.weight_bits for _, s in ordered],
            "rescales_after_affine": [s.drops for _, s in ordered],
            "reason": (
                f"N={degree}: {degree // 2} samples per ciphertext; {count} data primes, the "
                f"fewest that hold {len(polys)} activation(s) with lazy rescaling; then the most "
                f"precise scale ({scale_bits} bits) and weight rounding ({weight} bits, "
                f"{last} in the last layer) within the {budget}-bit 128-bit budget; "
                f"{special}-bit special prime"
                + (
                    f"; {joins} residual join(s) aligned by modulus switches, rescales and "
                    "power-of-two shifts"
                    if joins
                    else ""
                )
            ),
        }
        return ParameterChoice(params, planned.schedule, products, terms, reason)
    raise CompileError(
        f"the network's {len(polys)} activation(s) in {affines} affine map(s) do not fit CKKS "
        f"parameters at 128-bit security with N <= {max(degrees)}; use fewer or lower-degree "
        "activations"
    )


def drop_primes(params: CkksParams) -> list[int]:
    """Return the data primes in the order SEAL drops them (the prime dropped at level 0 first)."""
    primes = []
    data = seal_context(params).first_context_data()
    while data is not None and data.next_context_data() is not None:
        primes.append(int(data.parms().coeff_modulus()[-1].value()))
        data = data.next_context_data()
    return primes


def exact_scales(
    steps: Sequence[FloatStep],
    polys: Mapping[int, BatchPoly],
    schedule: Mapping[int, LayerSchedule],
    params: CkksParams,
    largest: Mapping[int, tuple[float, ...]],
) -> tuple[dict[int, float], dict[int, tuple[TermScale, ...]]]:
    """Follow a schedule with the exact primes, as SEAL computes scales (double arithmetic).

    Returns:
        Per affine layer, the scale of its products and every term's exact scales.
    """
    primes = drop_primes(params)
    values = {INPUT: params.scale}
    levels = {INPUT: 0}
    products: dict[int, float] = {}
    terms: dict[int, tuple[TermScale, ...]] = {}
    for index, step in enumerate(steps):
        if isinstance(step, FloatPoly):
            values[index] = activation_scale(polys[index], values[step.source])
            levels[index] = levels[step.source]
            continue
        plan = schedule[index]
        aligned = []
        for (source, _), flags in zip(step.terms, plan.align, strict=True):
            value = values[source]
            for offset, rescale in enumerate(flags):
                if rescale:
                    value = value / float(primes[levels[source] + offset])
            aligned.append(value)
        nominal = [_weight_scale(w, plan.weight_bits) for w in largest[index]]
        dropped = [float(q) for q in primes[plan.level : plan.level + plan.drops]]
        if plan.reference is not None:
            product = aligned[plan.reference] * nominal[plan.reference]
        else:
            product = params.scale
            for q in dropped:
                product = product * q
        scales = []
        for t, (value, weight_scale) in enumerate(zip(aligned, nominal, strict=True)):
            if t == plan.reference:
                scales.append(TermScale(weight_scale, 0, value))
                continue
            shift = max(0, math.floor(math.log2(product / (value * weight_scale))))
            scales.append(TermScale(product / (value * 2.0**shift), shift, value))
        products[index] = product
        terms[index] = tuple(scales)
        result = product
        for q in dropped:
            result = result / q
        values[index] = result
        levels[index] = plan.level + plan.drops
    return products, terms
