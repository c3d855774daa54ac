"""Compile a checked artifact into a latency plan (one sample per request).

The network is first normalised into alternating affine maps and polynomial steps (flatten is
free, consecutive affine maps merge, polynomial coefficients fold into the neighbouring affine
maps) and rebalanced so that every layer's weights use the precision their plaintexts have.
Then each affine map picks, among the ways ``layouts.py`` offers, the one that makes the whole
plan cheapest: a small dynamic programme over layouts, with SEAL's measured cost of a rotation
and of a plaintext product at the level where the map runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from he_service.artifacts import Add, Conv2d, Flatten, Linear, ModelArtifact, Poly
from he_service.engine.layouts import Layout, affine_options, input_step, next_pow2
from he_service.engine.params import choose_params
from he_service.engine.plan import (
    AffineStep,
    CubicStep,
    Plan,
    PolyStep,
    QuarticStep,
    SquareStep,
    Step,
)
from he_service.engine.reference import conv2d

__all__ = ["MAX_POLY_DEGREE", "CompileError", "compile_plan", "normalise"]

MAX_POLY_DEGREE = 4

# Milliseconds per rotation and per plaintext product by data primes left, SEAL at N=8192
# on this project's 2-core reference machine; only their ratios steer the choice.
_ROTATION_MS = {1: 1.0, 2: 2.0, 3: 3.2, 4: 5.0, 5: 6.9, 6: 8.9}
_PRODUCT_MS = 0.06  # per prime


class CompileError(ValueError):
    """The network cannot be expressed as a plan; the message says which layer and why."""


@dataclass
class _Affine:
    matrix: np.ndarray  # (out, in) over the flattened input of this map
    bias: np.ndarray


def compile_plan(artifact: ModelArtifact) -> Plan:
    """Compile an artifact into a plan.

    Args:
        artifact: a model checked by ``load_artifact``.

    Returns:
        The plan: parameters, layouts, steps, Galois steps.

    Raises:
        CompileError: a layer or activation the engine cannot evaluate.
        ParameterError: the network is too deep or too wide for the largest ring.
    """
    ops = normalise(artifact)
    activations = [op for op in ops if not isinstance(op, _Affine)]
    widths = [next_pow2(max(op.matrix.shape)) for op in ops if isinstance(op, _Affine)]
    chain = choose_params(activations, max(widths))
    ops = _balance(ops, chain.params.scale_bits, chain.weight_bits, chain.last_weight_bits)
    affines = [op for op in ops if isinstance(op, _Affine)]
    activations = [op for op in ops if not isinstance(op, _Affine)]
    slots = chain.params.slot_count
    first = input_step(affines[0].matrix, affines[0].bias, slots)

    primes = len(chain.params.coeff_modulus_bits) - 1
    levels = [primes]  # data primes left when each affine map runs
    for act in activations:
        levels.append(levels[-1] - act.primes)
    # Dynamic programme: best (cost, steps) per output layout after each affine map.
    frontier: dict[tuple[int, bool, bytes], tuple[float, list[AffineStep], Layout]] = {
        first.layout.key: (
            _cost(first.step.rotation_count(), first.index.shape[0], primes),
            [],
            first.layout,
        )
    }
    for number, affine in enumerate(affines[1:], start=1):
        last = number == len(affines) - 1
        successors: dict[tuple[int, bool, bytes], tuple[float, list[AffineStep], Layout]] = {}
        for cost, steps, layout in frontier.values():
            for step, out in affine_options(affine.matrix, affine.bias, layout, slots, last=last):
                if last and not out.clean:
                    continue
                total = cost + _cost(step.rotation_count(), len(step.terms), levels[number])
                if out.key not in successors or total < successors[out.key][0]:
                    successors[out.key] = (total, [*steps, step], out)
        frontier = successors
    if not frontier:
        raise CompileError("no layout can evaluate this network's last layer cleanly")
    _, chosen, out_layout = min(frontier.values(), key=lambda item: item[0])
    sequence: list[Step] = [first.step]
    for act, step in zip(activations, chosen, strict=True):
        sequence += [act, step]
    output_length = affines[-1].matrix.shape[0]
    return Plan(
        params=chain.params,
        params_reason=chain.reason,
        steps=tuple(sequence),
        weight_bits=chain.weight_bits,
        last_weight_bits=chain.last_weight_bits,
        input_encoding={
            "kind": "gather",
            "slot_count": slots,
            "ciphertexts": int(first.index.shape[0]),
            "period": int(first.index.shape[1]),
            "length": int(affines[0].matrix.shape[1]),
            "index": first.index.tolist(),
        },
        output_decoding={"kind": "prefix", "length": output_length, "period": out_layout.period},
    )


def _cost(rotations: int, products: int, primes: int) -> float:
    rotation = _ROTATION_MS.get(primes, 1.5 * primes)
    return rotations * rotation + products * _PRODUCT_MS * primes


# Noise floors in slot units at N=8192 (measured): fresh and rescale noise about 2^10 on a
# value, CKKS rounding about 2^5 on an encoded weight.
_VALUE_NOISE_BITS = 10
_WEIGHT_NOISE_BITS = 13


def _balance(
    ops: list[_Affine | PolyStep], scale_bits: int, weight_bits: int, last_bits: int
) -> list[_Affine | PolyStep]:
    """Rescale hidden layers so that no value and no weight loses more precision than needed.

    A plaintext weight is rounded to a fixed absolute step (one over its weight scale) and a
    ciphertext value carries a fixed absolute noise (one over the scale), so a layer whose
    weights are 1e-3, or whose inputs are 1e-3, keeps 10 bits fewer than one at 1. After the
    activations' coefficients are folded in, both happen. Scaling layer l's output by a
    (2^a_l), undone in the next map through the activation (x'^2 = a^2 x^2,
    x'(x'^2 + a^2 k) = a^3 x (x^2 + k), (x'^2 + a^2 k)^2 + a^3 m x' = a^4 (...)), moves bits
    from layer l+1's weights to its inputs and layer l's weights. The a_l that maximise the
    worst layer's bits are found by bisection: each a_l is set to the least value its own
    constraints allow, and the last layer (which cannot be rescaled) must still fit.
    Input magnitudes are estimated by running unit-normal inputs through the network.
    """
    affines = [op for op in ops if isinstance(op, _Affine)]
    steps = [op for op in ops if not isinstance(op, _Affine)]
    if len(affines) < 2:
        return ops
    degrees = [
        2 if isinstance(s, SquareStep) else 3 if isinstance(s, CubicStep) else 4 for s in steps
    ]
    weights = [math.log2(float(np.max(np.abs(a.matrix))) or 1.0) for a in affines]
    inputs = _input_magnitudes(affines, steps)
    bits = [weight_bits] * (len(affines) - 1) + [last_bits]

    def gains(target: float) -> list[float] | None:
        logs: list[float] = []
        for layer in range(len(affines)):
            previous = degrees[layer - 1] * logs[-1] if layer else 0.0
            weight = weights[layer] + bits[layer] - _WEIGHT_NOISE_BITS - previous
            if layer == len(affines) - 1:
                return logs if weight >= target else None
            # The least gain that keeps this layer's weights and the next layer's inputs at
            # the target: a larger one would only cost the next layer's weights.
            value = (target - inputs[layer + 1] - scale_bits + _VALUE_NOISE_BITS) / degrees[layer]
            logs.append(max(target - weight, value))
        return logs

    low, high = -64.0, 64.0
    best = gains(low) or [0.0] * (len(affines) - 1)
    for _ in range(40):
        middle = (low + high) / 2
        found = gains(middle)
        if found is None:
            high = middle
        else:
            low, best = middle, found
    factors = [2.0**g for g in best]

    out: list[_Affine | PolyStep] = []
    undo, layer = 1.0, 0
    for op in ops:
        if isinstance(op, _Affine):
            gain = factors[layer] if layer < len(factors) else 1.0
            out.append(_Affine(op.matrix * (gain / undo), op.bias * gain))
            layer += 1
            continue
        a = factors[layer - 1]
        if isinstance(op, SquareStep):
            out.append(op)
            undo = a**2
        elif isinstance(op, CubicStep):
            out.append(CubicStep(op.c1 * a**2, op.c2 * a, op.c3))
            undo = a**3
        else:
            out.append(QuarticStep(op.k * a**2, op.m * a**3))
            undo = a**4
    return out


def _input_magnitudes(affines: list[_Affine], steps: list[PolyStep]) -> list[float]:
    """Return log2 of the RMS input of each affine map for unit-normal network inputs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(affines[0].matrix.shape[1], 32))
    magnitudes = []
    for layer, affine in enumerate(affines):
        magnitudes.append(math.log2(float(np.sqrt(np.mean(x * x))) or 1.0))
        x = affine.matrix @ x + affine.bias[:, None]
        if layer < len(steps):
            x = steps[layer].simulate(x)
    return magnitudes


def normalise(artifact: ModelArtifact) -> list[_Affine | PolyStep]:
    """Rewrite the network as alternating affine maps and depressed polynomial steps.

    Args:
        artifact: a checked model.

    Returns:
        Affine maps (``matrix``, ``bias``) and polynomial steps, starting with an affine map.

    Raises:
        CompileError: a layer or activation the engine cannot evaluate.
    """
    shapes = artifact.layer_shapes()
    ops: list[_Affine | PolyStep] = []
    # y_true = scale * y + offset for the last activation; both wait for the next affine map.
    pending: tuple[float, float] | None = None

    for index, layer in enumerate(artifact.layers):
        in_shape = shapes[index]
        if isinstance(layer, Flatten):
            continue
        if isinstance(layer, Add):
            raise CompileError(f"layers[{index}]: residual blocks (add) are not compiled yet")
        if isinstance(layer, Conv2d | Linear):
            affine = _affine_of(layer, in_shape)
            if pending is not None:
                scale, offset = pending
                # W (scale y + offset) + b = (scale W) y + (b + offset W 1)
                affine.bias = affine.bias + offset * affine.matrix.sum(axis=1)
                affine.matrix = affine.matrix * scale
                pending = None
            if ops and isinstance(ops[-1], _Affine):
                previous = ops.pop()
                assert isinstance(previous, _Affine)
                affine = _Affine(
                    affine.matrix @ previous.matrix,
                    affine.matrix @ previous.bias + affine.bias,
                )
            ops.append(affine)
            continue
        assert isinstance(layer, Poly)
        coeffs = _significant(layer.coeffs)
        degree = coeffs.size - 1
        if degree > MAX_POLY_DEGREE:
            raise CompileError(
                f"layers[{index}]: polynomial of degree {degree}; the engine evaluates "
                f"degree <= {MAX_POLY_DEGREE} (refit the activation with a lower degree)"
            )
        if not ops or not isinstance(ops[-1], _Affine):
            raise CompileError(
                f"layers[{index}]: an activation must follow a conv2d or linear layer"
            )
        previous = ops[-1]
        if degree <= 1:  # affine activation: merge into the previous map
            c0 = float(coeffs[0])
            c1 = float(coeffs[1]) if coeffs.size > 1 else 0.0
            previous.bias = c1 * previous.bias + c0
            previous.matrix = c1 * previous.matrix
            continue
        step, shift, scale, offset = _depressed(coeffs)
        previous.bias = previous.bias + shift  # the step sees z = x + shift
        ops.append(step)
        pending = (scale, offset)
    if pending is not None:
        size = math.prod(shapes[-1])
        ops.append(_Affine(np.eye(size) * pending[0], np.full(size, pending[1])))
    if not ops or not isinstance(ops[0], _Affine):
        raise CompileError("the network must start with a conv2d or linear layer")
    return ops


def _significant(coeffs: tuple[float, ...]) -> np.ndarray:
    """Drop leading coefficients that are rounding noise next to the others.

    Dividing by a leading coefficient of 1e-17 would shift by 1e16 and wreck the ciphertext.
    """
    values = np.array(coeffs, dtype=np.float64)
    largest = float(np.max(np.abs(values))) if values.size else 0.0
    degree = values.size - 1
    while degree > 0 and abs(values[degree]) <= 1e-12 * largest:
        degree -= 1
    return values[: degree + 1]


def _depressed(coeffs: np.ndarray) -> tuple[PolyStep, float, float, float]:
    """Write ``p(x) = scale * step(x + shift) + offset`` with the cheapest step.

    Dividing by the leading coefficient and shifting x by ``c[d-1] / (d c[d])`` removes the
    x^(d-1) term; what is left is x^2 or (x^2 + k)^2 + m x, plus a constant. The
    shift goes into the previous bias, the scale and constant into the next map: no level.
    """
    degree = len(coeffs) - 1
    if degree == 3:  # see CubicStep: a cubic is evaluated as it is, only its constant moves
        c0, c1, c2, c3 = (float(c) for c in coeffs)
        return CubicStep(c1, c2, c3), 0.0, 1.0, c0
    lead = float(coeffs[-1])
    shift = float(coeffs[-2] / (degree * lead))
    monic = np.polynomial.Polynomial(coeffs / lead)
    r = (monic(np.polynomial.Polynomial([-shift, 1.0]))).coef
    r = np.concatenate([r, np.zeros(degree + 1 - r.size)])
    if degree == 2:
        return SquareStep(), shift, lead, lead * float(r[0])
    k = float(r[2]) / 2.0
    return QuarticStep(k, float(r[1])), shift, lead, lead * (float(r[0]) - k * k)


def _affine_of(layer: Conv2d | Linear, in_shape: tuple[int, ...]) -> _Affine:
    if isinstance(layer, Linear):
        return _Affine(layer.weight.copy(), layer.bias.copy())
    # A conv is a sparse linear map of the flattened input: read it off the responses to unit
    # inputs (the bias is the response to zero).
    size = math.prod(in_shape)
    zero = conv2d(np.zeros(in_shape), layer).reshape(-1)
    columns = [
        conv2d(np.eye(1, size, j).reshape(in_shape), layer).reshape(-1) - zero for j in range(size)
    ]
    return _Affine(np.stack(columns, axis=1), zero)
