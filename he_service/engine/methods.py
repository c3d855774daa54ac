"""Ways to evaluate one term of a linear node, from its input layout to an output layout.

A term is a chain of operators (``ops.py``) with exactly one multiplying operator. Operators
before and after it that only move values (pooling windows, reshapes) become ``WindowSum``
rotations and new layouts; the multiplying operator becomes a ``Product`` (a box of rotation
steps with one plaintext per step, see ``schedule.py``), built by one of:

* ``conv_product``: a convolution on a grid layout, into a grid layout whose channel offsets
  are given (blocks, with channels multiplexed into the gaps a stride leaves). The steps are
  ``kernel offset + input channel offset - output channel offset``: a box over the kernel axes
  and the channel generators, shared by every pixel.
* ``dense_product``: any matrix from any layout to any layout with replicated copies: output
  ``o`` reads input ``i`` at step ``(p_i - q_o) mod R``; when the output repeats more often
  than the input (``R`` = output period), partial sums go to different copies and folds add
  them up (the classic "hybrid" diagonal method; "gather" when inputs are strided).
* ``window_product``: a contiguous replicated input into a strided output: output ``j`` sums a
  window of ``W`` consecutive slots, ``P / W`` steps, then ``log2 W`` folds (dirty output:
  never the last layer).
* ``scale_product``: an element-wise scale in place (one plaintext, no rotation).
* ``gather_input``: the first map when the client lays the input out: every slot receives the
  input value its weight multiplies (an index table on the card), so the map is plaintext
  products over a few ciphertexts and folds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from he_service.engine.layout import Grid, Layout, next_pow2
from he_service.engine.ops import Chain, Conv, Diagonal, LinearOp, Pool, Reshape
from he_service.engine.schedule import Box, Product, Rotation, WindowSum

__all__ = [
    "GatherInput",
    "TermPlan",
    "conv_product",
    "dense_product",
    "free_op",
    "gather_input",
    "scale_product",
    "window_product",
]

Coords = tuple[int, ...]
# Cost of a schedule in milliseconds: (rotations, products) -> cost.
CostFn = Callable[[list[Rotation], int], float]


@dataclass(frozen=True, eq=False)
class GatherInput:
    """``y = fold(sum_k P_k * x_k) + bias`` over the client's ``index.shape[0]`` ciphertexts."""

    plaintexts: tuple[np.ndarray, ...]
    index: np.ndarray  # (ciphertexts, period): input element per slot, -1 for zero
    folds: tuple[int, ...]
    slots: int

    def rotations(self) -> list[Rotation]:
        return [Rotation(f, True) for f in self.folds]

    def scaled(self, factor: float) -> GatherInput:
        plains = tuple(p * factor for p in self.plaintexts)
        return GatherInput(plains, self.index, self.folds, self.slots)

    def simulate(self, inputs: list[np.ndarray]) -> np.ndarray:
        total = sum(
            (p * x for p, x in zip(self.plaintexts, inputs, strict=True)), np.zeros(self.slots)
        )
        for fold in self.folds:
            total = total + np.roll(total, -fold)
        return total


@dataclass(frozen=True, eq=False)
class TermPlan:
    """How one term runs: window sums, the product, window sums; and where its result sits."""

    source: int
    pre: tuple[WindowSum, ...]
    product: Product | GatherInput
    post: tuple[WindowSum, ...]
    out: Layout
    description: str

    def rotations(self) -> list[Rotation]:
        found = [r for w in self.pre for r in w.rotations()]
        found += self.product.rotations()
        found += [r for w in self.post for r in w.rotations()]
        return found

    @property
    def products(self) -> int:
        if isinstance(self.product, GatherInput):
            return len(self.product.plaintexts)
        return len(self.product.diagonals)


def free_op(
    op: LinearOp, layout: Layout, slots: int, *, on_product: bool
) -> tuple[WindowSum | None, Layout] | None:
    """Apply a pooling window or a reshape to a layout; None if the layout cannot take it."""
    if isinstance(op, Reshape):
        return None, layout.reshaped(op.out_shape)
    assert isinstance(op, Pool)
    grid = layout.grid
    if grid is None:
        return None
    box = Box((grid.xs % slots, grid.ys % slots), (op.kernel[1], op.kernel[0]))
    out_grid = grid.strided(op.stride[0], op.stride[1])
    out = Layout.of_grid(op.out_shape, out_grid, layout.period, clean=False)
    return WindowSum(box, slots, on_product), out


def split_chain(chain: Chain) -> tuple[tuple[LinearOp, ...], LinearOp, tuple[LinearOp, ...]]:
    """Return the free operators before the multiplying one, it, and those after."""
    index = next(i for i, op in enumerate(chain.ops) if op.multiplies)
    return chain.ops[:index], chain.ops[index], chain.ops[index + 1 :]


def _best_product(
    box: Box,
    diagonals: dict[Coords, np.ndarray],
    folds: tuple[int, ...],
    slots: int,
    offset: int,
    cost: CostFn,
    allow_babies: bool,
    *,
    modulus: int | None = None,
) -> Product:
    """Simplify the box, then pick the cheapest split of its axes into babies and giants.

    Steps matter modulo ``modulus``, the period the input repeats with (default: slots).
    """
    box, combined = simplify(box, diagonals, slots, modulus or slots)
    if not combined:
        combined = {(0,) * len(box.sizes): np.zeros(slots)}
    dims = range(len(box.sizes))
    splits: list[tuple[int, ...]] = [()]
    if allow_babies:
        splits = [s for r in range(len(box.sizes) + 1) for s in itertools.combinations(dims, r)]
    best: tuple[float, Product] | None = None
    for babies in splits:
        product = Product(box, combined, tuple(babies), folds, slots, offset)
        value = cost(product.rotations(), len(combined))
        if best is None or value < best[0]:
            best = (value, product)
    assert best is not None
    return best[1]


def simplify(
    box: Box, diagonals: dict[Coords, np.ndarray], slots: int, modulus: int
) -> tuple[Box, dict[Coords, np.ndarray]]:
    """Return an equivalent box with fewer points, and the diagonals on it.

    Coordinates wrap where ``j g`` returns to 0 modulo ``modulus`` (the input's period; it
    divides the slot count); an axis whose
    generator is a multiple ``k`` of another's merges into it (``j_b + k j_a``) when that
    makes fewer points; axes that never move (generator 0 or one point) disappear. Diagonals
    that land on one point have the same step, hence different output slots: they add up.
    """
    generators = [g % modulus for g in box.generators]
    sizes = list(box.sizes)
    points = [list(c) for c in diagonals]
    vectors = list(diagonals.values())

    def wrap() -> None:
        for t, g in enumerate(generators):
            period = modulus // math.gcd(g, modulus) if g else 1
            if sizes[t] > period:
                sizes[t] = period
            for p in points:
                p[t] %= period

    wrap()
    changed = True
    while changed:
        changed = False
        for a, b in itertools.permutations(range(len(generators)), 2):
            ga, gb = generators[a], generators[b]
            if not ga or not gb or ga % gb or sizes[a] == 1 or sizes[b] == 1:
                continue
            k = ga // gb
            merged = (sizes[b] - 1) + k * (sizes[a] - 1) + 1
            if merged >= sizes[a] * sizes[b] and k > 1:
                continue
            for p in points:
                p[b] += k * p[a]
                p[a] = 0
            sizes[b], sizes[a] = merged, 1
            generators[a] = 0
            wrap()
            changed = True
            break
    keep = [t for t, g in enumerate(generators) if g and sizes[t] > 1]
    combined: dict[Coords, np.ndarray] = {}
    for p, vector in zip(points, vectors, strict=True):
        key = tuple(p[t] for t in keep)
        combined[key] = combined[key] + vector if key in combined else vector
    combined = {k: v for k, v in combined.items() if np.any(v)}
    return Box(tuple(generators[t] for t in keep), tuple(sizes[t] for t in keep)), combined


def conv_product(
    conv: Conv,
    inp: Layout,
    out_grid: Grid | None,
    channel_generators: tuple[int, ...],
    channel_coords: tuple[Coords, ...],
    slots: int,
    cost: CostFn,
    *,
    allow_babies: bool,
    out_period: int | None = None,
) -> tuple[Product, Layout] | None:
    """Evaluate a convolution on a grid layout into a grid layout.

    Args:
        conv: the convolution (no bias).
        inp: its input layout, with a grid.
        out_grid: the output grid to produce exactly, or None to place the output channels at
            ``channel_coords . channel_generators`` with the origin that needs no extra
            rotation.
        channel_generators, channel_coords: the output channel placement (when ``out_grid``
            is None).
        slots: the slot count.
        cost: what a schedule costs.
        allow_babies: whether the input may be rotated (see ``schedule.py``).
        out_period: the output's replication period (default: one copy). Replicated channel
            blocks make channel offsets cyclic: the next convolution's steps between input and
            output channels wrap around, so its box shrinks from ``C_in + C_out - 1`` block
            offsets to ``max(C_in, C_out)``. It needs an input repeating at least as often.

    Returns:
        The product and the output layout, or None when the layouts cannot take it.
    """
    grid = inp.grid
    if grid is None:
        return None
    period = inp.period
    out_period = slots if out_period is None else out_period
    if out_period % period:
        return None
    sy, sx = conv.stride
    py, px = conv.padding
    out_c, in_c, kh, kw = conv.weight.shape
    _, height, width = conv.in_shape
    _, out_h, out_w = conv.out_shape
    ys, xs = grid.ys * sy, grid.xs * sx
    if out_grid is None:
        gens_out, coords_out, origin_out = channel_generators, channel_coords, None
    else:
        if (out_grid.ys, out_grid.xs) != (ys, xs):
            return None
        gens_out, coords_out, origin_out = out_grid.generators, out_grid.coords, out_grid.origin
    cin = np.asarray(grid.coords, dtype=np.int64).reshape(in_c, -1)
    cout = np.asarray(coords_out, dtype=np.int64).reshape(out_c, -1)
    top = cout.max(axis=0) if cout.size else np.zeros(0, dtype=np.int64)
    generators = (
        grid.xs % period,
        grid.ys % period,
        *(g % period for g in grid.generators),
        *(g % period for g in gens_out),
    )
    sizes = (
        kw,
        kh,
        *(int(m) + 1 for m in (cin.max(axis=0) if cin.size else [])),
        *(int(m) + 1 for m in top),
    )
    base = (
        (
            grid.origin
            - py * grid.ys
            - px * grid.xs
            - int(top @ np.asarray(gens_out, dtype=np.int64))
        )
        if len(gens_out)
        else grid.origin - py * grid.ys - px * grid.xs
    )
    if origin_out is None:
        origin_out = base
    offset = (base - origin_out) % period
    out_grid = Grid(
        ys, xs, tuple(gens_out), tuple(tuple(int(v) for v in c) for c in cout), origin_out
    )
    out = Layout.of_grid(conv.out_shape, out_grid, out_period, clean=True)
    if not out.is_injective():
        return None
    out_positions = out.positions.reshape(out_c, out_h, out_w)
    copies = np.arange(slots // out_period) * out_period
    # Output pixels whose input pixel at kernel offset (dy, dx) lies inside the image.
    rows = np.arange(out_h)[:, None] * sy
    cols = np.arange(out_w)[None, :] * sx
    diagonals: dict[Coords, np.ndarray] = {}
    for dy, dx in itertools.product(range(kh), range(kw)):
        inside = ((rows + dy - py >= 0) & (rows + dy - py < height)) & (
            (cols + dx - px >= 0) & (cols + dx - px < width)
        )
        if not inside.any():
            continue
        for o in range(out_c):
            slots_o = (out_positions[o][inside][:, None] + copies[None, :]).reshape(-1)
            for i in range(in_c):
                weight = conv.weight[o, i, dy, dx]
                if weight == 0.0:
                    continue
                coords = (
                    dx,
                    dy,
                    *(int(v) for v in cin[i]),
                    *(int(t - v) for t, v in zip(top, cout[o], strict=True)),
                )
                vector = diagonals.setdefault(coords, np.zeros(slots))
                vector[slots_o] += weight
    product = _best_product(
        Box(generators, sizes), diagonals, (), slots, offset, cost, allow_babies, modulus=period
    )
    return product, out


def dense_product(
    matrix: np.ndarray,
    inp: Layout,
    out: Layout,
    slots: int,
    cost: CostFn,
    *,
    allow_babies: bool,
    max_diagonals: int | None = None,
) -> Product | None:
    """Evaluate any matrix from ``inp`` into the (clean) layout ``out``.

    Output ``o`` at ``q_o`` reads input ``i`` at ``p_i`` through the step ``(p_i - q_o) mod R``
    with ``R = min(P_in, P_out)``. If ``P_out < P_in`` the term lands on copy
    ``k = (p_i - q_o - d) / P_out`` of the output, and ``log2(P_in / P_out)`` folds add the
    copies up. Returns None if the output repeats more often than the input allows, or if the
    map needs more than ``max_diagonals`` plaintexts.
    """
    p_in, p_out = inp.period, out.period
    if p_out % p_in and p_in % p_out:
        return None
    span = min(p_in, p_out)
    rows, cols = np.nonzero(matrix)
    if rows.size == 0:
        return None
    q = out.positions[rows]
    p = inp.positions[cols]
    d = (p - q) % span
    steps, inverse = np.unique(d, return_inverse=True)
    if max_diagonals is not None and steps.size > max_diagonals:
        return None
    if p_out < p_in:
        copy = ((p - q - d) // p_out) % (p_in // p_out)
        base = q + copy * p_out
        repeats = p_in
        folds = tuple(p_out << k for k in range(int(math.log2(p_in // p_out))))
    else:
        base = q
        repeats = p_out
        folds = ()
    copies = np.arange(slots // repeats) * repeats
    vectors = np.zeros((steps.size, slots))
    targets = (base[:, None] + copies[None, :]) % slots
    np.add.at(
        vectors,
        (np.repeat(inverse, copies.size), targets.reshape(-1)),
        np.repeat(matrix[rows, cols], copies.size),
    )
    stride = math.gcd(span, *(int(v) for v in steps))
    units = [int(v) // stride for v in steps]
    length = span // stride
    best: Product | None = None
    best_cost = math.inf
    for width in _giant_widths(length, allow_babies):
        box = Box((stride, stride * width), (width, -(-length // width)))
        diagonals: dict[Coords, np.ndarray] = {
            (u % width, u // width): vectors[k] for k, u in enumerate(units)
        }
        product = _best_product(box, diagonals, folds, slots, 0, cost, allow_babies)
        value = cost(product.rotations(), len(product.diagonals))
        if value < best_cost:
            best, best_cost = product, value
    return best


def _giant_widths(length: int, allow_babies: bool) -> list[int]:
    """Baby-axis widths to try for a 1-D range of steps (1: everything on one axis)."""
    if not allow_babies or length <= 2:
        return [1]
    widths = {1 << k for k in range(1, int(math.log2(length)) + 1)}
    root = max(1, round(math.sqrt(length)))
    widths |= {root, root + 1}
    return sorted(w for w in widths if w < length) or [1]


def window_product(
    matrix: np.ndarray, inp: Layout, width: int, slots: int, cost: CostFn, *, allow_babies: bool
) -> tuple[Product, Layout] | None:
    """Evaluate a matrix on a contiguous replicated input into outputs ``width`` slots apart.

    Output ``j``'s partial sums fill the window ``[width j, width (j + 1))``: ``P / width``
    rotated copies of the input cover every input once; ``log2 width`` folds sum the window
    into its first slot. The other slots keep partial sums (a dirty layout).
    """
    m, _ = matrix.shape
    period = inp.period
    if (
        width < 2
        or width > period
        or width * m > slots
        or not np.array_equal(inp.positions, np.arange(inp.size))
    ):
        return None
    in_index = np.full(period, -1)
    in_index[inp.positions] = np.arange(inp.size)
    j = np.arange(m)
    u = np.arange(width)
    diagonals: dict[Coords, np.ndarray] = {}
    for r in range(0, period, width):
        cols = in_index[(width * j[:, None] + u[None, :] + r) % period]
        valid = cols >= 0
        rows_ = np.broadcast_to(j[:, None], cols.shape)
        vector = np.zeros(slots)
        vector[(width * rows_ + u[None, :])[valid]] = matrix[rows_[valid], cols[valid]]
        if np.any(vector):
            diagonals[(r // width,)] = vector
    if not diagonals:
        return None
    folds = tuple(1 << k for k in range(int(math.log2(width))))
    product = _best_product(
        Box((width,), (period // width,)), diagonals, folds, slots, 0, cost, allow_babies
    )
    out = Layout((m,), width * j, slots, False)
    return product, out


def scale_product(op: Diagonal, inp: Layout, slots: int) -> Product:
    """Multiply element-wise in place: one plaintext holding each factor at its element's slots."""
    vector = np.zeros(inp.period)
    vector[inp.positions] = op.factor
    return Product(Box((), ()), {(): np.tile(vector, slots // inp.period)}, (), (), slots)


def gather_input(matrix: np.ndarray, slots: int) -> tuple[GatherInput, Layout]:
    """Compile the first map for a client-gathered input.

    Output ``o`` lives at position ``o`` of blocks of ``B = next_pow2(m)`` slots. Each
    ciphertext holds ``E`` blocks; block ``e`` of ciphertext ``c`` carries, at position ``o``,
    the ``(c * E + e)``-th input that output ``o`` reads. Summing the ciphertexts and folding
    the ``E`` blocks gives every output in every block. The client repeats its ``B * E`` slots
    to fill the ciphertext, so the folds are cyclic and the result clean.
    """
    m = matrix.shape[0]
    block = next_pow2(m)
    supports = [np.flatnonzero(row) for row in matrix]
    terms = max(1, max(s.size for s in supports))
    per_ct = min(next_pow2(terms), slots // block)
    count = -(-terms // per_ct)
    period = block * per_ct
    index = np.full((count, period), -1)
    weights = np.zeros((count, period))
    for o, support in enumerate(supports):
        for t, i in enumerate(support):
            c, e = divmod(t, per_ct)
            index[c, e * block + o] = i
            weights[c, e * block + o] = matrix[o, i]
    copies = slots // period
    folds = tuple(block << k for k in range(int(math.log2(per_ct))))
    step = GatherInput(tuple(np.tile(w, copies) for w in weights), index, folds, slots)
    return step, Layout.contiguous(m, block)
