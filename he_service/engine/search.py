"""Choose a layout for every value and a method for every term: the cheapest plan.

A small dynamic programme walks the graph in order. A state holds the layouts of the values
still to be read (a residual join keeps its skip input alive) and the program so far; each
linear node extends every state with every way its terms can reach a common output layout
(``methods.py``), priced by SEAL's measured cost of a rotation and of a plaintext product at
the level where the node runs, plus what the client pays to encrypt and send its input. Only
the cheapest states survive each node.

Two regimes come from the parameters (``params.py``): with babies, ciphertexts may be
rotated at rest (pooling windows before a convolution, baby steps), which needs primes small
enough for key switching to stay below the rescale noise; without, every rotation acts on a
product, and maps whose windows would rotate an input are evaluated as one dense matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from he_service.engine.graph import CompileError, Graph, InputNode, LinearNode, PolyNode, Term
from he_service.engine.layout import Grid, Layout, next_pow2
from he_service.engine.methods import (
    CostFn,
    TermPlan,
    conv_product,
    dense_product,
    free_op,
    gather_input,
    scale_product,
    split_chain,
    window_product,
)
from he_service.engine.ops import Conv, Diagonal, Pool
from he_service.engine.plan import LinearStep, PolyApply, Step
from he_service.engine.schedule import Product, Rotation, WindowSum

__all__ = ["CostModel", "Layouts", "search_layouts"]

# Milliseconds at N=16384 by primes left (SEAL via sealapi, this project's 2-core reference
# machine, median of 10; see DESIGN.md). Other rings scale with N.
_ROTATE_MS = {1: 1.4, 2: 2.8, 3: 4.7, 4: 7.2, 5: 10.8, 6: 15.0, 7: 20.0, 8: 26.0}
_PRODUCT_MS = 0.11  # per prime: multiply_plain
_ADD_MS = 0.035  # per prime
_ENCRYPT_MS = 1.0  # per prime, client side: encode and encrypt one ciphertext
_SEND_MS_PER_MB = 20.0
_MAX_STATES = 12
GATHERED = "gathered"


@dataclass(frozen=True)
class CostModel:
    """Milliseconds per operation at a level, for one ring."""

    slots: int
    data_primes: int

    @property
    def _ring(self) -> float:
        return self.slots / 8192

    def left(self, level: int) -> int:
        return max(1, self.data_primes - level)

    def rotation(self, level: int) -> float:
        primes = self.left(level)
        return _ROTATE_MS.get(primes, 3.5 * primes) * self._ring

    def product(self, level: int) -> float:
        return (_PRODUCT_MS + _ADD_MS) * self.left(level) * self._ring

    def schedule(self, level: int) -> CostFn:
        def cost(rotations: list[Rotation], products: int) -> float:
            adds = len(rotations) * _ADD_MS * self.left(level) * self._ring
            return len(rotations) * self.rotation(level) + products * self.product(level) + adds

        return cost

    def request(self, ciphertexts: int) -> float:
        megabytes = ciphertexts * self.slots * 2 * self.data_primes * 8 / 2**20
        return (
            ciphertexts * _ENCRYPT_MS * self.data_primes * self._ring + megabytes * _SEND_MS_PER_MB
        )


@dataclass(frozen=True, eq=False)
class Layouts:
    """The chosen program: steps, the client's index table, the output layout, its cost."""

    steps: tuple[Step, ...]
    input_index: np.ndarray
    output: Layout
    cost: float


@dataclass(eq=False)
class _State:
    cost: float
    layouts: dict[int, Layout | str]
    steps: list[Step] = field(default_factory=list)
    index: np.ndarray | None = None


def search_layouts(graph: Graph, model: CostModel, *, allow_babies: bool) -> Layouts:
    """Return the cheapest program for the graph in this ring and regime.

    Raises:
        CompileError: no layout evaluates the network (too wide for the ring, or an output
            that cannot be made clean).
    """
    levels = graph.levels()
    slots = model.slots
    frontier = [
        _State(model.request(1), {0: layout}, index=_index_of(layout))
        for layout in _input_layouts(graph, slots)
    ]
    if _gatherable(graph):
        frontier.append(_State(0.0, {0: GATHERED}))
    for number, node in enumerate(graph.nodes):
        if isinstance(node, InputNode):
            continue
        successors: list[_State] = []
        for state in frontier:
            if isinstance(node, PolyNode):
                source = state.layouts[node.source]
                assert isinstance(source, Layout)
                clean = source.clean and float(node.step.simulate(np.zeros(1))[0]) == 0.0
                layout = Layout(source.shape, source.positions, source.period, clean, source.grid)
                step = PolyApply(number, node.source, node.step, levels[node.source])
                successors.append(
                    _State(
                        state.cost,
                        {**state.layouts, number: layout},
                        [*state.steps, step],
                        state.index,
                    )
                )
                continue
            last = number == graph.output
            for linear, cost, index in _linear_options(
                graph, number, node, state, levels[number], model, allow_babies, last
            ):
                layouts = {**state.layouts, number: linear.out}
                successors.append(
                    _State(
                        state.cost + cost,
                        layouts,
                        [*state.steps, linear],
                        index if index is not None else state.index,
                    )
                )
        alive = {n for n in range(number + 1) if any(c > number for c in graph.consumers(n))} | {
            number
        }
        for state in successors:
            state.layouts = {n: v for n, v in state.layouts.items() if n in alive}
        frontier = _prune(successors)
        if not frontier:
            raise CompileError(
                f"no slot layout of {slots} slots evaluates node {number} of the network"
            )
    best = min(frontier, key=lambda s: s.cost)
    assert best.index is not None
    output = best.layouts[graph.output]
    assert isinstance(output, Layout)
    return Layouts(tuple(best.steps), best.index, output, best.cost)


def _prune(states: list[_State]) -> list[_State]:
    """Keep the cheapest state per combination of live layouts, then the cheapest few."""
    best: dict[tuple[object, ...], _State] = {}
    for state in states:
        key = tuple(
            (n, v if isinstance(v, str) else v.key) for n, v in sorted(state.layouts.items())
        )
        if key not in best or state.cost < best[key].cost:
            best[key] = state
    return sorted(best.values(), key=lambda s: s.cost)[:_MAX_STATES]


def _index_of(layout: Layout) -> np.ndarray:
    index = np.full((1, layout.period), -1, dtype=np.int64)
    index[0, layout.positions] = np.arange(layout.size)
    return index


def _gatherable(graph: Graph) -> bool:
    """The client can gather the first map's inputs if that map is the input's only reader."""
    readers = graph.consumers(0)
    if len(readers) != 1:
        return False
    node = graph.nodes[readers[0]]
    return isinstance(node, LinearNode) and sum(t.source == 0 for t in node.terms) == 1


def _input_layouts(graph: Graph, slots: int) -> Iterator[Layout]:
    """Yield the single-ciphertext layouts the client may send (image grids, vectors)."""
    shape = graph.input_shape
    size = math.prod(shape)
    if size > slots:
        return
    if len(shape) == 1:
        yield Layout.contiguous(size, next_pow2(size))
        return
    channels, height, width = shape
    pads = {0} | {_first_padding(graph)}
    for pad in sorted(pads):
        ys = width + 2 * pad
        extent = (height + 2 * pad - 1) * ys + width + 2 * pad
        block = next_pow2(extent)
        if channels * block > slots:
            continue
        origin = pad * ys + pad
        if channels == 1:
            grid = Grid(ys, 1, (), ((),), origin)
            yield Layout.of_grid(shape, grid, block, clean=True)
        else:
            grid = Grid(ys, 1, (block,), tuple((c,) for c in range(channels)), origin)
            yield Layout.of_grid(shape, grid, next_pow2(channels * block), clean=True)


def _first_padding(graph: Graph) -> int:
    for index in graph.consumers(0):
        node = graph.nodes[index]
        if isinstance(node, LinearNode):
            for term in node.terms:
                if term.source == 0:
                    for op in term.chain.ops:
                        if isinstance(op, Conv):
                            return max(op.padding)
    return 0


def _linear_options(
    graph: Graph,
    number: int,
    node: LinearNode,
    state: _State,
    level: int,
    model: CostModel,
    allow_babies: bool,
    last: bool,
) -> Iterator[tuple[LinearStep, float, np.ndarray | None]]:
    """Yield every way to evaluate a linear node from this state: step, cost, input table."""
    slots = model.slots
    cost = model.schedule(level)
    per_term = [
        _term_options(term, state.layouts[term.source], node.shape, slots, cost, allow_babies, last)
        for term in node.terms
    ]
    if len(node.terms) == 1:
        for plan, value, index in per_term[0]:
            yield _step(number, node, (plan,), level), value, index
        return
    targets: dict[tuple[object, ...], Layout] = {}
    for options in per_term:
        for plan, _, _ in options:
            targets.setdefault(plan.out.key, plan.out)
    for target in targets.values():
        chosen: list[TermPlan] = []
        total = 0.0
        for term, options in zip(node.terms, per_term, strict=True):
            found = [(p, v) for p, v, _ in options if p.out.key == target.key]
            found += list(
                _to_target(term, state.layouts[term.source], target, slots, cost, allow_babies)
            )
            if not found:
                break
            plan, value = min(found, key=lambda item: item[1])
            chosen.append(plan)
            total += value
        else:
            yield _step(number, node, tuple(chosen), level), total, None


def _step(number: int, node: LinearNode, plans: tuple[TermPlan, ...], level: int) -> LinearStep:
    out = plans[0].out
    bias = np.zeros(out.period)
    bias[out.positions] = node.bias
    slots = plans[0].product.slots
    vector = np.tile(bias, slots // out.period)
    if not out.clean:
        # Dirty slots keep partial sums; the bias goes only where the values are.
        vector = np.zeros(slots)
        vector[out.positions] = node.bias
    description = " + ".join(p.description for p in plans)
    return LinearStep(number, plans, vector, out, level, description)


def _term_options(
    term: Term,
    source: Layout | str,
    shape: tuple[int, ...],
    slots: int,
    cost: CostFn,
    allow_babies: bool,
    last: bool,
) -> list[tuple[TermPlan, float, np.ndarray | None]]:
    """Every way one term can run from its source layout, with its natural output layouts."""
    options: list[tuple[TermPlan, float, np.ndarray | None]] = []
    size = math.prod(shape)
    if source == GATHERED:
        step, out = gather_input(term.chain.matrix(), slots)
        out = Layout(shape, out.positions, out.period, out.clean)
        plan = TermPlan(
            term.source, (), step, (), out, f"gathered input ({step.index.shape[0]} ciphertexts)"
        )
        options.append((plan, cost(step.rotations(), len(step.plaintexts)), step.index))
        return options
    assert isinstance(source, Layout)
    structured = _structured(term, source, slots, cost, allow_babies)
    for plan, value in structured:
        if last and not _is_prefix(plan.out):
            continue
        options.append((plan, value, None))
    # Always possible: the whole chain as one dense map into a contiguous layout. More
    # plaintexts than the most replicated output needs are never worth it.
    matrix = term.chain.matrix()
    limit: int | None = None
    for period in _periods(size, source.period, slots):
        out = Layout.contiguous(size, period).reshaped(shape)
        product = dense_product(
            matrix, source, out, slots, cost, allow_babies=allow_babies, max_diagonals=limit
        )
        if product is not None and limit is None:
            limit = max(64, 2 * len(product.diagonals))
        if product is not None:
            plan = TermPlan(
                term.source,
                (),
                product,
                (),
                out,
                f"dense {matrix.shape[1]}->{size} ({len(product.diagonals)} diagonals)",
            )
            options.append((plan, cost(product.rotations(), len(product.diagonals)), None))
    if not last and np.array_equal(source.positions, np.arange(source.size)):
        # Windows narrower than 1/64 of the period need more plaintexts than a dense map.
        width = max(2, source.period // 64)
        while width <= source.period and width * size <= slots:
            built = window_product(matrix, source, width, slots, cost, allow_babies=allow_babies)
            if built is not None:
                product, out = built
                out = Layout(shape, out.positions, out.period, out.clean)
                plan = TermPlan(
                    term.source,
                    (),
                    product,
                    (),
                    out,
                    f"window {matrix.shape[1]}->{size} ({len(product.diagonals)} diagonals)",
                )
                options.append((plan, cost(product.rotations(), len(product.diagonals)), None))
            width *= 2
    return options


def _is_prefix(layout: Layout) -> bool:
    return layout.clean and np.array_equal(layout.positions, np.arange(layout.size))


def _periods(size: int, source_period: int, slots: int) -> list[int]:
    low = next_pow2(size)
    if low > slots:
        return []
    choices = {low, min(slots, max(low, source_period)), slots}
    return sorted(choices)


def _structured(
    term: Term, source: Layout, slots: int, cost: CostFn, allow_babies: bool
) -> list[tuple[TermPlan, float]]:
    """Options that keep the chain's structure: windows, convolution layouts, scales."""
    before, op, after = split_chain(term.chain)
    pre: list[WindowSum] = []
    layout = source
    for free in before:
        if isinstance(free, Pool) and not allow_babies:
            return []  # a window on an input rotates it at rest
        applied = free_op(free, layout, slots, on_product=False)
        if applied is None:
            return []
        window, layout = applied
        if window is not None:
            pre.append(window)
    results: list[tuple[TermPlan, float]] = []
    for product, out, name in _products(op, layout, slots, cost, allow_babies):
        post: list[WindowSum] = []
        final = out
        for free in after:
            applied = free_op(free, final, slots, on_product=True)
            if applied is None:
                break
            window, final = applied
            if window is not None:
                post.append(window)
        else:
            plan = TermPlan(term.source, tuple(pre), product, tuple(post), final, name)
            results.append((plan, cost(plan.rotations(), plan.products)))
    return results


def _products(
    op: object, layout: Layout, slots: int, cost: CostFn, allow_babies: bool
) -> Iterator[tuple[Product, Layout, str]]:
    if isinstance(op, Diagonal):
        out = Layout(op.out_shape, layout.positions, layout.period, True, layout.grid)
        yield scale_product(op, layout, slots), out, "scale"
    elif isinstance(op, Conv) and layout.grid is not None:
        for gens, coords, period in _conv_placements(op, layout, slots):
            built = conv_product(
                op,
                layout,
                None,
                gens,
                coords,
                slots,
                cost,
                allow_babies=allow_babies,
                out_period=period,
            )
            if built is not None:
                product, out = built
                yield product, out, f"{op.describe()} ({len(product.diagonals)} diagonals)"


def _conv_placements(
    conv: Conv, layout: Layout, slots: int
) -> Iterator[tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]]:
    """Yield output channel placements (generators, coordinates, period).

    One block per channel, or blocks with multiplexing. Blocks are either as wide as the
    output needs, or as wide as the input's blocks (then input and output channel offsets
    differ by whole blocks, and a strided output's gaps take the channels that do not fit:
    fewer, fuller products). The blocks are laid out once, or repeated across the ciphertext
    when the input repeats at least as often (cyclic channel offsets for the next layer).
    """
    grid = layout.grid
    assert grid is not None
    out_grid = grid.strided(*conv.stride)
    extent = max(out_grid.extent(conv.out_shape), 1)
    channels = conv.out_shape[0]
    widths = {next_pow2(extent)} | {g for g in grid.generators if g >= extent and g & (g - 1) == 0}
    for block in sorted(widths):
        blocks = slots // block
        placement: tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]
        if blocks < 1:
            continue
        if channels <= blocks:
            placement = ((block,), tuple((o,) for o in range(channels)))
            used = channels
        elif out_grid.xs >= 2 and -(-channels // blocks) <= out_grid.xs:
            placement = ((block, 1), tuple((o % blocks, o // blocks) for o in range(channels)))
            used = blocks
        else:
            continue
        yield (*placement, slots)
        period = next_pow2(used * block)
        if layout.period <= period < slots:
            yield (*placement, period)


def _to_target(
    term: Term, source: Layout | str, target: Layout, slots: int, cost: CostFn, allow_babies: bool
) -> Iterator[tuple[TermPlan, float]]:
    """Ways for one term of a join to produce exactly ``target``."""
    if not isinstance(source, Layout):
        return
    before, op, after = split_chain(term.chain)
    if not before and not after:
        same = source.period == target.period and np.array_equal(source.positions, target.positions)
        if isinstance(op, Diagonal) and same:
            product = scale_product(op, source, slots)
            yield TermPlan(term.source, (), product, (), target, "scale"), cost([], 1)
            return
        if isinstance(op, Conv) and target.grid is not None and source.grid is not None:
            built = conv_product(
                op,
                source,
                target.grid,
                (),
                (),
                slots,
                cost,
                allow_babies=allow_babies,
                out_period=target.period,
            )
            if built is not None and built[1].key == target.key:
                product, out = built
                yield (
                    TermPlan(
                        term.source,
                        (),
                        product,
                        (),
                        out,
                        f"{op.describe()} ({len(product.diagonals)} diagonals)",
                    ),
                    cost(product.rotations(), len(product.diagonals)),
                )
    if target.clean:
        dense = dense_product(
            term.chain.matrix(), source, target, slots, cost, allow_babies=allow_babies
        )
        if dense is not None:
            product = dense
            yield (
                TermPlan(
                    term.source,
                    (),
                    product,
                    (),
                    target,
                    f"dense into a shared layout ({len(product.diagonals)} diagonals)",
                ),
                cost(product.rotations(), len(product.diagonals)),
            )
