"""Lower a traced chain to the layers an artifact can hold: fold, merge, drop, check.

Everything here is exact arithmetic on float64 copies (no fitting): BatchNorm is folded into the
neighbouring Conv2d/Linear, average pooling becomes a convolution with fixed weights, grouped
and dilated convolutions become plain ones with zero weights, Dropout and Identity disappear.
Activations are kept as they are; ``models.conversion`` replaces them with polynomials.

Residual joins are lowered branch by branch (each branch is a chain of its own that starts at
the block's input). A BatchNorm right after a join cannot fold into one previous layer: since
``bn(a + b) = s * a + s * b + t``, its scale ``s`` folds into the last Conv2d/Linear of every
branch and its shift ``t`` into the first branch; a branch that does not end with such a layer
(the identity of a skip connection, or an activation) gets an explicit per-channel scale, a
frozen 1x1 Conv2d (images) or Linear (vectors) with diagonal weights. A difference of branches
``a - b`` is the sum with ``b`` scaled by -1 the same way. Both are exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from models._trace import Step, trace
from models.polynomial import PolyActivation
from models.problems import Problem

__all__ = ["ACTIVATION", "Change", "Layer", "Lowered", "PoolConv2d", "lower", "walk"]

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
    """One line of the conversion log: what happened to the layer at ``path``.

    A residual join's change holds the changes of each of its branches.
    """

    path: str
    old: str
    new: str
    branches: tuple[tuple[Change, ...], ...] = ()


@dataclass
class Layer:
    """A lowered layer: ``kind`` is ``affine`` (Conv2d/Linear/PoolConv2d), ``flatten``,
    ``act`` (an activation still to be fitted), ``poly`` (already a polynomial) or ``add``
    (a residual join: no module, the sum of ``branches``, each a list of layers)."""

    path: str
    kind: str
    module: nn.Module | None
    source: str
    branches: tuple[list[Layer], ...] = ()


def walk(layers: list[Layer]) -> Iterator[Layer]:
    """Yield every layer, a join before the layers of its branches (branch by branch).

    Args:
        layers: a lowered chain.

    Returns:
        An iterator in network order.
    """
    for layer in layers:
        yield layer
        for branch in layer.branches:
            yield from walk(branch)


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


def _diagonal(shape: tuple[int, ...], scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """Return ``x -> scale * x + shift`` per channel (or feature) as a frozen 1x1 conv/linear.

    Frozen so that fine-tuning keeps a skip connection a per-channel scale, which the engine
    evaluates with plaintext products only, rather than a dense channel mix.
    """
    size = shape[0]
    layer: nn.Conv2d | nn.Linear
    if len(shape) == 3:
        layer = nn.Conv2d(size, size, 1, bias=True, dtype=torch.float64)
        weight = torch.diag(scale).view(size, size, 1, 1)
    else:
        layer = nn.Linear(size, size, bias=True, dtype=torch.float64)
        weight = torch.diag(scale)
    assert layer.bias is not None
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(shift)
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    return layer


def _scale_output(
    layers: list[Layer], scale: torch.Tensor, shift: torch.Tensor, shape: tuple[int, ...], name: str
) -> list[str]:
    """Make a chain compute ``scale * y + shift`` (per channel) instead of its output ``y``.

    Returns:
        Where it went: the paths of the layers folded into or added.
    """
    last = layers[-1] if layers else None
    if last is not None and last.kind == "affine":
        assert last.module is not None
        _fold_after(last.module, scale, shift)
        return [last.path]
    if last is not None and last.kind == "add":
        return _scale_branches(last, scale, shift, shape, f"{name}.")
    layers.append(Layer(name, "affine", _diagonal(shape, scale, shift), "per-channel scale"))
    return [f"new per-channel scale {name}"]


def _scale_branches(
    join: Layer, scale: torch.Tensor, shift: torch.Tensor, shape: tuple[int, ...], name: str
) -> list[str]:
    """Scale every branch of a join by ``scale``; the shift goes to the first branch only."""
    targets: list[str] = []
    for index, branch in enumerate(join.branches):
        part = shift if index == 0 else torch.zeros_like(shift)
        targets += _scale_output(branch, scale, part, shape, f"{name}{index + 1}")
    return targets


def _branch_text(steps: list[Step]) -> str:
    return " -> ".join(step.path for step in steps) if steps else "identity"


def _run(step: Step, x: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    if step.module is None:
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
    lowerer = _Lowerer(result.problems)
    x: torch.Tensor | None = torch.zeros((2, *input_shape), dtype=torch.float64)
    result.layers, result.changes, x = lowerer.chain(steps, x, None, branch=False)
    if not any(layer.kind == "affine" for layer in walk(result.layers)) and not result.problems:
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


class _Lowerer:
    """Lower chains (the network, then each residual branch) into one list of problems."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def problem(self, step: Step, reason: str, fix: str) -> None:
        self.problems.append(Problem(step.path, step.label, reason, fix))

    def chain(
        self, steps: list[Step], x: torch.Tensor | None, before: str | None, *, branch: bool
    ) -> tuple[list[Layer], list[Change], torch.Tensor | None]:
        """Lower one chain starting from the value ``x``.

        Args:
            steps: the traced chain.
            x: a zero batch in the chain's input shape (None: unknown after a failed step).
            before: the kind of layer that produced the chain's input (None: the network
                input), for the rule that an activation follows a linear map or a join.
            branch: whether this is a residual branch (for the messages).

        Returns:
            The layers, the changes and the output batch.
        """
        layers: list[Layer] = []
        changes: list[Change] = []
        # BatchNorm waiting for the next linear map: per-channel (before flatten) or per-feature.
        pending: tuple[Step, torch.Tensor, torch.Tensor] | None = None

        def previous_kind() -> str | None:
            kinds = [layer.kind for layer in layers if layer.kind != "flatten"]
            return kinds[-1] if kinds else before

        def unfolded(step: Step) -> None:
            assert pending is not None
            bn_step = pending[0]
            self.problem(
                bn_step,
                f"no Conv2d/Linear directly before it, and {step.path} ({step.label}) comes "
                "after it, so there is no linear map to fold it into",
                "move it directly after a Conv2d/Linear layer",
            )

        for step in steps:
            if x is None:
                # An earlier step failed, so shapes and neighbours are unknown: only the
                # layers' own problems still mean something.
                self.collect(step)
                continue
            shape = tuple(x.shape[1:])
            if step.branches:
                if pending is not None:
                    unfolded(step)
                    pending = None
                x = self.join(step, x, previous_kind(), layers, changes)
                continue
            y, error = _run(step, x)
            if step.problem is not None:
                self.problems.append(step.problem)
            elif error is not None:
                self.problem(
                    step, f"fails on an input of shape {shape} ({error})", "check the layer sizes"
                )
            x = y
            if step.kind == "unsupported" or step.problem is not None or error is not None:
                continue
            module = step.module
            assert module is not None
            if step.kind == "drop":
                changes.append(Change(step.path, step.label, "removed (identity at inference)"))
                continue
            if step.kind == "flatten":
                if pending is not None and len(shape) == 3:
                    _, scale, shift = pending
                    area = shape[1] * shape[2]
                    pending = (
                        pending[0],
                        scale.repeat_interleave(area),
                        shift.repeat_interleave(area),
                    )
                layers.append(Layer(step.path, "flatten", nn.Flatten(), step.label))
                changes.append(Change(step.path, step.label, "flatten"))
                continue
            if step.kind == "bn":
                assert isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d)
                scale, shift = _bn_affine(module)
                last = layers[-1] if layers else None
                if last is not None and last.kind == "affine" and pending is None:
                    assert last.module is not None
                    _fold_after(last.module, scale, shift)
                    changes.append(Change(step.path, step.label, f"folded into {last.path}"))
                elif last is not None and last.kind == "add" and pending is None:
                    targets = _scale_branches(last, scale, shift, shape, f"{step.path}:branch")
                    changes.append(
                        Change(
                            step.path,
                            step.label,
                            f"folded into the branches of {last.path}: {', '.join(targets)}",
                        )
                    )
                elif pending is not None:
                    first, old_scale, old_shift = pending
                    if old_scale.numel() != scale.numel():
                        self.problem(
                            step,
                            "two BatchNorm layers in a row over different shapes",
                            "remove one of them",
                        )
                        pending = None
                        continue
                    pending = (first, old_scale * scale, old_shift * scale + shift)
                    changes.append(Change(step.path, step.label, f"combined with {first.path}"))
                else:
                    pending = (step, scale, shift)
                continue
            if step.kind in ("conv", "linear", "pool", "adaptive_pool"):
                lowered = self.affine(step, module, shape)
                if lowered is None:
                    pending = None
                    continue
                affine, new = lowered
                if pending is not None:
                    bn_step, scale, shift = pending
                    if isinstance(affine, nn.Conv2d) and affine.padding not in ((0, 0), 0):
                        self.problem(
                            bn_step,
                            f"it sits before {step.path}, which pads with zeros, and it follows "
                            "no Conv2d/Linear it could fold into",
                            f"move it directly after a Conv2d/Linear, or use padding=0 in "
                            f"{step.path}",
                        )
                        pending = None
                        continue
                    _fold_before(affine, scale, shift)
                    changes.append(Change(bn_step.path, bn_step.label, f"folded into {step.path}"))
                    pending = None
                layers.append(Layer(step.path, "affine", affine, step.label))
                changes.append(Change(step.path, step.label, new))
                continue
            # Activations: a linear map or a residual join must come before each one.
            if pending is not None:
                unfolded(step)
                pending = None
            previous = previous_kind()
            if previous not in ("affine", "add"):
                where = "at the start of the network" if previous is None else (
                    "right after another activation"
                )  # fmt: skip
                self.problem(
                    step,
                    f"activation {where}: the engine evaluates activations only on the output "
                    "of a Conv2d/Linear layer or of a residual sum",
                    "put a Conv2d/Linear layer before it, or remove it",
                )
                continue
            if step.kind == "square":
                poly = PolyActivation((0.0, 0.0, 1.0), -math.inf, math.inf, source=step.label)
                layers.append(Layer(step.path, "poly", poly, step.label))
                changes.append(Change(step.path, step.label, "poly [0, 0, 1] (exact)"))
            elif step.kind == "poly":
                assert isinstance(module, PolyActivation)
                layers.append(Layer(step.path, "poly", module, step.label))
                changes.append(Change(step.path, step.label, "poly (kept)"))
            else:
                layers.append(Layer(step.path, "act", module, step.label))
                changes.append(Change(step.path, step.label, ACTIVATION))
        if pending is not None:
            where = "a residual branch" if branch else "the network"
            self.problem(
                pending[0],
                f"it ends {where} after an activation, so there is no Conv2d/Linear to fold it "
                "into",
                "move it directly after a Conv2d/Linear layer"
                + (", or after the residual sum" if branch else ", or remove it"),
            )
        return layers, changes, x

    def collect(self, step: Step) -> None:
        """Report a step's own problem and those inside its branches, nothing else."""
        if step.problem is not None:
            self.problems.append(step.problem)
        for branch in step.branches:
            for inner in branch:
                self.collect(inner)

    def affine(
        self, step: Step, module: nn.Module, shape: tuple[int, ...]
    ) -> tuple[nn.Module, str] | None:
        """Return a Conv2d/Linear/pooling step as a float64 affine module and its log text."""
        if step.kind == "conv":
            assert isinstance(module, nn.Conv2d)
            new = "conv2d"
            if module.groups != 1 or _pair(module.dilation) != (1, 1):
                new += " (groups/dilation expanded with zero weights)"
            return _plain_conv(module), new
        if step.kind == "linear":
            assert isinstance(module, nn.Linear)
            if len(shape) != 1:
                self.problem(
                    step,
                    f"nn.Linear receives a {shape} tensor and would act on its last axis only",
                    "add nn.Flatten() before it",
                )
                return None
            return _plain_linear(module), "linear"
        pooling = f"conv2d {shape[0]}->{shape[0]} with fixed weights (average pooling)"
        if step.kind == "pool":
            assert isinstance(module, nn.AvgPool2d)
            return _pool_conv(module, shape[0]), pooling
        assert isinstance(module, nn.AdaptiveAvgPool2d)
        size = module.output_size
        sizes = (size, size) if isinstance(size, int) or size is None else tuple(size)
        out_h, out_w = (int(d if s is None else s) for s, d in zip(sizes, shape[1:], strict=True))
        if shape[1] % out_h or shape[2] % out_w:
            self.problem(
                step,
                f"output size ({out_h}, {out_w}) does not divide the input {shape[1:]}, so "
                "windows overlap unevenly",
                "use nn.AvgPool2d with an explicit kernel_size and stride",
            )
            return None
        kernel = (shape[1] // out_h, shape[2] // out_w)
        return _pool_conv(nn.AvgPool2d(kernel, kernel), shape[0]), pooling

    def join(
        self,
        step: Step,
        x: torch.Tensor,
        before: str | None,
        layers: list[Layer],
        changes: list[Change],
    ) -> torch.Tensor | None:
        """Lower a residual join (or report an unsupported one); return its output batch."""
        results = [self.chain(branch, x, before, branch=True) for branch in step.branches]
        if step.kind != "add":
            assert step.problem is not None
            self.problems.append(step.problem)
            return None
        outputs = [out for _, _, out in results]
        if any(out is None for out in outputs):
            return None
        shapes = [tuple(out.shape[1:]) for out in outputs if out is not None]
        if len(set(shapes)) > 1:
            shown = "; ".join(
                f"branch {index + 1} ({_branch_text(branch)}) outputs {shape}"
                for index, (branch, shape) in enumerate(zip(step.branches, shapes, strict=True))
            )
            self.problem(
                step,
                f"the branches it sums have different shapes: {shown}",
                "make every branch produce the same shape, e.g. give the shortcut a 1x1 Conv2d "
                "with the same stride and output channels (a projection)",
            )
            return None
        shape = shapes[0]
        notes = []
        total: torch.Tensor | None = None
        for index, ((branch_layers, _, out), sign) in enumerate(
            zip(results, step.signs, strict=True)
        ):
            assert out is not None
            if sign < 0:
                minus = torch.full((shape[0],), -1.0, dtype=torch.float64)
                targets = _scale_output(
                    branch_layers, minus, torch.zeros_like(minus), shape, f"{step.path}:minus"
                )
                notes.append(f"branch {index + 1} negated in {', '.join(targets)}")
            total = sign * out if total is None else total + sign * out
        description = f"add of {len(results)} branches" + "".join(f", {n}" for n in notes)
        layers.append(
            Layer(step.path, "add", None, step.label, tuple(layer for layer, _, _ in results))
        )
        changes.append(
            Change(step.path, step.label, description, tuple(tuple(c) for _, c, _ in results))
        )
        return total
