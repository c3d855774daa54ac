"""Linear operators of the normalised network, with their structure kept.

Every operator maps one tensor (shape ``(C, H, W)`` or ``(n,)``, flattened in C order) to another
and has a dense ``matrix()``; layouts that exploit structure read the fields instead: a
convolution's kernel, stride and padding, a pooling window. ``Chain`` composes them.

Only ``Dense``, ``Conv`` and ``Diagonal`` multiply by weights; ``Pool`` (a window sum, the
numerator of an average pooling) and ``Reshape`` only move and add values, which costs
rotations and additions but no plaintext product and no level.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Chain",
    "Conv",
    "Dense",
    "Diagonal",
    "LinearOp",
    "Pool",
    "Reshape",
    "compose",
    "size_of",
]

Shape = tuple[int, ...]


def size_of(shape: Shape) -> int:
    return math.prod(shape)


@dataclass(frozen=True, eq=False)
class Dense:
    """``y = weight @ x`` on the flattened tensor."""

    weight: np.ndarray
    in_shape: Shape
    out_shape: Shape
    multiplies = True

    def matrix(self) -> np.ndarray:
        return self.weight

    def describe(self) -> str:
        return f"dense {size_of(self.in_shape)}->{size_of(self.out_shape)}"


@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution without bias, torch semantics (zero padding)."""

    weight: np.ndarray  # (out_channels, in_channels, kh, kw)
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: Shape
    out_shape: Shape = field(init=False)
    multiplies = True

    def __post_init__(self) -> None:
        _, h, w = self.in_shape
        o, _, kh, kw = self.weight.shape
        out = (
            o,
            (h + 2 * self.padding[0] - kh) // self.stride[0] + 1,
            (w + 2 * self.padding[1] - kw) // self.stride[1] + 1,
        )
        object.__setattr__(self, "out_shape", out)

    @functools.cached_property
    def _matrix(self) -> np.ndarray:
        o, i, kh, kw = self.weight.shape
        _, h, w = self.in_shape
        _, oh, ow = self.out_shape
        matrix = np.zeros((o, oh * ow, i, h * w))
        rows = np.arange(oh)[:, None] * self.stride[0]
        cols = np.arange(ow)[None, :] * self.stride[1]
        for dy in range(kh):
            for dx in range(kw):
                sy = rows + dy - self.padding[0]
                sx = cols + dx - self.padding[1]
                inside = ((sy >= 0) & (sy < h)) & ((sx >= 0) & (sx < w))
                out_pixel = np.flatnonzero(inside)
                in_pixel = (np.broadcast_to(sy, inside.shape) * w + sx)[inside]
                matrix[:, out_pixel, :, in_pixel] += self.weight[:, :, dy, dx][None]
        return matrix.reshape(o * oh * ow, i * h * w)

    def matrix(self) -> np.ndarray:
        return self._matrix

    def describe(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"conv {i}->{o} {kh}x{kw}/{self.stride[0]} pad {self.padding[0]}"


@dataclass(frozen=True, eq=False)
class Pool:
    """Window sum per channel: ``y[c, Y, X] = sum x[c, sY + a, sX + b]``, ``a < kh, b < kw``."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    in_shape: Shape
    out_shape: Shape = field(init=False)
    multiplies = False

    def __post_init__(self) -> None:
        c, h, w = self.in_shape
        out = (
            c,
            (h - self.kernel[0]) // self.stride[0] + 1,
            (w - self.kernel[1]) // self.stride[1] + 1,
        )
        object.__setattr__(self, "out_shape", out)

    def matrix(self) -> np.ndarray:
        c = self.in_shape[0]
        weight = np.zeros((c, c, *self.kernel))
        for channel in range(c):
            weight[channel, channel] = 1.0
        return Conv(weight, self.stride, (0, 0), self.in_shape).matrix()

    def describe(self) -> str:
        return f"pool {self.kernel[0]}x{self.kernel[1]}/{self.stride[0]}"


@dataclass(frozen=True, eq=False)
class Diagonal:
    """``y = factor * x`` element-wise (``factor`` broadcast from per-channel or scalar)."""

    factor: np.ndarray  # flattened, one per element
    in_shape: Shape
    multiplies = True

    @property
    def out_shape(self) -> Shape:
        return self.in_shape

    def matrix(self) -> np.ndarray:
        return np.diag(self.factor)

    def describe(self) -> str:
        return f"scale {size_of(self.in_shape)}"


@dataclass(frozen=True, eq=False)
class Reshape:
    """A change of shape that keeps the flattened order (``flatten``)."""

    in_shape: Shape
    out_shape: Shape
    multiplies = False

    def matrix(self) -> np.ndarray:
        return np.eye(size_of(self.in_shape))

    def describe(self) -> str:
        return f"reshape {self.in_shape}->{self.out_shape}"


LinearOp = Dense | Conv | Pool | Diagonal | Reshape


@dataclass(frozen=True, eq=False)
class Chain:
    """Operators applied in order (the first one reads the input); no operator: identity."""

    ops: tuple[LinearOp, ...]
    in_shape: Shape

    @property
    def out_shape(self) -> Shape:
        return self.ops[-1].out_shape if self.ops else self.in_shape

    @functools.cached_property
    def _matrix(self) -> np.ndarray:
        matrix = np.eye(size_of(self.in_shape))
        for op in self.ops:
            matrix = op.matrix() @ matrix
        return matrix

    def matrix(self) -> np.ndarray:
        return self._matrix

    @property
    def multiplications(self) -> int:
        return sum(1 for op in self.ops if op.multiplies)

    def describe(self) -> str:
        return " . ".join(op.describe() for op in self.ops)


def compose(first: Chain, op: LinearOp | Chain) -> Chain:
    """Return ``op`` applied after ``first``."""
    after = op.ops if isinstance(op, Chain) else (op,)
    return Chain(first.ops + after, first.in_shape)
