"""Compile an artifact into a batch plan: activations as polynomials, weights as integers.

The normalised graph (``graph.py``) becomes the exact network (``FloatLinear`` and
``FloatPoly`` steps, residual joins included), ``parameters`` plans its levels, scales and
primes, and each term's weights are rounded to integers at its exact weight scale. Units that
are constant or unused once rounded are pruned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from he_service.artifacts import ModelArtifact
from he_service.engine.batch.parameters import ParameterChoice, choose_parameters
from he_service.engine.batch.plan import (
    INPUT,
    BatchAffine,
    BatchLayer,
    BatchPlan,
    BatchPoly,
    BatchTerm,
    FloatLinear,
    FloatPoly,
    FloatStep,
)
from he_service.engine.graph import (
    CompileError,
    Graph,
    InputNode,
    LinearNode,
    PolyNode,
    build_graph,
)
from he_service.engine.poly import CubicStep, PolyStep, QuarticStep, SquareStep

__all__ = ["compile_batch_plan"]


def compile_batch_plan(
    artifact: ModelArtifact,
    *,
    poly_modulus_degree: int | None = None,
    candidates: Sequence[tuple[int, int, int]] | None = None,
) -> BatchPlan:
    """Compile an artifact for one sample per slot.

    Args:
        artifact: a model checked by ``load_artifact``.
        poly_modulus_degree: force the ring degree; by default the smallest of 8192, 16384,
            32768 that holds the network (N/2 samples per request).
        candidates: (scale bits, weight bits, last-layer weight bits) to choose from, most
            precise first (measurements); by default the calibrated list.

    Returns:
        The plan: CKKS parameters, integer layers, the exact network for reference.

    Raises:
        CompileError: an unsupported layer, or a network too deep for 128-bit parameters.
    """
    graph = build_graph(artifact)
    steps = _network(graph)
    polys = {
        index: replace(_poly_of(step.step), source=step.source)
        for index, step in enumerate(steps)
        if isinstance(step, FloatPoly)
    }
    choice = choose_parameters(steps, polys, poly_modulus_degree, candidates)
    layers = _integer_layers(steps, polys, choice)
    last = steps[-1]
    assert isinstance(last, FloatLinear)
    return BatchPlan(
        params=choice.params,
        params_reason=choice.reason,
        steps=steps,
        layers=layers,
        input_length=int(math.prod(artifact.input_shape)),
        output_length=int(last.bias.shape[0]),
    )


def _network(graph: Graph) -> tuple[FloatStep, ...]:
    """Return the graph's nodes as dense steps; node ``i`` becomes step ``i - 1``.

    Raises:
        CompileError: a graph shape the batch plan does not evaluate (the graph builder
            never makes one: an activation reading anything but the map right before it, a
            map reading another map, or an output that is not a map).
    """

    def source_of(node: int) -> int:
        return INPUT if node == 0 else node - 1

    steps: list[FloatStep] = []
    readers: dict[int, int] = {}
    for number, node in enumerate(graph.nodes):
        if isinstance(node, InputNode):
            if number:
                raise CompileError("the batch plan takes one input tensor")
            continue
        if isinstance(node, PolyNode):
            if not isinstance(graph.nodes[node.source], LinearNode):
                raise CompileError("the batch plan applies an activation only to an affine map")
            readers[node.source] = readers.get(node.source, 0) + 1
            steps.append(FloatPoly(source_of(node.source), node.step))
            continue
        terms = []
        for term in node.terms:
            if isinstance(graph.nodes[term.source], LinearNode):
                raise CompileError("the batch plan does not read an affine map's value twice")
            terms.append((source_of(term.source), np.asarray(term.chain.matrix(), np.float64)))
        steps.append(FloatLinear(tuple(terms), np.asarray(node.bias, dtype=np.float64)))
    if not steps or not isinstance(steps[-1], FloatLinear):
        raise CompileError("the network must end with an affine map")
    if any(count > 1 for count in readers.values()):
        raise CompileError("the batch plan applies one activation per affine map")
    return tuple(steps)


def _poly_of(step: PolyStep) -> BatchPoly:
    """Return an activation's coefficients, lowest first.

    The known forms are expanded exactly: x^2; (x^2 + k)^2 + m x; x (x^2 + k) or
    x^2 (c3 x + c2) + c1 x. Anything else is read off ``simulate`` (the definition of a step)
    and checked at other points.
    """
    known = _known_coefficients(step)
    if known is not None:
        return BatchPoly(known, step.description)
    points = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    coeffs = np.polynomial.polynomial.polyfit(points, step.simulate(points), 4)
    largest = float(np.max(np.abs(coeffs)))
    coeffs[np.abs(coeffs) <= 1e-12 * largest] = 0.0
    degree = int(np.max(np.flatnonzero(coeffs), initial=0))
    if abs(coeffs[degree] - 1.0) <= 1e-12:
        coeffs[degree] = 1.0
    probe = np.array([-3.0, -0.5, 0.7, 3.0])
    expected = step.simulate(probe)
    if degree < 2 or not np.allclose(
        np.polynomial.polynomial.polyval(probe, coeffs[: degree + 1]),
        expected,
        rtol=1e-9,
        atol=1e-9 * float(np.max(np.abs(expected))),
    ):
        raise CompileError(f"activation {step.description!r} is not a polynomial of degree 2-4")
    return BatchPoly(tuple(float(c) for c in coeffs[: degree + 1]), step.description)


def _known_coefficients(step: PolyStep) -> tuple[float, ...] | None:
    if isinstance(step, SquareStep):
        return (0.0, 0.0, 1.0)
    # Read through getattr: the cubic's parametrisation has changed before.
    k, m = getattr(step, "k", None), getattr(step, "m", None)
    if isinstance(step, QuarticStep) and k is not None and m is not None:
        return (float(k) * float(k), float(m), 2.0 * float(k), 0.0, 1.0)
    if isinstance(step, CubicStep):
        if k is not None:
            return (0.0, float(k), 0.0, 1.0)
        c1, c2, c3 = (getattr(step, name, None) for name in ("c1", "c2", "c3"))
        if c1 is not None and c2 is not None and c3 is not None and c3:
            return (0.0, float(c1), float(c2), float(c3))
    return None


def _integer_layers(
    steps: Sequence[FloatStep], polys: Mapping[int, BatchPoly], choice: ParameterChoice
) -> tuple[BatchLayer, ...]:
    """Round weights to integers, then prune units that are constant or unused.

    A hidden unit whose integer weights are all zero (in every term) is a constant: its
    activation value goes into the bias of every layer that reads it. A unit that no reader's
    weight reads is dropped. Both repeat until nothing changes, so no ciphertext is ever
    computed for nothing (and SEAL never sees an all-zero, "transparent", ciphertext).
    """
    final = len(steps) - 1
    weights: dict[int, list[np.ndarray]] = {}
    divisors: dict[int, list[float]] = {}
    biases: dict[int, np.ndarray] = {}
    readers: dict[int, list[tuple[int, int]]] = {INPUT: []}
    for index, step in enumerate(steps):
        readers[index] = []
        if isinstance(step, FloatPoly):
            continue
        scales = choice.term_scales[index]
        weights[index] = [
            np.round(matrix * t.weight_scale)
            for (_, matrix), t in zip(step.terms, scales, strict=True)
        ]
        divisors[index] = [t.weight_scale for t in scales]
        biases[index] = np.asarray(step.bias, dtype=np.float64).copy()
        for t, (source, _) in enumerate(step.terms):
            readers[source].append((index, t))
    alive = {index: np.ones(biases[index].shape[0], dtype=bool) for index in weights}
    changed = True
    while changed:
        changed = False
        for index, poly in polys.items():
            source = poly.source
            live = alive[source]
            weighted = np.zeros(live.shape, dtype=bool)
            for w in weights[source]:
                weighted |= np.any(w != 0, axis=1)
            constant = live & ~weighted
            if np.any(constant):
                values = poly.simulate(biases[source][constant])
                for layer, t in readers[index]:
                    w = weights[layer][t]
                    biases[layer] = biases[layer] + (w[:, constant] / divisors[layer][t]) @ values
                    w[:, constant] = 0.0
                live[constant] = False
                changed = True
            read = np.zeros(live.shape, dtype=bool)
            for layer, t in readers[index]:
                read |= np.any(weights[layer][t] != 0, axis=0)
            unused = live & ~read
            if np.any(unused):
                live[unused] = False
                for w in weights[source]:
                    w[unused, :] = 0.0
                changed = True
    if not any(np.any(w != 0) for w in weights[final]):
        raise CompileError(
            "every output of the network is a constant once weights are rounded: the model "
            "does not depend on its input"
        )
    alive[final][:] = True  # constant outputs stay: the evaluator writes their value
    position = {index: np.cumsum(alive[poly.source]) - 1 for index, poly in polys.items()}
    layers: list[BatchLayer] = []
    for index, step in enumerate(steps):
        if isinstance(step, FloatPoly):
            layers.append(polys[index])
            continue
        rows = np.flatnonzero(alive[index])
        plan = choice.schedule[index]
        terms = []
        for t, (source, _) in enumerate(step.terms):
            w = weights[index][t][rows]
            columns = np.flatnonzero(np.any(w != 0, axis=0))
            if not columns.size:
                continue  # every weight of this term rounds to zero (or reads pruned units)
            scale = choice.term_scales[index][t]
            inputs = columns if source == INPUT else position[source][columns]
            terms.append(
                BatchTerm(
                    source=source,
                    inputs=tuple(int(i) for i in inputs),
                    weights=np.ascontiguousarray(w[:, columns]),
                    weight_scale=scale.weight_scale,
                    shift=scale.shift,
                    align=plan.align[t],
                    source_scale=scale.source_scale,
                )
            )
        layers.append(
            BatchAffine(
                terms=tuple(terms),
                bias=biases[index][rows],
                level=plan.level,
                scale=choice.product_scales[index],
                rescales=plan.drops,
                description=_describe(terms, rows.size, plan.drops),
            )
        )
    return tuple(layers)


def _describe(terms: list[BatchTerm], rows: int, rescales: int) -> str:
    weights = sum(t.scalar_multiplications for t in terms)
    live = np.zeros(rows, dtype=bool)
    for t in terms:
        live |= np.any(t.weights != 0, axis=1)
    constant = int(np.count_nonzero(~live))
    columns = "+".join(str(len(t.inputs)) for t in terms) or "0"
    join = ""
    if len(terms) > 1:
        sources = ", ".join("input" if t.source == INPUT else f"layer {t.source}" for t in terms)
        join = f"residual join of {sources}; "
    return (
        f"affine {columns}->{rows} ({join}{weights} integer weights"
        + (f", {constant} constant outputs" if constant else "")
        + f"), {rescales} rescale(s)"
    )
