"""Rotation schedules compute exactly the sum of rotated products, with few keys."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from he_service.engine.schedule import Box, Product, Rotation, WindowSum


def _direct(box: Box, diagonals: dict, x: np.ndarray, folds: tuple[int, ...]) -> np.ndarray:  # type: ignore[type-arg]
    slots = x.size
    total = np.zeros(slots)
    for coords, diag in diagonals.items():
        total += diag * np.roll(x, -box.step(coords, slots))
    for fold in folds:
        total = total + np.roll(total, -fold)
    return total


@pytest.mark.parametrize("seed", range(12))
def test_every_baby_giant_split_computes_the_same_sum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slots = 64
    dims = int(rng.integers(1, 4))
    box = Box(
        tuple(int(g) for g in rng.integers(1, 20, size=dims)),
        tuple(int(s) for s in rng.integers(1, 5, size=dims)),
    )
    points = list(itertools.product(*(range(s) for s in box.sizes)))
    chosen = [p for p in points if rng.random() < 0.7] or points[:1]
    diagonals = {p: rng.normal(size=slots) for p in chosen}
    x = rng.normal(size=slots)
    folds = (8, 16) if rng.random() < 0.5 else ()
    expected = _direct(box, diagonals, x, folds)
    for r in range(dims + 1):
        for babies in itertools.combinations(range(dims), r):
            product = Product(box, diagonals, babies, folds, slots)
            np.testing.assert_allclose(product.simulate(x), expected, atol=1e-9)
            counter = _Counter()
            product.run(0, counter)
            # The analytic count is the schedule's own (order aside).
            assert sorted(product.rotations(), key=repr) == sorted(counter.rotations, key=repr)
            multiples = {
                k * g % slots
                for g, n in zip(box.generators, box.sizes, strict=True)
                for k in range(1, n)
            }
            giants = {rot.step for rot in product.rotations() if rot.on_product}
            assert giants <= multiples | set(folds)  # babies may combine axes
            assert sum(not rot.on_product for rot in product.rotations()) < max(1, len(points))


class _Counter:
    def __init__(self) -> None:
        self.rotations: list[Rotation] = []

    def rotate(self, value: int, step: int, *, on_product: bool) -> int:
        self.rotations.append(Rotation(step, on_product))
        return value

    def add(self, a: int, b: int) -> int:
        return a

    def multiply(self, value: int, diagonal: int) -> int:
        return value


def test_dense_boxes_rotate_by_their_generators_only() -> None:
    slots = 256
    box = Box((1, 16), (16, 16))
    diagonals = {p: np.ones(slots) for p in itertools.product(range(16), range(16))}
    for babies in ((), (0,), (1,), (0, 1)):
        steps = {r.step for r in Product(box, diagonals, babies, (), slots).rotations()}
        assert steps == {1, 16}


def test_babies_and_giants_cost_about_twice_the_square_root() -> None:
    slots = 256
    box = Box((1, 16), (16, 16))
    diagonals = {p: np.ones(slots) for p in itertools.product(range(16), range(16))}
    split = Product(box, diagonals, (0,), (), slots)
    giants_only = Product(box, diagonals, (), (), slots)
    assert len(split.rotations()) == 15 + 15
    assert len(giants_only.rotations()) == 255
    assert all(r.on_product for r in giants_only.rotations())


def test_window_sums_are_separable() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=100)
    window = WindowSum(Box((1, 10), (2, 3)), 100, on_product=True)
    expected = sum(np.roll(x, -(a + 10 * b)) for a in range(2) for b in range(3))
    np.testing.assert_allclose(window.simulate(x), expected)
    assert len(window.rotations()) == 1 + 2
