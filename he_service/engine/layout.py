"""Where a tensor's elements sit in the CKKS slots.

A ``Layout`` gives each element (flattened C order) a position in ``[0, period)``; the element
also sits at every ``position + k * period`` (``period`` divides the slot count; equal to it:
one copy). ``clean`` says every other slot is (near) zero: required of the response, which must
hold the outputs and nothing else (partial sums would leak weights). A layout of an image
(``(C, H, W)``) may carry a ``Grid``: element ``(c, y, x)`` at
``origin + coords[c] . generators + y * ys + x * xs``, which convolutions and pooling windows
exploit: a kernel offset is the same rotation for every output pixel and every channel pair
whose offsets differ by the same generator steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "Layout", "next_pow2"]

Shape = tuple[int, ...]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class Grid:
    """Channel placement of an image layout (see the module docstring)."""

    ys: int
    xs: int
    generators: tuple[int, ...]
    coords: tuple[tuple[int, ...], ...]  # one tuple per channel
    origin: int

    def offsets(self) -> np.ndarray:
        if not self.generators:
            return np.full(len(self.coords), self.origin, dtype=np.int64)
        coords = np.asarray(self.coords, dtype=np.int64).reshape(len(self.coords), -1)
        return self.origin + coords @ np.asarray(self.generators, dtype=np.int64)

    def positions(self, shape: Shape) -> np.ndarray:
        _, height, width = shape
        y = np.arange(height)[:, None] * self.ys
        x = np.arange(width)[None, :] * self.xs
        return (self.offsets()[:, None, None] + y[None] + x[None]).reshape(-1)

    def extent(self, shape: Shape) -> int:
        """Return the span of one channel's pixels, ``max(y ys + x xs) + 1``."""
        _, height, width = shape
        return (height - 1) * self.ys + (width - 1) * self.xs + 1

    def strided(self, sy: int, sx: int) -> Grid:
        """Return the grid of every ``sy``-th row and ``sx``-th column (same origin)."""
        return Grid(self.ys * sy, self.xs * sx, self.generators, self.coords, self.origin)


@dataclass(frozen=True, eq=False)
class Layout:
    """Element positions, replication period, cleanliness and optional grid structure."""

    shape: Shape
    positions: np.ndarray
    period: int
    clean: bool
    grid: Grid | None = None

    @classmethod
    def of_grid(cls, shape: Shape, grid: Grid, period: int, *, clean: bool) -> Layout:
        return cls(shape, grid.positions(shape) % period, period, clean, grid)

    @classmethod
    def contiguous(cls, length: int, period: int) -> Layout:
        """Elements at slots ``0 .. length - 1``, repeated every ``period`` slots, zeros else."""
        return cls((length,), np.arange(length, dtype=np.int64), period, True)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def key(self) -> tuple[object, ...]:
        return (self.period, self.clean, self.shape, self.positions.tobytes())

    def is_injective(self) -> bool:
        return np.unique(self.positions).size == self.positions.size

    def reshaped(self, shape: Shape) -> Layout:
        """The same slots seen as another shape of the same size (a flatten)."""
        grid = self.grid if len(shape) == 3 else None
        return Layout(shape, self.positions, self.period, self.clean, grid)

    def encode(self, values: np.ndarray, slots: int) -> np.ndarray:
        """Return the slot vector holding ``values`` (flattened) in this layout."""
        vector = np.zeros(self.period)
        vector[self.positions] = np.asarray(values, dtype=np.float64).reshape(-1)
        return np.tile(vector, slots // self.period)

    def decode(self, slots: np.ndarray) -> np.ndarray:
        """Return the element values read from a slot vector (first copy)."""
        return np.asarray(np.asarray(slots)[self.positions])
