"""Galois keys within a budget: every step reachable, the cheapest composition kept."""

from __future__ import annotations

import numpy as np
import pytest

from he_service.engine.keys import KeyBudgetError, choose_keys


def _compose(route: tuple[int, ...], slots: int) -> int:
    return sum(route) % slots


def test_every_step_gets_its_own_key_when_the_budget_allows() -> None:
    plan = choose_keys({3: 1.0, 5: 2.0, 700: 1.0}, 1024, key_bytes=100, budget_bytes=1000)
    assert plan.steps == (3, 5, 700)
    assert plan.hops(5) == (5,)


@pytest.mark.parametrize("seed", range(10))
def test_a_budget_composes_steps_from_fewer_keys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slots = 4096
    uses = {int(s): float(rng.uniform(1, 10)) for s in rng.integers(1, slots, size=30)}
    budget = 12 * 100
    plan = choose_keys(uses, slots, key_bytes=100, budget_bytes=budget)
    assert len(plan.steps) + 1 <= 12
    for step in uses:
        route = plan.hops(step % slots)
        assert set(route) <= set(plan.steps)
        assert _compose(route, slots) == step % slots
    unbudgeted = choose_keys(uses, slots, key_bytes=100, budget_bytes=10**9)
    assert all(unbudgeted.hops(s) == (s,) for s in uses)  # the twin without a budget


def test_frequent_steps_keep_their_keys() -> None:
    uses = {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0, 7: 500.0, 13: 0.1, 29: 0.1}
    plan = choose_keys(uses, 64, key_bytes=100, budget_bytes=7 * 100)
    assert 7 in plan.steps
    assert len(plan.steps) <= 6


def test_an_impossible_budget_is_refused_with_the_numbers() -> None:
    with pytest.raises(KeyBudgetError, match="over the 0.0 MiB key budget"):
        choose_keys({3: 1.0, 5: 1.0}, 1024, key_bytes=100, budget_bytes=150)
