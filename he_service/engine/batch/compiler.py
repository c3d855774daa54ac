"""Compile an artifact into a batch plan: activations as polynomials, weights as integers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from he_service.artifacts import ModelArtifact
from he_service.engine.batch.parameters import choose_parameters
from he_service.engine.batch.plan import BatchAffine, BatchLayer, BatchPlan, BatchPoly, FloatAffine
from he_service.engine.graph import CompileError, LinearNode, PolyNode, build_graph
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
    ops = _chain_form(artifact)
    affines: list[FloatAffine] = []
    polys: list[PolyStep] = []
    for index, op in enumerate(ops):
        is_affine = isinstance(op, FloatAffine)
        if is_affine != (index % 2 == 0):
            raise CompileError("the batch plan needs affine maps and activations to alternate")
        if is_affine:
            affines.append(op)  # type: ignore[arg-type]
        else:
            polys.append(op)  # type: ignore[arg-type]
    activations = [_poly_of(step) for step in polys]
    choice = choose_parameters(affines, activations, poly_modulus_degree, candidates)
    layers = _integer_layers(affines, activations, choice.weight_scales, choice.rescales)
    steps: tuple[FloatAffine | PolyStep, ...] = tuple(ops)
    return BatchPlan(
        params=choice.params,
        params_reason=choice.reason,
        steps=steps,
        layers=layers,
        input_length=int(math.prod(artifact.input_shape)),
        output_length=int(affines[-1].matrix.shape[0]),
    )


@dataclass
class _Affine:
    matrix: np.ndarray  # (out, in) over the flattened input of this map
    bias: np.ndarray


def _chain_form(artifact: ModelArtifact) -> list[FloatAffine | PolyStep]:
    """Return the network as dense affine maps and polynomial steps, alternating."""
    graph = build_graph(artifact)
    if not graph.is_chain():
        raise CompileError("the batch plan does not evaluate residual blocks yet")
    ops: list[FloatAffine | PolyStep] = []
    for node in graph.nodes[1:]:
        if isinstance(node, LinearNode):
            ops.append(_Affine(node.terms[0].chain.matrix(), node.bias))
        else:
            assert isinstance(node, PolyNode)
            ops.append(node.step)
    return ops


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
    affines: Sequence[FloatAffine],
    polys: Sequence[BatchPoly],
    scales: Sequence[float],
    rescales: Sequence[int],
) -> tuple[BatchLayer, ...]:
    """Round weights to integers, then prune units that are constant or unused.

    A hidden unit whose integer weights are all zero is a constant: its activation value goes
    into the next bias. A unit that no next-layer weight reads is dropped. Both repeat until
    nothing changes, so no ciphertext is ever computed for nothing (and SEAL never sees an
    all-zero, "transparent", ciphertext).
    """
    weights = [np.round(a.matrix * s) for a, s in zip(affines, scales, strict=True)]
    biases = [np.asarray(a.bias, dtype=np.float64).copy() for a in affines]
    inputs = np.arange(weights[0].shape[1])
    last = len(weights) - 1
    changed = True
    while changed:
        changed = False
        for k in range(last):
            nxt = weights[k + 1]
            constant = ~np.any(weights[k] != 0, axis=1)
            if np.any(constant):
                values = polys[k].simulate(biases[k][constant])
                biases[k + 1] = biases[k + 1] + (nxt[:, constant] / scales[k + 1]) @ values
            keep = ~constant & np.any(nxt != 0, axis=0)
            if not np.all(keep):
                weights[k], biases[k], weights[k + 1] = (
                    weights[k][keep],
                    biases[k][keep],
                    nxt[:, keep],
                )
                changed = True
        used = np.any(weights[0] != 0, axis=0)
        if not np.all(used):
            weights[0], inputs = weights[0][:, used], inputs[used]
            changed = True
    if not np.any(weights[last] != 0):
        raise CompileError(
            "every output of the network is a constant once weights are rounded: the model "
            "does not depend on its input"
        )
    layers: list[BatchLayer] = []
    for k, w in enumerate(weights):
        constant = int(np.count_nonzero(~np.any(w != 0, axis=1)))
        layers.append(
            BatchAffine(
                weights=w,
                weight_scale=scales[k],
                bias=biases[k],
                inputs=tuple(int(i) for i in (inputs if k == 0 else range(w.shape[1]))),
                rescales=rescales[k],
                description=(
                    f"affine {w.shape[1]}->{w.shape[0]} ({np.count_nonzero(w)} integer weights"
                    + (f", {constant} constant outputs" if constant else "")
                    + f"), {rescales[k]} rescale(s)"
                ),
            )
        )
        if k < last:
            layers.append(polys[k])
    return tuple(layers)
