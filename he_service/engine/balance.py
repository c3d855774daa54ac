"""Rescale hidden layers so that no value and no weight loses more precision than needed.

A plaintext weight is rounded to a fixed absolute step (one over its weight scale) and a
ciphertext value carries a fixed absolute noise (one over the scale), so a layer whose weights
are 1e-3, or whose inputs are 1e-3, keeps 10 bits fewer than one at 1. After the activations'
coefficients are folded in, both happen. Scaling linear node ``n``'s output by ``a_n``, undone
in every term that reads the activation after it (``x'^2 = a^2 x^2``,
``x'(x'^2 + a^2 k) = a^3 x (x^2 + k)``, ``(x'^2 + a^2 k)^2 + a^3 m x' = a^4 (...)``), moves
bits from the next terms' weights to their inputs and to node ``n``'s weights. The gains that
maximise the worst weight's or value's bits are found by bisection: each gain is the least its
own constraints allow, in graph order, and the output node (which cannot be rescaled) must
still fit. Magnitudes are estimated by running unit-normal inputs through the network.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from he_service.engine.graph import Graph, InputNode, LinearNode, Node, PolyNode, Term
from he_service.engine.ops import Chain, Conv, Dense, Diagonal, LinearOp
from he_service.engine.params import Precision
from he_service.engine.plan import PolyApply, Step
from he_service.engine.poly import CubicStep, PolyStep, QuarticStep, SquareStep

__all__ = ["balance", "balance_gains", "rescale_steps"]

# Noise floors in slot units at N=8192 (measured): fresh and rescale noise about 2^10 on a
# value, CKKS rounding about 2^5 on an encoded weight.
_VALUE_NOISE_BITS = 10
_WEIGHT_NOISE_BITS = 13


def balance(graph: Graph, precision: Precision) -> Graph:
    """Return the graph with every hidden linear node rescaled for the given precision."""
    return _rescaled(graph, balance_gains(graph, precision))


def balance_gains(graph: Graph, precision: Precision) -> dict[int, float]:
    """Return the factor each hidden linear node's output is scaled by (see the docstring)."""
    hidden = [i for i in graph.linear_nodes() if i != graph.output]
    if not hidden:
        return {}
    consumer = {n.source: i for i, n in enumerate(graph.nodes) if isinstance(n, PolyNode)}
    degree = {i: graph.nodes[consumer[i]].step.degree for i in hidden}  # type: ignore[union-attr]
    magnitude = graph.magnitudes()
    weights = {
        i: [_log_max(t.chain) for t in node.terms]
        for i, node in enumerate(graph.nodes)
        if isinstance(node, LinearNode)
    }

    def gains(target: float) -> dict[int, float] | None:
        logs: dict[int, float] = {}
        for index, node in enumerate(graph.nodes):
            if not isinstance(node, LinearNode):
                continue
            bits = precision.last_weight_bits if index == graph.output else precision.weight_bits
            worst = min(
                w + bits - _WEIGHT_NOISE_BITS - _undo(graph, t, logs, degree)
                for w, t in zip(weights[index], node.terms, strict=True)
            )
            if index == graph.output:
                return logs if worst >= target else None
            value = (
                target - magnitude[consumer[index]] - precision.scale_bits + _VALUE_NOISE_BITS
            ) / degree[index]
            logs[index] = max(target - worst, value)
        return logs

    low, high = -64.0, 64.0
    best = gains(low) or dict.fromkeys(hidden, 0.0)
    for _ in range(40):
        middle = (low + high) / 2
        found = gains(middle)
        if found is None:
            high = middle
        else:
            low, best = middle, found
    return {i: 2.0**g for i, g in best.items()}


def _undo(graph: Graph, term: Term, logs: dict[int, float], degree: dict[int, int]) -> float:
    source = graph.nodes[term.source]
    if not isinstance(source, PolyNode):
        return 0.0
    return degree[source.source] * logs.get(source.source, 0.0)


def _log_max(chain: Chain) -> float:
    largest = 0.0
    for op in chain.ops:
        if isinstance(op, Dense):
            largest = float(np.max(np.abs(op.weight)))
        elif isinstance(op, Conv):
            largest = float(np.max(np.abs(op.weight)))
        elif isinstance(op, Diagonal):
            largest = float(np.max(np.abs(op.factor)))
    return math.log2(largest) if largest > 0 else 0.0


def _scaled_op(op: LinearOp, factor: float) -> LinearOp:
    if isinstance(op, Dense):
        return Dense(op.weight * factor, op.in_shape, op.out_shape)
    if isinstance(op, Conv):
        return Conv(op.weight * factor, op.stride, op.padding, op.in_shape)
    if isinstance(op, Diagonal):
        return Diagonal(op.factor * factor, op.in_shape)
    return op


def _scaled(chain: Chain, factor: float) -> Chain:
    return Chain(
        tuple(_scaled_op(op, factor) if op.multiplies else op for op in chain.ops), chain.in_shape
    )


def _poly_rescaled(step: PolyStep, a: float) -> tuple[PolyStep, float]:
    """Return the step that takes ``a x`` to ``a^d step(x)``, and ``a^d``."""
    if isinstance(step, SquareStep):
        return step, a**2
    if isinstance(step, CubicStep):
        return CubicStep(step.c1 * a**2, step.c2 * a, step.c3), a**3
    assert isinstance(step, QuarticStep)
    return QuarticStep(step.k * a**2, step.m * a**3), a**4


def _rescaled(graph: Graph, factors: dict[int, float]) -> Graph:
    nodes: list[Node] = []
    undo: dict[int, float] = {}  # poly node -> factor its readers divide by
    for index, node in enumerate(graph.nodes):
        if isinstance(node, InputNode):
            nodes.append(node)
        elif isinstance(node, LinearNode):
            gain = factors.get(index, 1.0)
            terms = [
                Term(t.source, _scaled(t.chain, gain / undo.get(t.source, 1.0))) for t in node.terms
            ]
            nodes.append(LinearNode(terms, node.bias * gain, node.shape))
        else:
            step, undo[index] = _poly_rescaled(node.step, factors.get(node.source, 1.0))
            nodes.append(PolyNode(node.source, step, node.shape))
    return Graph(nodes)


def rescale_steps(steps: tuple[Step, ...], factors: dict[int, float]) -> tuple[Step, ...]:
    """Apply balance gains to a compiled program: every plaintext of a term, every bias and
    every activation's constants change by a scalar; layouts and schedules stay."""
    result: list[Step] = []
    undo: dict[int, float] = {}
    for step in steps:
        if isinstance(step, PolyApply):
            poly, undo[step.node] = _poly_rescaled(step.step, factors.get(step.source, 1.0))
            result.append(PolyApply(step.node, step.source, poly, step.level))
            continue
        gain = factors.get(step.node, 1.0)
        terms = tuple(
            replace(t, product=t.product.scaled(gain / undo.get(t.source, 1.0))) for t in step.terms
        )
        result.append(replace(step, terms=terms, bias=step.bias * gain))
    return tuple(result)
