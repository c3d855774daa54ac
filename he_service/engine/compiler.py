"""Compile a checked artifact into a latency plan (one sample per ciphertext).

The network is first normalised into alternating affine maps and squares (flatten is free,
consecutive affine maps merge, polynomial coefficients fold into the neighbouring affine maps),
then every affine map becomes a baby-step giant-step sum of plaintext diagonals:

* the first conv reads a client-side im2col layout (row k of the patch matrix in slot block k),
  so the conv is a handful of diagonals at multiples of the block size;
* hidden vectors live *replicated* with a power-of-two period across all slots, so a rotation
  within the period is a plain slot rotation;
* a layer that shrinks the vector uses the hybrid method: only ``period_out`` diagonals, then
  log2(period_in / period_out) rotate-and-add folds;
* the last layer writes its outputs to slots ``[0, m)`` and exact zeros elsewhere, so the
  response holds nothing but the model's outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from he_service.artifacts import Conv2d, Flatten, Linear, ModelArtifact, Poly
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

__all__ = ["MAX_POLY_DEGREE", "CompileError", "compile_plan"]

MAX_POLY_DEGREE = 4


class CompileError(ValueError):
    """The network cannot be expressed as a plan; the message says which layer and why."""


@dataclass
class _Affine:
    matrix: np.ndarray  # (out, in) over the flattened input of this map
    bias: np.ndarray
    im2col: dict[str, object] | None = None  # set when the input is the client's patch matrix


@dataclass(frozen=True)
class _Layout:
    """Where element ``i`` of a vector sits: slot ``position[i] + k * period`` for every k."""

    period: int
    position: np.ndarray

    def inverse(self) -> np.ndarray:
        index = np.full(self.period, -1)
        index[self.position] = np.arange(self.position.size)
        return index


def compile_plan(artifact: ModelArtifact) -> Plan:
    """Compile an artifact into a plan.

    Args:
        artifact: a model checked by ``load_artifact``.

    Returns:
        The plan: parameters, layouts, steps, Galois steps.

    Raises:
        CompileError: a layer or activation the engine cannot evaluate.
    """
    ops = normalise(artifact)
    depth = sum(1 if isinstance(op, _Affine) else op.levels for op in ops)
    first = ops[0]
    assert isinstance(first, _Affine)
    widths = [_next_pow2(op.matrix.shape[0]) for op in ops if isinstance(op, _Affine)]
    if first.im2col is not None:
        input_width = int(first.im2col["rows"]) * int(first.im2col["block"])  # type: ignore[call-overload]
    else:
        input_width = _next_pow2(first.matrix.shape[1])
    params, reason = choose_params(depth, max([input_width, *widths]))
    slots = params.slot_count

    if first.im2col is not None:
        spec = first.im2col
        rows, windows, block = int(spec["rows"]), int(spec["windows"]), int(spec["block"])  # type: ignore[call-overload]
        grid = np.arange(rows)[:, None] * block + np.arange(windows)[None, :]
        layout = _Layout(slots, grid.reshape(-1))
        input_encoding = {**spec, "kind": "im2col", "slot_count": slots}
    else:
        n = first.matrix.shape[1]
        layout = _Layout(_next_pow2(n), np.arange(n))
        input_encoding = {
            "kind": "replicated",
            "length": n,
            "period": layout.period,
            "slot_count": slots,
        }

    steps: list[Step] = []
    affine_count = sum(isinstance(op, _Affine) for op in ops)
    seen = 0
    for op in ops:
        if not isinstance(op, _Affine):
            steps.append(op)
            continue
        seen += 1
        m = op.matrix.shape[0]
        if seen == affine_count:
            out = _Layout(slots, np.arange(m))  # outputs in [0, m), zeros elsewhere
        else:
            out = _Layout(_next_pow2(m), np.arange(m))
        steps.append(_compile_affine(op, layout, out, slots))
        layout = out
    plan = Plan(
        params=params,
        params_reason=reason,
        steps=tuple(steps),
        input_encoding=input_encoding,
        output_decoding={"kind": "prefix", "length": artifact.output_size},
    )
    return plan


def normalise(artifact: ModelArtifact, *, client_im2col: bool = True) -> list[_Affine | PolyStep]:
    """Rewrite the network as alternating affine maps and depressed polynomial steps.

    Args:
        artifact: a checked model.
        client_im2col: read a first conv from the client's patch matrix (latency plan);
            when False every map acts on the flattened input (batch plan).

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
        if isinstance(layer, Conv2d | Linear):
            affine = _affine_of(layer, in_shape, first=client_im2col and not ops)
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
                    previous.im2col,
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
    x^(d-1) term; what is left is x^2, x (x^2 + k) or (x^2 + k)^2 + m x, plus a constant. The
    shift goes into the previous bias, the scale and constant into the next map: no level.
    """
    degree = len(coeffs) - 1
    lead = float(coeffs[-1])
    shift = float(coeffs[-2] / (degree * lead))
    monic = np.polynomial.Polynomial(coeffs / lead)
    r = (monic(np.polynomial.Polynomial([-shift, 1.0]))).coef
    r = np.concatenate([r, np.zeros(degree + 1 - r.size)])
    if degree == 2:
        return SquareStep(), shift, lead, lead * float(r[0])
    if degree == 3:
        return CubicStep(float(r[1])), shift, lead, lead * float(r[0])
    k = float(r[2]) / 2.0
    return QuarticStep(k, float(r[1])), shift, lead, lead * (float(r[0]) - k * k)


def _affine_of(layer: Conv2d | Linear, in_shape: tuple[int, ...], *, first: bool) -> _Affine:
    if isinstance(layer, Linear):
        return _Affine(layer.weight.copy(), layer.bias.copy())
    out_channels, in_channels, kh, kw = layer.weight.shape
    height, width = in_shape[1], in_shape[2]
    out_h = (height + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
    out_w = (width + 2 * layer.padding[1] - kw) // layer.stride[1] + 1
    windows = out_h * out_w
    if first:
        # The client sends the patch matrix, so the conv is W (out, k) applied per window:
        # matrix[(c, w), (k, w)] = W[c, k] over the patch matrix flattened row by row.
        kernel = layer.weight.reshape(out_channels, -1)
        rows = kernel.shape[1]
        matrix = np.einsum("ck,wv->cwkv", kernel, np.eye(windows)).reshape(
            out_channels * windows, rows * windows
        )
        spec = {
            "kernel": [kh, kw],
            "stride": list(layer.stride),
            "padding": list(layer.padding),
            "rows": rows,
            "windows": windows,
            "block": _next_pow2(windows),
        }
        return _Affine(matrix, np.repeat(layer.bias, windows), spec)
    # A later conv is a sparse linear map of the flattened activation: read it off the
    # responses to unit inputs (the bias is the response to zero).
    size = in_channels * height * width
    zero = conv2d(np.zeros(in_shape), layer).reshape(-1)
    columns = [
        conv2d(np.eye(1, size, j).reshape(in_shape), layer).reshape(-1) - zero for j in range(size)
    ]
    return _Affine(np.stack(columns, axis=1), zero)


def _compile_affine(op: _Affine, inp: _Layout, out: _Layout, slots: int) -> AffineStep:
    matrix = op.matrix
    m, n = matrix.shape
    out_index = out.inverse()
    slot = np.arange(slots)
    rows = out_index[slot % out.period]
    bias = np.where(rows >= 0, op.bias[np.maximum(rows, 0)], 0.0)
    diagonals: dict[int, np.ndarray] = {}
    fold: tuple[int, ...] = ()
    if out.period < inp.period < slots:
        # Hybrid: period_out diagonals over the replicated input, then fold the partial sums.
        in_index = inp.inverse()
        for offset in range(out.period):
            cols = in_index[(slot + offset) % inp.period]
            valid = (rows >= 0) & (cols >= 0)
            diag = np.zeros(slots)
            diag[valid] = matrix[rows[valid], cols[valid]]
            if np.any(diag):
                diagonals[offset] = diag
        fold = tuple(out.period << k for k in range(int(math.log2(inp.period // out.period))))
    else:
        # General: one diagonal per distinct (input slot - output slot) offset that carries
        # a weight; built from the non-zeros only, so a sparse conv stays cheap to compile.
        r_idx, c_idx = np.nonzero(matrix)
        copies = slots // out.period
        s = out.position[r_idx][:, None] + out.period * np.arange(copies)[None, :]
        offsets = (inp.position[c_idx][:, None] - s) % inp.period
        values = np.broadcast_to(matrix[r_idx, c_idx][:, None], s.shape)
        for offset in np.unique(offsets):
            mask = offsets == offset
            diag = np.zeros(slots)
            np.add.at(diag, s[mask], values[mask])
            diagonals[int(offset)] = diag
    if not diagonals:
        diagonals[0] = np.zeros(slots)
    stride, baby_count = _bsgs_shape(sorted(diagonals), inp.period)
    terms: dict[tuple[int, int], np.ndarray] = {}
    for offset, diag in diagonals.items():
        t = offset // stride
        giant, baby = divmod(t, baby_count)
        terms[(giant, baby)] = np.roll(diag, stride * baby_count * giant)
    return AffineStep(
        stride=stride,
        baby_count=baby_count,
        terms=terms,
        bias=bias,
        fold_steps=fold,
        description=f"affine {n}->{m} ({len(diagonals)} diagonals, fold {len(fold)})",
    )


def _bsgs_shape(offsets: list[int], period: int) -> tuple[int, int]:
    """Pick the stride and baby-step count that need the fewest distinct rotations."""
    stride = math.gcd(period, *offsets)
    ts = [o // stride for o in offsets]
    best: tuple[int, int] | None = None
    baby = 1
    while baby <= period // stride:
        cost = len({t % baby for t in ts} - {0}) + len({t // baby for t in ts} - {0})
        if best is None or cost < best[0]:
            best = (cost, baby)
        baby *= 2
    assert best is not None
    return stride, best[1]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
