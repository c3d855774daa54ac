"""Check a manifest's differential-privacy claim, and state it (or its absence) on the card.

A DP artifact's manifest has a ``privacy`` section written by ``models.privacy``: the claimed
``epsilon`` and ``delta`` and the DP-SGD parameters that are supposed to support them (noise
multiplier, sampling rate and steps of every private phase). ``check_privacy`` recomputes epsilon
from those parameters with Google's ``dp-accounting`` RDP accountant, independently of the Opacus
accountant that trained the model, at the same orders as Opacus' defaults: each phase is the
Poisson-sampled Gaussian mechanism composed over its steps, and the phases compose. An artifact
whose parameters do not support its claim, or whose section is incomplete or contradicts
itself, is refused.

``dp-accounting`` (and scipy behind it) is imported only when a DP artifact is checked: the
server starts as fast as before without one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ACCOUNTANT",
    "EPSILON_TOLERANCE",
    "MAX_PHASES",
    "NO_PRIVACY",
    "RDP_ORDERS",
    "PrivacyClaimError",
    "check_privacy",
    "privacy_card",
    "privacy_lines",
    "recompute_epsilon",
]

ACCOUNTANT = "rdp"
# Opacus' RDPAccountant.DEFAULT_ALPHAS, so both accountants optimise over the same orders.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# Relative slack for the recomputed epsilon: float rounding, not a looser guarantee.
EPSILON_TOLERANCE = 1e-9
# Each phase costs an RDP computation at load: a bound keeps a hostile manifest cheap.
MAX_PHASES = 16
NO_PRIVACY = {
    "differential_privacy": False,
    "statement": (
        "This model was trained without differential privacy: nothing bounds what its answers "
        "reveal about the records it was trained on."
    ),
}
_PHASE_FIELDS = {"name": str, "epochs": int, "steps": int, "noise_multiplier": float}
_FIELDS = {
    "epsilon": float,
    "delta": float,
    "accountant": str,
    "noise_multiplier": float,
    "max_grad_norm": float,
    "sample_rate": float,
    "expected_batch_size": int,
    "epochs": int,
    "steps": int,
    "dataset": str,
    "n_records": int,
    "unit": str,
    "outside_guarantee": list,
    "phases": list,
    "noise_seed_note": str,
}


class PrivacyClaimError(ValueError):
    """A manifest's ``privacy`` section is malformed or claims more than its parameters give."""


def _number(value: Any, kind: type) -> bool:
    if kind is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _require(section: Mapping[str, Any], fields: Mapping[str, type], where: str) -> None:
    for key, kind in fields.items():
        if not _number(section.get(key), kind):
            raise PrivacyClaimError(
                f"{where}.{key} must be a {'number' if kind is float else kind.__name__}, got "
                f"{section.get(key)!r:.60}"
            )


def recompute_epsilon(phases: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Return the epsilon of composed DP-SGD phases by dp-accounting's RDP accountant.

    Args:
        phases: ``(noise_multiplier, sample_rate, steps)`` of each phase, in order.
        delta: the target delta.

    Returns:
        The smallest epsilon over ``RDP_ORDERS`` for add/remove-one neighbouring data sets.
    """
    import logging

    from dp_accounting import dp_event, rdp

    events = [
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), steps
        )
        for sigma, rate, steps in phases
    ]
    accountant = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    # At large sampling rates its series for fractional orders may not converge; it then drops
    # those orders (a valid, slightly looser bound) and says so once per order on the root
    # logger, which would flood the server's log at every start.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        accountant.compose(dp_event.ComposedDpEvent(events))
        return float(accountant.get_epsilon(delta))
    finally:
        logging.disable(previous)


def check_privacy(section: Any) -> dict[str, Any]:
    """Check a manifest's ``privacy`` section and recompute its epsilon.

    Args:
        section: the parsed ``privacy`` value of a manifest.

    Returns:
        The section, unchanged, once its claim is supported.

    Raises:
        PrivacyClaimError: a field is missing, of the wrong type or out of range, the fields
            contradict each other (totals that are not the sum of the phases, a phase with
            another noise multiplier or sampling rate), or the recomputed epsilon exceeds
            the claimed one.
    """
    if not isinstance(section, dict):
        raise PrivacyClaimError("privacy must be an object")
    _require(section, _FIELDS, "privacy")
    epsilon, delta = float(section["epsilon"]), float(section["delta"])
    if epsilon <= 0 or not 0 < delta < 1:
        raise PrivacyClaimError(
            f"privacy claims epsilon {epsilon:g} and delta {delta:g}; a guarantee needs "
            "epsilon > 0 and 0 < delta < 1"
        )
    if section["accountant"] != ACCOUNTANT:
        raise PrivacyClaimError(
            f"privacy.accountant {section['accountant']!r:.40} is not {ACCOUNTANT!r}, the only "
            "one this server can check"
        )
    sigma, rate = float(section["noise_multiplier"]), float(section["sample_rate"])
    n = int(section["n_records"])
    if sigma <= 0 or not 0 < rate <= 1 or n < 1 or float(section["max_grad_norm"]) <= 0:
        raise PrivacyClaimError(
            "privacy.noise_multiplier, max_grad_norm and n_records must be positive and "
            "sample_rate in (0, 1]"
        )
    if abs(section["expected_batch_size"] - rate * n) > 1:
        raise PrivacyClaimError(
            f"privacy.expected_batch_size {section['expected_batch_size']} contradicts "
            f"sample_rate {rate:g} of {n} records"
        )
    seed = section.get("noise_seed", "missing")
    if not (seed is None or _number(seed, int)):
        raise PrivacyClaimError(
            f"privacy.noise_seed must be an integer or null (a secret seed), got {seed!r:.40}"
        )
    phases = section["phases"]
    if not 1 <= len(phases) <= MAX_PHASES:
        raise PrivacyClaimError(f"privacy.phases must hold 1 to {MAX_PHASES} phases")
    for index, phase in enumerate(phases):
        where = f"privacy.phases[{index}]"
        if not isinstance(phase, dict):
            raise PrivacyClaimError(f"{where} must be an object")
        _require(phase, {**_PHASE_FIELDS, "sample_rate": float}, where)
        if phase["noise_multiplier"] != sigma or phase["sample_rate"] != rate:
            raise PrivacyClaimError(
                f"{where} has noise multiplier {phase['noise_multiplier']:g} and sample rate "
                f"{phase['sample_rate']:g}; the section states {sigma:g} and {rate:g}"
            )
        if phase["steps"] < 1 or phase["epochs"] < 1:
            raise PrivacyClaimError(f"{where}: epochs and steps must be at least 1")
    for total in ("steps", "epochs"):
        if section[total] != sum(phase[total] for phase in phases):
            raise PrivacyClaimError(
                f"privacy.{total} {section[total]} is not the sum over its phases"
            )
    spent = section.get("epsilon_spent", epsilon)
    if not (_number(spent, float) and 0 < spent <= epsilon):
        raise PrivacyClaimError(
            f"privacy.epsilon_spent {spent!r:.40} contradicts the claimed epsilon {epsilon:g}"
        )
    recomputed = recompute_epsilon([(sigma, rate, phase["steps"]) for phase in phases], delta)
    if recomputed > epsilon * (1 + EPSILON_TOLERANCE):
        raise PrivacyClaimError(
            f"privacy claims epsilon {epsilon:g} at delta {delta:g}, but its recorded DP-SGD "
            f"parameters (noise multiplier {sigma:g}, sample rate {rate:g}, {section['steps']} "
            f"steps) give epsilon {recomputed:.6g} by the RDP accountant"
        )
    return section


def privacy_card(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the card's ``details.privacy``: the checked guarantee, or the explicit "no DP".

    Args:
        section: the manifest's checked ``privacy`` section, or None.

    Returns:
        ``NO_PRIVACY`` for None; else ``differential_privacy: true``, a one-sentence
        statement of the guarantee, and every recorded parameter.
    """
    if section is None:
        return dict(NO_PRIVACY)
    return {"differential_privacy": True, "statement": _statement(section), **section}


def _statement(section: Mapping[str, Any]) -> str:
    return (
        f"({section['epsilon']:g}, {section['delta']:g})-differentially private with respect to "
        f"{section['unit']} of the {section['n_records']} training records of "
        f"{section['dataset']}: DP-SGD with noise multiplier {section['noise_multiplier']:.4g}, "
        f"clipping norm {section['max_grad_norm']:g}, sampling rate "
        f"{section['sample_rate']:.4g}, {section['steps']} steps, {ACCOUNTANT.upper()} "
        "accountant."
    )


def privacy_lines(section: Mapping[str, Any] | None) -> list[str]:
    """Describe the guarantee as ``he-models evaluate`` prints it.

    Args:
        section: the manifest's ``privacy`` section, or None.

    Returns:
        Lines of text: the statement, what lies outside the guarantee, the noise seed.
    """
    card = privacy_card(section)
    lines = [f"privacy: {card['statement']}"]
    if section is not None:
        lines += [f"  outside the guarantee: {item}" for item in section["outside_guarantee"]]
        lines.append(f"  noise seed: {section['noise_seed_note']}")
    return lines
