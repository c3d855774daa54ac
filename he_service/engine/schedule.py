"""Rotation schedules: sums of rotated products, and window sums, over a box of steps.

A linear map on a slot vector is ``y = sum_d D_d * rot(x, d)`` (``D_d`` a plaintext "diagonal").
The steps ``d`` that a layout produces are points of a small *box*: ``d = sum_t j_t g_t`` with
``0 <= j_t < size_t`` for a few generators ``g_t`` (a convolution: one per kernel axis, one per
channel block; a dense map: 1 and a giant stride). The box decides the schedule:

* *baby* dimensions rotate the input; each baby is one rotation of an earlier baby by one
  generator (a chain), so babies cost one rotation each and one key per generator;
* *giant* dimensions are summed Horner-style, ``Q_0 + rot(Q_1 + rot(Q_2 + ..., g), g)``, on
  products (plaintexts are pre-rotated by minus their giant step), again one rotation per
  point and one key per generator;
* *folds* then add rotated copies of the sum (``y + rot(y, f)``) to gather partial sums.

Babies + giants cost about ``2 sqrt(|box|)`` rotations instead of ``|box|``, but babies rotate
the input at its own scale, where key switching adds noise comparable to a rescale; giants and
folds rotate products, whose larger scale hides it. The compiler chooses the split.

The same code runs a schedule on numpy vectors (simulation, noise estimates, tests) and on SEAL
ciphertexts: a ``Backend`` supplies rotate, add and plaintext multiply.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

__all__ = ["Backend", "Box", "NumpyBackend", "Product", "Rotation", "WindowSum"]

T = TypeVar("T")
Coords = tuple[int, ...]


class Backend(Protocol[T]):
    """What a schedule needs from a vector type."""

    def rotate(self, value: T, step: int, *, on_product: bool) -> T: ...

    def add(self, a: T, b: T) -> T: ...

    def multiply(self, value: T, diagonal: int) -> T:
        """Multiply by the plaintext of diagonal number ``diagonal`` of the running product."""
        ...


@dataclass(frozen=True)
class Rotation:
    """One rotation a schedule performs: its step and whether it acts on a product."""

    step: int
    on_product: bool


@dataclass(frozen=True)
class Box:
    """Steps ``sum_t j_t * generators[t]`` for ``0 <= j_t < sizes[t]`` (modulo the slot count)."""

    generators: tuple[int, ...]
    sizes: tuple[int, ...]

    def step(self, coords: Coords, slots: int) -> int:
        return int(sum(j * g for j, g in zip(coords, self.generators, strict=True)) % slots)

    def merged(self) -> tuple[Box, Callable[[Coords], Coords]]:
        """Merge dimensions with the same generator: ``j1 g + j2 g`` is one axis ``j1 + j2``."""
        groups: dict[int, list[int]] = {}
        for t, g in enumerate(self.generators):
            groups.setdefault(g, []).append(t)
        generators = tuple(groups)
        sizes = tuple(sum(self.sizes[t] for t in dims) - len(dims) + 1 for dims in groups.values())

        def project(coords: Coords) -> Coords:
            return tuple(sum(coords[t] for t in dims) for dims in groups.values())

        return Box(generators, sizes), project


@dataclass(frozen=True, eq=False)
class Product:
    """``y = fold(sum_c D_c * rot(x, step(c)))`` over the points ``c`` of ``box``.

    ``diagonals`` maps box coordinates to un-rotated slot vectors (only non-zero ones are kept:
    an all-zero plaintext would make SEAL refuse a transparent result). ``babies`` are the box
    dimensions rotated on the input; the others are giants. Every step is ``offset`` plus the
    point's step; the offset is one rotation of the sum, before the folds.
    """

    box: Box
    diagonals: dict[Coords, np.ndarray]
    babies: tuple[int, ...]
    folds: tuple[int, ...]
    slots: int
    offset: int = 0  # a step every point shares, applied once to the sum
    _plan: _Schedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_plan", _Schedule.build(self))

    @property
    def giants(self) -> tuple[int, ...]:
        return tuple(t for t in range(len(self.box.sizes)) if t not in self.babies)

    def scaled(self, factor: float) -> Product:
        """Return the same schedule with every diagonal multiplied by ``factor``."""
        if factor == 1.0:
            return self
        diagonals = {c: v * factor for c, v in self.diagonals.items()}
        return Product(self.box, diagonals, self.babies, self.folds, self.slots, self.offset)

    def plaintexts(self) -> list[np.ndarray]:
        """Return the diagonals in evaluation order, each rotated by minus its giant step."""
        return [
            np.roll(
                self.diagonals[c],
                (self.box.step(self._plan.giant_part(c), self.slots) + self.offset) % self.slots,
            )
            for c in self._plan.order
        ]

    def rotations(self) -> list[Rotation]:
        """Return every rotation the schedule performs."""
        return self._plan.rotations

    def run(self, x: T, backend: Backend[T]) -> T:
        """Evaluate on ``x``; plaintext ``k`` of ``plaintexts()`` is ``backend.multiply(_, k)``."""
        return self._plan.run(x, backend, self)

    def simulate(self, x: np.ndarray) -> np.ndarray:
        plains = self.plaintexts()
        return self.run(np.asarray(x, dtype=np.float64), NumpyBackend(plains))


@dataclass(frozen=True, eq=False)
class WindowSum:
    """``y = sum_c rot(x, step(c))`` over the box: a pooling window, with no product.

    Each dimension is summed Horner-style (``x + rot(x + rot(x, g), g)``): one rotation per
    extra point, one key per generator.
    """

    box: Box
    slots: int
    on_product: bool

    def run(self, x: T, backend: Backend[T]) -> T:
        value = x
        for generator, size in zip(self.box.generators, self.box.sizes, strict=True):
            total = value
            for _ in range(size - 1):
                total = backend.add(
                    value, backend.rotate(total, generator, on_product=self.on_product)
                )
            value = total
        return value

    def rotations(self) -> list[Rotation]:
        return [
            Rotation(g % self.slots, self.on_product)
            for g, size in zip(self.box.generators, self.box.sizes, strict=True)
            for _ in range(size - 1)
        ]

    def simulate(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.asarray(x, dtype=np.float64), NumpyBackend([]))


@dataclass
class _Schedule:
    """The order of products of a ``Product``, how its babies chain, and its rotations."""

    order: list[Coords]  # diagonal coordinates in evaluation order
    baby_dims: tuple[int, ...]
    giant_dims: tuple[int, ...]
    baby_chain: list[tuple[Coords, Coords, int]]  # (point, from point, step)
    rotations: list[Rotation]

    @classmethod
    def build(cls, product: Product) -> _Schedule:
        babies = product.babies
        giants = product.giants
        slots = product.slots
        generators = product.box.generators
        points = {tuple(c[t] for t in babies) for c in product.diagonals}
        chain = _chain(points, tuple(generators[t] for t in babies), slots)
        order = sorted(
            product.diagonals,
            key=lambda c: (tuple(c[t] for t in giants), tuple(c[t] for t in babies)),
        )
        rotations = [Rotation(step, False) for _, _, step in chain]
        used = {tuple(c[t] for t in giants) for c in order}
        for depth, dim in enumerate(giants):
            prefixes: dict[Coords, set[int]] = {}
            for g in used:
                prefixes.setdefault(g[:depth], set()).add(g[depth])
            for coordinates in prefixes.values():
                rotations += [
                    Rotation(gap * generators[dim] % slots, True) for gap in _gaps(coordinates)
                ]
        if product.offset % slots:
            rotations.append(Rotation(product.offset % slots, True))
        rotations += [Rotation(f % slots, True) for f in product.folds]
        return cls(order, babies, giants, chain, rotations)

    def giant_part(self, coords: Coords) -> Coords:
        return tuple(0 if t in self.baby_dims else j for t, j in enumerate(coords))

    def run(self, x: T, backend: Backend[T], product: Product) -> T:
        box, slots = product.box, product.slots
        babies: dict[Coords, T] = {(0,) * len(self.baby_dims): x}
        for point, source, step in self.baby_chain:
            babies[point] = backend.rotate(babies[source], step, on_product=False)
        index = {c: k for k, c in enumerate(self.order)}
        groups: dict[Coords, list[Coords]] = {}
        for c in self.order:
            groups.setdefault(tuple(c[t] for t in self.giant_dims), []).append(c)

        def leaf(giant: Coords) -> T:
            total: T | None = None
            for c in groups[giant]:
                term = backend.multiply(babies[tuple(c[t] for t in self.baby_dims)], index[c])
                total = term if total is None else backend.add(total, term)
            assert total is not None
            return total

        def horner(prefix: Coords, depth: int) -> T:
            """Sum the giants under ``prefix``: from the largest coordinate down, rotating the
            running sum by the gap to the next one, and finally by the smallest."""
            if depth == len(self.giant_dims):
                return leaf(prefix)
            generator = box.generators[self.giant_dims[depth]]
            used = sorted({g[depth] for g in groups if g[:depth] == prefix}, reverse=True)
            acc = horner((*prefix, used[0]), depth + 1)
            for previous, j in itertools.pairwise(used):
                acc = backend.rotate(acc, (previous - j) * generator % slots, on_product=True)
                acc = backend.add(horner((*prefix, j), depth + 1), acc)
            if used[-1]:
                acc = backend.rotate(acc, used[-1] * generator % slots, on_product=True)
            return acc

        result = horner((), 0)
        if product.offset % slots:
            result = backend.rotate(result, product.offset % slots, on_product=True)
        for fold in product.folds:
            result = backend.add(result, backend.rotate(result, fold % slots, on_product=True))
        return result


def _gaps(coordinates: set[int]) -> list[int]:
    """Return the rotations (in units) Horner's rule takes over these coordinates."""
    ordered = sorted(coordinates, reverse=True)
    gaps = [a - b for a, b in itertools.pairwise(ordered)]
    return gaps + ([ordered[-1]] if ordered[-1] else [])


def _chain(
    points: set[Coords], generators: tuple[int, ...], slots: int
) -> list[tuple[Coords, Coords, int]]:
    """Order baby points so that each is one rotation of an earlier one.

    A point comes from the nearest known point below it along one axis (the step is the gap
    times that axis' generator); a dense box then uses only the generators' keys.
    """
    origin = (0,) * len(generators)
    known = {origin}
    steps: list[tuple[Coords, Coords, int]] = []
    for point in sorted(points - {origin}):
        best: tuple[int, Coords, int] | None = None
        for dim, j in enumerate(point):
            for lower in range(j - 1, -1, -1):
                source = (*point[:dim], lower, *point[dim + 1 :])
                if source in known:
                    gap = j - lower
                    if best is None or gap < best[0]:
                        best = (gap, source, gap * generators[dim] % slots)
                    break
        if best is None:
            step = sum(j * g for j, g in zip(point, generators, strict=True)) % slots
            best = (0, origin, step)
        steps.append((point, best[1], best[2]))
        known.add(point)
    return steps


class NumpyBackend(Generic[T]):
    """Slot vectors as numpy arrays: ``numpy.roll`` in place of SEAL's rotations."""

    def __init__(self, plaintexts: list[np.ndarray]) -> None:
        self.plaintexts = plaintexts

    def rotate(self, value: np.ndarray, step: int, *, on_product: bool) -> np.ndarray:
        return np.roll(value, -step)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(a + b)

    def multiply(self, value: np.ndarray, diagonal: int) -> np.ndarray:
        return np.asarray(value * self.plaintexts[diagonal])


def box_points(box: Box) -> Iterator[Coords]:
    return itertools.product(*(range(s) for s in box.sizes))
