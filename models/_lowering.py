"""Lower a traced chain to the layers an artifact can hold: fold, merge, drop, check.

Everything here is exact arithmetic on float64 copies (no fitting): BatchNorm is folded into the
neighbouring Conv2d/Linear, average pooling becomes a convolution with fixed weights, grouped
and dilated convolutions become plain ones with zero weights, Dropout and Identity disappear.
Activations are kept as they are; ``models.conversion`` replaces them with polynomials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from models._trace import Step, trace
from models.polynomial import PolyActivation
from models.problems import Problem

__all__ = ["ACTIVATION", "Change", "Layer", "Lowered", "PoolConv2d", "lower"]

# The `new` of a Change whose activation is fitted later; the report shows the fit instead.
ACTIVATION = "polynomial activation"


class PoolConv2d(nn.Conv2d):
    """An average pooling written as a convolution: ``weight[c, c] = 1 / window``, frozen.

    The artifact format has no pooling layer, and the server merges this convolution with the
    neighbouring linear map when no activation lies between, so pooling costs no level.
    """

    def __init__(
        self,
        channels: int,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        divisor: int,
    ) -> None:
        # float64 from the start: 1/9 rounded to float32 first would not be an exact average.
        super().__init__(
            channels,
            channels,
            kernel,
            stride=stride,
            padding=padding,
            bias=True,
            dtype=torch.float64,
        )
        assert self.bias is not None
        with torch.no_grad():
            self.weight.zero_()
            for c in range(channels):
                self.weight[c, c] = 1.0 / divisor
            self.bias.zero_()
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)


@dataclass(frozen=True)
class Change:
    """One line of the conversion log: what happened to the layer at ``path``."""

    path: str
    old: str
    new: str


@dataclass
class Layer:
    """A lowered layer: ``kind`` is ``affine`` (Conv2d/Linear/PoolConv2d), ``flatten``,
    ``act`` (an activation still to be fitted) or ``poly`` (already a polynomial)."""

    path: str
    kind: str
    module: nn.Module
    source: str


@dataclass
class Lowered:
    """The lowered chain, the log of what was changed, and every problem found."""

    layers: list[Layer] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    output_shape: tuple[int, ...] | None = None


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


def _plain_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """Return an equivalent float64 Conv2d with groups=1, dilation=1, a bias, int padding."""
    weight = conv.weight.detach().to(torch.float64)
    out_ch, in_per_group, kh, kw = weight.shape
    groups = conv.groups
    if groups > 1:
        full = torch.zeros(out_ch, in_per_group * groups, kh, kw, dtype=torch.float64)
        per_group = out_ch // groups
        for g in range(groups):
            rows = slice(g * per_group, (g + 1) * per_group)
            cols = slice(g * in_per_group, (g + 1) * in_per_group)
            full[rows, cols] = weight[rows]
        weight = full
    dh, dw = _pair(conv.dilation)
    if (dh, dw) != (1, 1):
        dilated = torch.zeros(
            weight.shape[0], weight.shape[1], dh * (kh - 1) + 1, dw * (kw - 1) + 1,
            dtype=torch.float64,
        )  # fmt: skip
        dilated[:, :, ::dh, ::dw] = weight
        weight = dilated
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            padding = (0, 0)
        else:  # "same", odd total padding already refused by the tracer
            padding = ((weight.shape[2] - 1) // 2, (weight.shape[3] - 1) // 2)
    else:
        padding = _pair(conv.padding)
    plain = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        (weight.shape[2], weight.shape[3]),
        stride=_pair(conv.stride),
        padding=padding,
        bias=True,
        dtype=torch.float64,
    )
    assert plain.bias is not None
    with torch.no_grad():
        plain.weight.copy_(weight)
        if conv.bias is None:
            plain.bias.zero_()
        else:
            plain.bias.copy_(conv.bias.detach().to(torch.float64))
    return plain


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    plain = nn.Linear(linear.in_features, linear.out_features, bias=True, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.copy_(linear.weight.detach().to(torch.float64))
        if linear.bias is None:
            plain.bias.zero_()
        else:
            plain.bias.copy_(linear.bias.detach().to(torch.float64))
    return plain


def _pool_conv(pool: nn.AvgPool2d, channels: int) -> PoolConv2d:
    kernel = _pair(pool.kernel_size)
    stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
    divisor = pool.divisor_override or kernel[0] * kernel[1]
    return PoolConv2d(channels, kernel, stride, _pair(pool.padding), divisor)


def _bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, shift) per channel with ``bn(x) = scale * x + shift`` in eval mode."""
    assert bn.running_mean is not None and bn.running_var is not None
    mean = bn.running_mean.detach().to(torch.float64)
    var = bn.running_var.detach().to(torch.float64)
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return scale, shift


def _fold_after(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold ``scale * y + shift`` (per output channel/feature) into the layer producing y."""
    assert isinstance(layer, nn.Conv2d | nn.Linear) and layer.bias is not None
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    with torch.no_grad():
        layer.weight.mul_(scale.view(view))
        layer.bias.mul_(scale).add_(shift)


def _fold_before(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold ``x -> scale * x + shift`` (per input channel/feature) into the layer reading x."""
    assert isinstance(layer, nn.Conv2d | nn.Linear) and layer.bias is not None
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            layer.bias.add_(layer.weight @ shift)
            layer.weight.mul_(scale.view(1, -1))
        else:
            layer.bias.add_(torch.einsum("oikl,i->o", layer.weight, shift))
            layer.weight.mul_(scale.view(1, -1, 1, 1))


def _run(step: Step, x: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
    if x is None or step.module is None:
        return None, None
    try:
        with torch.no_grad():
            y = step.module(x)
    except Exception as exc:  # any layer may reject the shape in its own words
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(y, torch.Tensor):
        return None, None
    return y, None


def lower(model: nn.Module, input_shape: tuple[int, ...]) -> Lowered:
    """Trace and lower a model; collect every problem instead of stopping at the first.

    Args:
        model: the torch model; it is deep-copied by the caller, not modified here except
            for being run on a zero batch in eval mode.
        input_shape: the shape of one sample, ``(features,)`` or ``(channels, height, width)``.

    Returns:
        The lowered chain; it is usable only if ``problems`` is empty.
    """
    result = Lowered()
    steps, chain_problems = trace(model)
    result.problems.extend(chain_problems)
    if len(input_shape) not in (1, 3) or any(d < 1 for d in input_shape):
        result.problems.append(
            Problem(
                "input",
                f"shape {tuple(input_shape)}",
                "the service takes one vector (features,) or one image (channels, height, width)",
                "reshape the input accordingly",
            )
        )
    x: torch.Tensor | None = torch.zeros((2, *input_shape), dtype=torch.float64)
    # BatchNorm waiting for the next linear map: per-channel (before flatten) or per-feature.
    pending: tuple[Step, torch.Tensor, torch.Tensor] | None = None

    def problem(step: Step, reason: str, fix: str) -> None:
        result.problems.append(Problem(step.path, step.label, reason, fix))

    def previous_kind() -> str | None:
        kinds = [layer.kind for layer in result.layers if layer.kind != "flatten"]
        return kinds[-1] if kinds else None

    for step in steps:
        shape = tuple(x.shape[1:]) if x is not None else None
        y, error = _run(step, x)
        if step.problem is not None:
            result.problems.append(step.problem)
        elif error is not None:
            problem(step, f"fails on an input of shape {shape} ({error})", "check the layer sizes")
        x = y
        if step.kind == "unsupported" or step.problem is not None or error is not None:
            continue
        module = step.module
        assert module is not None
        if step.kind == "drop":
            result.changes.append(Change(step.path, step.label, "removed (identity at inference)"))
            continue
        if step.kind == "flatten":
            if pending is not None and shape is not None and len(shape) == 3:
                _, scale, shift = pending
                area = shape[1] * shape[2]
                pending = (pending[0], scale.repeat_interleave(area), shift.repeat_interleave(area))
            result.layers.append(Layer(step.path, "flatten", nn.Flatten(), step.label))
            result.changes.append(Change(step.path, step.label, "flatten"))
            continue
        if step.kind == "bn":
            assert isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
            scale, shift = _bn_affine(module)
            last = result.layers[-1] if result.layers else None
            if last is not None and last.kind == "affine" and pending is None:
                _fold_after(last.module, scale, shift)
                result.changes.append(Change(step.path, step.label, f"folded into {last.path}"))
            elif pending is not None:
                first, old_scale, old_shift = pending
                if old_scale.numel() != scale.numel():
                    problem(
                        step,
                        "two BatchNorm layers in a row over different shapes",
                        "remove one of them",
                    )
                    pending = None
                    continue
                pending = (first, old_scale * scale, old_shift * scale + shift)
                result.changes.append(Change(step.path, step.label, f"combined with {first.path}"))
            else:
                pending = (step, scale, shift)
            continue
        if step.kind in ("conv", "linear", "pool", "adaptive_pool"):
            if shape is None:
                continue
            affine: nn.Module
            if step.kind == "conv":
                assert isinstance(module, nn.Conv2d)
                affine = _plain_conv(module)
                new = "conv2d"
                if module.groups != 1 or _pair(module.dilation) != (1, 1):
                    new += " (groups/dilation expanded with zero weights)"
            elif step.kind == "linear":
                assert isinstance(module, nn.Linear)
                if len(shape) != 1:
                    problem(
                        step,
                        f"nn.Linear receives a {shape} tensor and would act on its last axis only",
                        "add nn.Flatten() before it",
                    )
                    pending = None
                    continue
                affine = _plain_linear(module)
                new = "linear"
            elif step.kind == "pool":
                assert isinstance(module, nn.AvgPool2d)
                affine = _pool_conv(module, shape[0])
                new = f"conv2d {shape[0]}->{shape[0]} with fixed weights (average pooling)"
            else:
                assert isinstance(module, nn.AdaptiveAvgPool2d)
                size = module.output_size
                sizes = (size, size) if isinstance(size, int) or size is None else tuple(size)
                out_h, out_w = (
                    int(d if s is None else s) for s, d in zip(sizes, shape[1:], strict=True)
                )
                if shape[1] % out_h or shape[2] % out_w:
                    problem(
                        step,
                        f"output size ({out_h}, {out_w}) does not divide the input "
                        f"{shape[1:]}, so windows overlap unevenly",
                        "use nn.AvgPool2d with an explicit kernel_size and stride",
                    )
                    pending = None
                    continue
                kernel = (shape[1] // out_h, shape[2] // out_w)
                affine = _pool_conv(nn.AvgPool2d(kernel, kernel), shape[0])
                new = f"conv2d {shape[0]}->{shape[0]} with fixed weights (average pooling)"
            if pending is not None:
                bn_step, scale, shift = pending
                if isinstance(affine, nn.Conv2d) and affine.padding not in ((0, 0), 0):
                    problem(
                        bn_step,
                        f"it sits before {step.path}, which pads with zeros, and it follows no "
                        "Conv2d/Linear it could fold into",
                        f"move it directly after a Conv2d/Linear, or use padding=0 in {step.path}",
                    )
                    pending = None
                    continue
                _fold_before(affine, scale, shift)
                result.changes.append(
                    Change(bn_step.path, bn_step.label, f"folded into {step.path}")
                )
                pending = None
            result.layers.append(Layer(step.path, "affine", affine, step.label))
            result.changes.append(Change(step.path, step.label, new))
            continue
        # Activations: an affine map must come before each one.
        if pending is not None:
            bn_step = pending[0]
            problem(
                bn_step,
                f"no Conv2d/Linear directly before it, and {step.path} ({step.label}) comes "
                "after it, so there is no linear map to fold it into",
                "move it directly after a Conv2d/Linear layer",
            )
            pending = None
        if previous_kind() != "affine":
            where = "at the start of the network" if previous_kind() is None else (
                "right after another activation"
            )  # fmt: skip
            problem(
                step,
                f"activation {where}: the engine evaluates activations only on the output of "
                "a Conv2d/Linear layer",
                "put a Conv2d/Linear layer before it, or remove it",
            )
            continue
        if step.kind == "square":
            poly = PolyActivation((0.0, 0.0, 1.0), -math.inf, math.inf, source=step.label)
            result.layers.append(Layer(step.path, "poly", poly, step.label))
            result.changes.append(Change(step.path, step.label, "poly [0, 0, 1] (exact)"))
        elif step.kind == "poly":
            assert isinstance(module, PolyActivation)
            result.layers.append(Layer(step.path, "poly", module, step.label))
            result.changes.append(Change(step.path, step.label, "poly (kept)"))
        else:
            result.layers.append(Layer(step.path, "act", module, step.label))
            result.changes.append(Change(step.path, step.label, ACTIVATION))
    if pending is not None:
        problem(
            pending[0],
            "it ends the network after an activation, so there is no Conv2d/Linear to fold it into",
            "move it directly after a Conv2d/Linear layer, or remove it",
        )
    if not any(layer.kind == "affine" for layer in result.layers) and not result.problems:
        result.problems.append(
            Problem(
                "model",
                type(model).__name__,
                "it has no Conv2d or Linear layer",
                "a network needs at least one linear map",
            )
        )
    if x is not None:
        result.output_shape = tuple(x.shape[1:])
        if len(result.output_shape) != 1:
            result.problems.append(
                Problem(
                    "output",
                    f"shape {result.output_shape}",
                    "the network must output one vector of scores per sample",
                    "end it with nn.Flatten() and nn.Linear",
                )
            )
    return result
