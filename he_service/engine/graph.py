"""The normalised network: linear nodes and polynomial nodes, residual joins included.

An artifact's layers are rewritten into a small graph that both plans compile:

* ``InputNode``: the preprocessed sample.
* ``LinearNode``: ``y = sum_t chain_t(x_t) + bias``, each term a chain of linear operators
  (``ops.py``) applied to an earlier input or polynomial node. Consecutive linear layers merge
  into one node (so every node costs one plaintext product per term, hence no level of its
  own); a residual join ``x + f(x)`` is a node with two terms. Every chain holds exactly one
  multiplying operator (weights, or a per-element scale), between operators that only move and
  add values (pooling windows, reshapes).
* ``PolyNode``: a polynomial step applied to the linear node right before it. A fitted
  polynomial ``p(x) = scale * step(x + shift) + offset`` puts ``shift`` into the bias of the
  node before and ``scale``, ``offset`` into every term that reads it, so only ``step`` costs
  levels.

Nodes are in topological order and the last one is the output (a linear node).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from he_service.artifacts import Add, Conv2d, Flatten, Layer, Linear, ModelArtifact, Poly
from he_service.engine.ops import (
    Chain,
    Conv,
    Dense,
    Diagonal,
    LinearOp,
    Pool,
    Reshape,
    compose,
    size_of,
)
from he_service.engine.poly import MAX_POLY_DEGREE, PolyStep, depressed, significant

__all__ = [
    "CompileError",
    "Graph",
    "InputNode",
    "LinearNode",
    "Node",
    "PolyNode",
    "Term",
    "build_graph",
]

Shape = tuple[int, ...]


class CompileError(ValueError):
    """The network cannot be expressed as a plan; the message says which layer and why."""


@dataclass(eq=False)
class Term:
    """One summand of a linear node: ``chain`` applied to node ``source``."""

    source: int
    chain: Chain


@dataclass(eq=False)
class InputNode:
    shape: Shape


@dataclass(eq=False)
class LinearNode:
    terms: list[Term]
    bias: np.ndarray  # flattened, one per output element
    shape: Shape


@dataclass(eq=False)
class PolyNode:
    source: int  # a LinearNode
    step: PolyStep
    shape: Shape


Node = InputNode | LinearNode | PolyNode


@dataclass
class Graph:
    """The normalised network (see the module docstring)."""

    nodes: list[Node]
    _magnitudes: list[float] | None = field(default=None, repr=False, compare=False)

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    @property
    def input_shape(self) -> Shape:
        first = self.nodes[0]
        assert isinstance(first, InputNode)
        return first.shape

    def linear_nodes(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if isinstance(n, LinearNode)]

    def poly_nodes(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if isinstance(n, PolyNode)]

    def consumers(self, index: int) -> list[int]:
        """Return the nodes that read node ``index``."""
        found = []
        for i, node in enumerate(self.nodes):
            if isinstance(node, LinearNode) and any(t.source == index for t in node.terms):
                found.append(i)
            elif isinstance(node, PolyNode) and node.source == index:
                found.append(i)
        return found

    def levels(self) -> list[int]:
        """Return the primes consumed before each node (the longest path, per node)."""
        used: list[int] = []
        for node in self.nodes:
            if isinstance(node, InputNode):
                used.append(0)
            elif isinstance(node, PolyNode):
                used.append(used[node.source] + node.step.primes)
            else:
                used.append(max(used[t.source] for t in node.terms))
        return used

    @property
    def depth(self) -> int:
        return self.levels()[self.output]

    def is_chain(self) -> bool:
        """Return True for a straight network: every linear node has one term."""
        return all(
            len(n.terms) == 1 and n.terms[0].source == i - 1
            for i, n in enumerate(self.nodes)
            if isinstance(n, LinearNode)
        )

    def simulate(self, x: np.ndarray, *, capture: bool = False) -> list[np.ndarray]:
        """Return every node's value (flattened) on one input, in float64 (dense matrices)."""
        values: list[np.ndarray] = []
        for node in self.nodes:
            if isinstance(node, InputNode):
                values.append(np.asarray(x, dtype=np.float64).reshape(-1))
            elif isinstance(node, PolyNode):
                values.append(node.step.simulate(values[node.source]))
            else:
                total = node.bias.copy()
                for term in node.terms:
                    total = total + term.chain.matrix() @ values[term.source]
                values.append(total)
        return values

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.simulate(x)[self.output]

    def magnitudes(self) -> list[float]:
        """Return log2 of every node's RMS value for unit-normal inputs (computed once)."""
        if self._magnitudes is None:
            rng = np.random.default_rng(0)
            samples = [self.simulate(rng.normal(size=self.input_shape)) for _ in range(16)]
            self._magnitudes = [
                math.log2(float(np.sqrt(np.mean(np.concatenate(v) ** 2))) or 1.0)
                for v in zip(*samples, strict=True)
            ]
        return self._magnitudes


@dataclass
class _Expr:
    """A linear expression over materialised nodes, not yet a node itself."""

    terms: list[Term]
    bias: np.ndarray
    shape: Shape

    def apply(self, op: LinearOp, bias: np.ndarray | None = None) -> _Expr:
        terms = [Term(t.source, compose(t.chain, op)) for t in self.terms]
        moved = op.matrix() @ self.bias
        return _Expr(terms, moved if bias is None else moved + bias, op.out_shape)

    def scaled(self, factor: float, offset: float) -> _Expr:
        terms = [Term(t.source, _scaled(t.chain, factor)) for t in self.terms]
        return _Expr(terms, factor * self.bias + offset, self.shape)


@dataclass
class _Builder:
    artifact: ModelArtifact
    nodes: list[Node] = field(default_factory=list)

    def build(self) -> Graph:
        shape = tuple(self.artifact.input_shape)
        self.nodes.append(InputNode(shape))
        expr = _Expr([Term(0, Chain((), shape))], np.zeros(size_of(shape)), shape)
        expr = self.chain(self.artifact.layers, expr, "layers")
        self.materialise(expr, "the output")
        return Graph(self.nodes)

    def chain(self, layers: Sequence[Layer], expr: _Expr, path: str) -> _Expr:
        for index, layer in enumerate(layers):
            expr = self.layer(layer, expr, f"{path}[{index}]")
        return expr

    def layer(self, layer: Layer, expr: _Expr, where: str) -> _Expr:
        if isinstance(layer, Flatten):
            return expr.apply(Reshape(expr.shape, (size_of(expr.shape),)))
        if isinstance(layer, Linear):
            return expr.apply(Dense(layer.weight, expr.shape, (layer.weight.shape[0],)), layer.bias)
        if isinstance(layer, Conv2d):
            op = _conv_op(layer, expr.shape)
            spread = np.repeat(layer.bias, size_of(op.out_shape) // layer.bias.size)
            return (
                expr.apply(op, spread) if isinstance(op, Conv) else self._pooled(expr, op, spread)
            )
        if isinstance(layer, Add):
            parts = [
                self.chain(branch, expr, f"{where}.branches[{b}]")
                for b, branch in enumerate(layer.branches)
            ]
            terms = [t for part in parts for t in part.terms]
            bias = sum((part.bias for part in parts), np.zeros(size_of(parts[0].shape)))
            return _Expr(terms, bias, parts[0].shape)
        assert isinstance(layer, Poly)
        return self.poly(layer, expr, where)

    def _pooled(self, expr: _Expr, ops: Chain, bias: np.ndarray) -> _Expr:
        for op in ops.ops:
            expr = expr.apply(op)
        expr.bias = expr.bias + bias
        return expr

    def poly(self, layer: Poly, expr: _Expr, where: str) -> _Expr:
        coeffs = significant(layer.coeffs)
        degree = coeffs.size - 1
        if degree > MAX_POLY_DEGREE:
            raise CompileError(
                f"{where}: polynomial of degree {degree}; the engine evaluates degree <= "
                f"{MAX_POLY_DEGREE} (refit the activation with a lower degree)"
            )
        if degree <= 1:  # an affine activation merges into its neighbours
            c0 = float(coeffs[0])
            c1 = float(coeffs[1]) if coeffs.size > 1 else 0.0
            return expr.scaled(c1, c0)
        step, shift, scale, offset = depressed(coeffs)
        expr.bias = expr.bias + shift  # the step sees z = x + shift
        source = self.materialise(expr, where)
        self.nodes.append(PolyNode(source, step, expr.shape))
        node = len(self.nodes) - 1
        identity = _Expr(
            [Term(node, Chain((), expr.shape))], np.zeros(size_of(expr.shape)), expr.shape
        )
        return identity.scaled(scale, offset)

    def materialise(self, expr: _Expr, where: str) -> int:
        terms = _merge_sources(expr.terms)
        if not terms:
            raise CompileError(
                f"{where}: this value does not depend on its input (every weight on the way is "
                "zero): the model does not depend on its input"
            )
        self.nodes.append(LinearNode([_one_product(t) for t in terms], expr.bias, expr.shape))
        return len(self.nodes) - 1


def build_graph(artifact: ModelArtifact) -> Graph:
    """Rewrite an artifact's layers as linear and polynomial nodes.

    Args:
        artifact: a checked model.

    Returns:
        The graph; its last node is the output.

    Raises:
        CompileError: an activation the engine cannot evaluate (degree above 4), or an output
            that does not depend on the input.
    """
    return _Builder(artifact).build()


def _conv_op(layer: Conv2d, in_shape: Shape) -> Conv | Chain:
    """Return the convolution, or a window sum and a per-channel scale for an average pool.

    Average pooling reaches the artifact as a convolution whose kernel is one constant per
    channel on the diagonal (BatchNorm may have scaled it); a window sum needs no product.
    """
    weight = layer.weight
    out_ch, in_ch, kh, kw = weight.shape
    conv = Conv(weight, layer.stride, layer.padding, in_shape)
    if out_ch != in_ch or layer.padding != (0, 0) or kh * kw == 1:
        return conv
    diagonal = weight[np.arange(out_ch), np.arange(out_ch)]
    off = weight.copy()
    off[np.arange(out_ch), np.arange(out_ch)] = 0.0
    per_channel = diagonal[:, :1, :1]
    if np.any(off) or not np.array_equal(diagonal, np.broadcast_to(per_channel, diagonal.shape)):
        return conv
    pool = Pool((kh, kw), layer.stride, in_shape)
    factor = np.repeat(per_channel.reshape(-1), size_of(pool.out_shape) // out_ch)
    return Chain((pool, Diagonal(factor, pool.out_shape)), in_shape)


def _scaled(chain: Chain, factor: float) -> Chain:
    """Multiply a chain by a scalar, inside its last multiplying operator when it has one."""
    ops = list(chain.ops)
    for index in range(len(ops) - 1, -1, -1):
        op = ops[index]
        if isinstance(op, Dense):
            ops[index] = Dense(op.weight * factor, op.in_shape, op.out_shape)
            return Chain(tuple(ops), chain.in_shape)
        if isinstance(op, Conv):
            ops[index] = Conv(op.weight * factor, op.stride, op.padding, op.in_shape)
            return Chain(tuple(ops), chain.in_shape)
        if isinstance(op, Diagonal):
            ops[index] = Diagonal(op.factor * factor, op.in_shape)
            return Chain(tuple(ops), chain.in_shape)
    shape = chain.out_shape
    return compose(chain, Diagonal(np.full(size_of(shape), factor), shape))


def _merge_sources(terms: list[Term]) -> list[Term]:
    """Sum terms that read the same node into one (dense) term."""
    merged: dict[int, Term] = {}
    for term in terms:
        if term.source not in merged:
            merged[term.source] = term
            continue
        first = merged[term.source]
        matrix = first.chain.matrix() + term.chain.matrix()
        op = Dense(matrix, first.chain.in_shape, first.chain.out_shape)
        merged[term.source] = Term(term.source, Chain((op,), first.chain.in_shape))
    return [t for t in merged.values() if _nonzero(t.chain)]


def _nonzero(chain: Chain) -> bool:
    """Return whether a chain can be non-zero (every weighted operator has a non-zero weight)."""
    for op in chain.ops:
        if isinstance(op, Dense | Conv) and not np.any(op.weight):
            return False
        if isinstance(op, Diagonal) and not np.any(op.factor):
            return False
    return not any(isinstance(op, Dense) for op in chain.ops) or bool(np.any(chain.matrix()))


def _one_product(term: Term) -> Term:
    """Rewrite a chain so that it holds exactly one multiplying operator.

    Several (conv after conv without an activation between) merge into one dense map over
    what lies between the first and the last; none (a skip connection) gets a scale of one.
    Per-element scales next to a weighted map fold into it.
    """
    ops = list(term.chain.ops)
    shape_in = term.chain.in_shape
    ops = _fold_scales(ops)
    multiplying = [i for i, op in enumerate(ops) if op.multiplies]
    if not multiplying:
        shape = term.chain.out_shape
        ops.append(Diagonal(np.ones(size_of(shape)), shape))
    elif len(multiplying) > 1:
        first, last = multiplying[0], multiplying[-1]
        inner = Chain(tuple(ops[first : last + 1]), ops[first].in_shape)
        ops[first : last + 1] = [Dense(inner.matrix(), inner.in_shape, inner.out_shape)]
    return Term(term.source, Chain(tuple(ops), shape_in))


def _fold_scales(ops: list[LinearOp]) -> list[LinearOp]:
    """Fold each per-element scale into a neighbouring weighted map, through pools if needed.

    A pool sums a window of one channel, so a per-channel scale commutes with it.
    """
    result = list(ops)
    changed = True
    while changed:
        changed = False
        for index, op in enumerate(result):
            if not isinstance(op, Diagonal):
                continue
            target = _weighted_neighbour(result, index)
            if target is None:
                continue
            result[target] = _times_diagonal(result[target], op, after=target < index)
            del result[index]
            changed = True
            break
    return result


def _weighted_neighbour(ops: list[LinearOp], index: int) -> int | None:
    scale = ops[index]
    assert isinstance(scale, Diagonal)
    per_channel = _per_channel(scale)
    for step in (-1, 1):
        j = index + step
        while 0 <= j < len(ops):
            op = ops[j]
            if isinstance(op, Dense | Conv):
                if isinstance(op, Conv) and per_channel is None:
                    return None
                return j
            if isinstance(op, Diagonal) and (
                per_channel is not None or op.in_shape == scale.in_shape
            ):
                return j
            if (isinstance(op, Pool) and per_channel is not None) or isinstance(op, Reshape):
                j += step
                continue
            break
    return None


def _per_channel(scale: Diagonal) -> np.ndarray | None:
    shape = scale.in_shape
    if len(shape) != 3:
        return None
    grid = scale.factor.reshape(shape[0], -1)
    if not np.all(grid == grid[:, :1]):
        return None
    return grid[:, 0]


def _times_diagonal(op: LinearOp, scale: Diagonal, *, after: bool) -> LinearOp:
    """Return ``op`` with ``scale`` applied after it (or before it)."""
    if isinstance(op, Diagonal):
        return Diagonal(op.factor * _resize(scale, op.in_shape), op.in_shape)
    if isinstance(op, Dense):
        if after:
            factor = _resize(scale, op.out_shape)
            return Dense(op.weight * factor[:, None], op.in_shape, op.out_shape)
        factor = _resize(scale, op.in_shape)
        return Dense(op.weight * factor[None, :], op.in_shape, op.out_shape)
    assert isinstance(op, Conv)
    channels = _per_channel(scale)
    assert channels is not None
    if after:
        return Conv(op.weight * channels[:, None, None, None], op.stride, op.padding, op.in_shape)
    return Conv(op.weight * channels[None, :, None, None], op.stride, op.padding, op.in_shape)


def _resize(scale: Diagonal, shape: Shape) -> np.ndarray:
    """Return the per-element factors of ``scale`` for a tensor of ``shape`` (through pools)."""
    if size_of(shape) == scale.factor.size:
        return scale.factor
    channels = _per_channel(scale)  # C-major order survives pools and flattening
    assert channels is not None
    return np.repeat(channels, size_of(shape) // channels.size)
