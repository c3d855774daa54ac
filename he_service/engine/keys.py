"""Which Galois keys a plan asks for, within a byte budget, and how other steps are composed.

Every rotation step needs a Galois key; a step without its own key is a sequence of rotations
by steps that have one (``rot(rot(x, a), b) = rot(x, a + b)``), each a full rotation in time.
Keys cost bytes (one key is ``(L - 1) * L * N * 8`` seeded, ``L`` the primes with the special
one: 3.9 MB at N=16384 with 5+1 primes), so the plan starts from every step it uses plus the
powers of two (which reach any step), and drops the key whose loss costs the least time until
the public context fits the budget. Time is rotations (hops) times the cost of a rotation at
the level where each one runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["KeyBudgetError", "KeyPlan", "choose_keys"]


class KeyBudgetError(ValueError):
    """No set of keys within the budget reaches every step the plan uses."""


@dataclass(frozen=True)
class KeyPlan:
    """The Galois keys to make, and the key steps that compose every other step."""

    steps: tuple[int, ...]
    routes: Mapping[int, tuple[int, ...]]

    def hops(self, step: int) -> tuple[int, ...]:
        """Return the key steps whose rotations, in order, rotate by ``step``."""
        return self.routes.get(step, (step,))

    @classmethod
    def direct(cls, steps: set[int]) -> KeyPlan:
        return cls(tuple(sorted(steps)), {})


def choose_keys(
    uses: Mapping[int, float], slots: int, key_bytes: int, budget_bytes: int
) -> KeyPlan:
    """Pick the keys for the rotation steps a plan uses.

    Args:
        uses: step -> milliseconds spent per rotation by that step in one evaluation (count
            times the cost at its level); each hop of a composed step costs as much again.
        slots: the slot count (steps are taken modulo it).
        key_bytes: the bytes of one key (the relinearization key is one more).
        budget_bytes: the public context's budget.

    Returns:
        The keys and routes.

    Raises:
        KeyBudgetError: even the cheapest set that reaches every step is over the budget.
    """
    needed = {s % slots for s in uses if s % slots}
    capacity = budget_bytes // key_bytes - 1  # the relinearization key is always there
    if len(needed) <= capacity:
        return KeyPlan.direct(needed)
    powers = {1 << k for k in range(slots.bit_length() - 1)}
    keys = sorted(needed | powers)
    weights = {s % slots: w for s, w in uses.items() if s % slots}
    current = _total(keys, weights, slots)
    while len(keys) > capacity:
        best: tuple[float, int] | None = None
        for key in keys:
            trial = [k for k in keys if k != key]
            cost = _total(trial, weights, slots)
            if cost is not None and (best is None or cost < best[0]):
                best = (cost, key)
        if best is None:
            break
        keys.remove(best[1])
        current = best[0]
    if len(keys) > capacity or current is None:
        raise KeyBudgetError(
            f"the plan rotates by {len(needed)} distinct steps; even composed from "
            f"{len(keys)} keys its public context needs {(len(keys) + 1) * key_bytes / 2**20:.1f} "
            f"MiB, over the {budget_bytes / 2**20:.1f} MiB key budget"
        )
    routes = _paths(keys, slots, needed - set(keys))
    return KeyPlan(tuple(keys), routes)


def _total(keys: list[int], weights: Mapping[int, float], slots: int) -> float | None:
    """Return the time of all rotations when composed from ``keys``; None if one is out of reach."""
    hops = _hop_counts(keys, slots)
    total = 0.0
    for step, weight in weights.items():
        if hops[step] < 0:
            return None
        total += weight * hops[step]
    return total


def _hop_counts(keys: list[int], slots: int) -> np.ndarray:
    """Return the fewest hops from 0 to every residue using steps in ``keys`` (-1: never)."""
    hops = np.full(slots, -1, dtype=np.int64)
    hops[0] = 0
    frontier = np.array([0], dtype=np.int64)
    steps = np.asarray(keys, dtype=np.int64)
    depth = 0
    while frontier.size:
        depth += 1
        reached = ((frontier[:, None] + steps[None, :]) % slots).ravel()
        hops[reached[hops[reached] < 0]] = depth
        frontier = np.flatnonzero(hops == depth)
    return hops


def _paths(keys: list[int], slots: int, targets: set[int]) -> dict[int, tuple[int, ...]]:
    """Return a shortest sequence of key steps to each target residue."""
    parent = np.full(slots, -1, dtype=np.int64)
    via = np.zeros(slots, dtype=np.int64)
    seen = np.zeros(slots, dtype=bool)
    seen[0] = True
    frontier = np.array([0], dtype=np.int64)
    while frontier.size:
        nxt = []
        for key in keys:
            reached = (frontier + key) % slots
            fresh = ~seen[reached]
            parent[reached[fresh]] = frontier[fresh]
            via[reached[fresh]] = key
            seen[reached[fresh]] = True
            nxt.append(reached[fresh])
        frontier = np.unique(np.concatenate(nxt)) if nxt else np.zeros(0, dtype=np.int64)
    paths: dict[int, tuple[int, ...]] = {}
    for residue in targets:
        route = []
        node = int(residue)
        while node != 0:
            route.append(int(via[node]))
            node = int(parent[node])
        paths[int(residue)] = tuple(reversed(route))
    return paths
