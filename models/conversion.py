"""Convert a trained torch network into one that CKKS can evaluate, and say what it costs.

``validate`` lists every layer the converter cannot handle, with its path, the reason and what
to use instead (like opacus' ``ModuleValidator``). ``convert`` refuses with all of them at once,
or works on a deep copy:

1. the model's ``forward`` is traced with ``torch.fx`` into a chain of layers in which
   residual blocks (``y = x + f(x)``, ``y = g(x) + f(x)``) are steps holding their branches
   (torch layers are leaves, user modules such as a ResNet ``BasicBlock`` are traced through);
2. BatchNorm is folded into the neighbouring Conv2d/Linear (after a residual sum: into the
   last layer of every branch), average pooling becomes a convolution with fixed weights,
   Dropout and Identity disappear (all exact, in float64);
3. each activation is replaced by a polynomial fitted by least squares on the pre-activations
   the calibration data produces there (after the earlier activations were replaced, so each
   fit sees the converted network's own values, branch by branch), degree fixed by the caller
   or the smallest in 2..``max_degree`` whose relative fit error is under ``tolerance``; the
   engine's ``MAX_POLY_DEGREE`` bounds both.

Every replacement is logged (logger ``models.conversion``), one line per layer. The result is a
``ConvertedNetwork`` (an ``nn.Sequential`` of Conv2d, Linear, Flatten, ``PolyActivation`` and
``Residual`` joins whose branches are ``ConvertedNetwork``s) and a ``ConversionReport`` with the
fitted ranges, degrees, errors and the multiplicative depth. Whether the network is servable
(ring, primes, key bytes) is decided by the engine's ``compile_model`` when it is exported.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from he_service.engine import MAX_POLY_DEGREE
from models._lowering import ACTIVATION, Change, Layer, PoolConv2d, lower, walk
from models.polynomial import DEFAULT_TOLERANCE, PolyActivation, PolyFit, fit_polynomial
from models.problems import ConversionError, Problem
from models.training import to_tensor

__all__ = [
    "ActivationReport",
    "ConversionReport",
    "ConvertedNetwork",
    "Position",
    "Residual",
    "convert",
    "depth_of",
    "position_json",
    "position_of",
    "validate",
]

logger = logging.getLogger("models.conversion")
_BATCH = 1024

# Where a layer sits: (index,) in the network, (index, branch, index, ...) inside residual
# branches, as the artifact loader names it: layers[index].branches[branch][index].
Position = tuple[int, ...]


def position_json(position: Position) -> int | list[int]:
    """Return a position as the manifest records it: an index, or a list inside branches.

    Args:
        position: the layer's position.

    Returns:
        ``index`` for a top-level layer (as in format 1), else ``[index, branch, index, ...]``.
    """
    return position[0] if len(position) == 1 else list(position)


def position_of(value: Any) -> Position:
    """Read a manifest's position (``position_json``'s form) back.

    Args:
        value: an int or a list of ints.

    Returns:
        The position.
    """
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def validate(model: nn.Module, input_shape: Sequence[int]) -> list[Problem]:
    """List every reason ``model`` cannot be converted; an empty list means it can.

    Nothing is fitted and the model is not modified (a deep copy is traced and run once on a
    zero batch to learn the shapes).

    Args:
        model: the torch model.
        input_shape: the shape of one sample without the batch axis, ``(features,)`` or
            ``(channels, height, width)``.

    Returns:
        The problems, in network order.
    """
    work = copy.deepcopy(model).to(torch.float64).eval()
    return lower(work, tuple(int(d) for d in input_shape)).problems


class ConvertedNetwork(nn.Sequential):
    """A network of Conv2d, Linear, Flatten, ``PolyActivation`` and ``Residual`` layers only.

    Each child maps one-to-one to a layer of the exported artifact (a ``Residual`` to an
    ``add`` layer whose branches are ``ConvertedNetwork``s too). ``paths`` holds the module
    path each child came from in the original model (``features.0``), unique across the whole
    network including its branches; exported weights are named ``<path>.weight`` and
    ``<path>.bias``. ``PoolConv2d`` children are average poolings.
    """

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], input_shape: Sequence[int]):
        names: list[str] = []
        paths: list[str] = []
        for path, _ in layers:
            unique = path
            count = 2
            while unique in paths:
                unique = f"{path}:{count}"  # the same module called twice in forward
                count += 1
            paths.append(unique)
            name = re.sub(r"[^0-9A-Za-z_]", "_", unique)
            while name in names:
                name += "_"
            names.append(name)
        super().__init__(
            OrderedDict((name, module) for name, (_, module) in zip(names, layers, strict=True))
        )
        self.paths: tuple[str, ...] = tuple(paths)
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in input_shape)
        # Weight names must be unique across branches too.
        _make_paths_unique(self, set())

    def __getitem__(self, index: int | slice) -> Any:
        """Return a layer, or for a slice a ``ConvertedNetwork`` of those layers.

        Args:
            index: a position or a slice.

        Returns:
            The layer or the sub-network (whose ``input_shape`` is only meaningful when the
            slice starts at 0).
        """
        if isinstance(index, slice):
            pairs = list(zip(self.paths, self._modules.values(), strict=True))[index]
            return ConvertedNetwork(
                [(path, module) for path, module in pairs if module is not None],
                self.input_shape,
            )
        return super().__getitem__(index)

    def walk(self) -> Iterator[tuple[Position, str, nn.Module]]:
        """Yield ``(position, path, module)`` of every layer, a join before its branches."""
        for index, (path, module) in enumerate(zip(self.paths, self, strict=True)):
            yield (index,), path, module
            if isinstance(module, Residual):
                for number, branch in enumerate(module.networks()):
                    for position, inner, layer in branch.walk():
                        yield (index, number, *position), inner, layer

    def activations(self) -> list[tuple[Position, str, PolyActivation]]:
        """Return ``(position, path, module)`` of every polynomial activation, in network order."""
        return [
            (position, path, module)
            for position, path, module in self.walk()
            if isinstance(module, PolyActivation)
        ]

    @property
    def depth(self) -> int:
        """Return the multiplicative depth the engine will need (see ``depth_of``)."""
        return depth_of(self)


def _make_paths_unique(network: ConvertedNetwork, taken: set[str]) -> None:
    """Rename repeated paths ``path:2``, ``path:3`` (a module called twice) across branches."""
    paths = []
    for path, module in zip(network.paths, network, strict=True):
        unique = path
        count = 2
        while unique in taken:
            unique = f"{path}:{count}"
            count += 1
        taken.add(unique)
        paths.append(unique)
        if isinstance(module, Residual):
            for branch in module.networks():
                _make_paths_unique(branch, taken)
    network.paths = tuple(paths)


class Residual(nn.Module):
    """A residual join: the sum of its branches, each applied to the same input.

    Each branch is a ``ConvertedNetwork``; an empty one is the identity (a skip connection).
    """

    def __init__(self, branches: Sequence[ConvertedNetwork]) -> None:
        super().__init__()
        if len(branches) < 2:
            raise ValueError(f"a residual join needs 2 or more branches, got {len(branches)}")
        self.branches = nn.ModuleList(branches)

    def networks(self) -> list[ConvertedNetwork]:
        """Return the branches."""
        return [cast(ConvertedNetwork, branch) for branch in self.branches]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the branches applied to ``x``.

        Args:
            x: the block's input.

        Returns:
            ``branch_1(x) + branch_2(x) + ...``.
        """
        first, *others = self.networks()
        total: torch.Tensor = first(x)
        for branch in others:
            total = total + branch(x)
        return total


def depth_of(layers: Sequence[nn.Module] | nn.Sequential) -> int:
    """Count the levels (primes) a chain of layers costs, the way the engine compiles it.

    With lazy rescaling an affine map costs no level of its own: each activation's first
    rescale pays for the map before it. A polynomial of degree <= 1 merges into its neighbours
    (0 levels), degree 2 costs one level, degrees 3-4 two. A residual join costs the most
    levels of its branches: the longest path decides.

    Args:
        layers: the converted layers in order.

    Returns:
        The multiplicative depth.
    """
    depth = 0
    for module in layers:
        if isinstance(module, nn.Flatten | nn.Conv2d | nn.Linear):
            continue
        if isinstance(module, PolyActivation):
            depth += module.levels
            continue
        if isinstance(module, Residual):
            depth += max(depth_of(branch) for branch in module.networks())
            continue
        raise TypeError(f"not a converted layer: {type(module).__name__}")
    return depth


@dataclasses.dataclass(frozen=True)
class ActivationReport:
    """How one activation was replaced."""

    path: str
    layer: Position
    replaces: str
    degree: int
    coeffs: tuple[float, ...]
    lo: float
    hi: float
    rms_error: float
    relative_error: float
    levels: int
    within_tolerance: bool

    def describe(self) -> str:
        """Return the log line for this activation."""
        line = (
            f"{self.path}: {self.replaces} -> poly degree {self.degree} on "
            f"[{self.lo:.4g}, {self.hi:.4g}], fit rms error {self.rms_error:.3g} "
            f"(relative {self.relative_error:.3f}), {self.levels} level"
            f"{'s' if self.levels != 1 else ''}"
        )
        if not self.within_tolerance:
            line += " [above tolerance at the maximum degree]"
        return line

    def to_json(self) -> dict[str, Any]:
        """Return the manifest form (the ``conversion.activations`` entries)."""
        return {
            "path": self.path,
            "layer": position_json(self.layer),
            "replaces": self.replaces,
            "degree": self.degree,
            "range": [self.lo, self.hi],
            "rms_error": self.rms_error,
            "relative_error": self.relative_error,
            "levels": self.levels,
        }


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What ``convert`` did: one change per original layer, the fits, the depth."""

    input_shape: tuple[int, ...]
    calibration_samples: int
    degree_policy: str
    changes: tuple[Change, ...]
    activations: tuple[ActivationReport, ...]
    depth: int

    def lines(self) -> list[str]:
        """Return the report as lines of text, one per original layer, then the depth.

        The layers of a residual join's branches follow it, indented under ``branch k``.
        """
        lines = _change_lines(self.changes, iter(self.activations), "")
        lines.append(
            f"multiplicative depth {self.depth} (activation levels on the longest path; affine "
            "maps ride on them)"
        )
        return lines

    def to_json(self) -> dict[str, Any]:
        """Return the manifest's ``conversion`` section."""
        return {
            "calibration_samples": self.calibration_samples,
            "degree_policy": self.degree_policy,
            "depth": self.depth,
            "activations": [a.to_json() for a in self.activations],
            "changes": _change_json(self.changes, iter(self.activations)),
        }


def _change_lines(
    changes: Sequence[Change], fits: Iterator[ActivationReport], indent: str
) -> list[str]:
    lines = []
    for change in changes:
        if change.new == ACTIVATION:
            lines.append(indent + next(fits).describe())
        else:
            lines.append(f"{indent}{change.path}: {change.old} -> {change.new}")
        for number, branch in enumerate(change.branches, start=1):
            lines.append(f"{indent}  branch {number}:" + ("" if branch else " identity"))
            lines += _change_lines(branch, fits, indent + "    ")
    return lines


def _change_json(changes: Sequence[Change], fits: Iterator[ActivationReport]) -> list[Any]:
    entries = []
    for change in changes:
        if change.new == ACTIVATION:
            fit = next(fits)
            to = f"poly degree {fit.degree} on [{fit.lo:.6g}, {fit.hi:.6g}]"
        else:
            to = change.new
        entry: dict[str, Any] = {"path": change.path, "from": change.old, "to": to}
        if change.branches:
            entry["branches"] = [_change_json(branch, fits) for branch in change.branches]
        entries.append(entry)
    return entries


def _degree_plan(
    degrees: int | Sequence[int] | None, paths: list[str], max_degree: int, tolerance: float
) -> tuple[list[int | None], str]:
    if degrees is None:
        if not 2 <= max_degree <= MAX_POLY_DEGREE:
            raise ValueError(
                f"max_degree must be 2..{MAX_POLY_DEGREE} (the engine evaluates polynomials up "
                f"to degree {MAX_POLY_DEGREE}), got {max_degree}"
            )
        return [None] * len(
            paths
        ), f"smallest of 2..{max_degree} with relative error <= {tolerance}"
    if isinstance(degrees, int):
        chosen = [degrees] * len(paths)
        policy = f"fixed {degrees}"
    else:
        chosen = [int(d) for d in degrees]
        if len(chosen) != len(paths):
            raise ValueError(
                f"degrees has {len(chosen)} entries but the network has {len(paths)} "
                f"activations to fit: {', '.join(paths) or 'none'}"
            )
        policy = "per layer " + ", ".join(f"{p}={d}" for p, d in zip(paths, chosen, strict=True))
    for d in chosen:
        if not 1 <= d <= MAX_POLY_DEGREE:
            raise ValueError(
                f"polynomial degree must be 1..{MAX_POLY_DEGREE} (the engine evaluates "
                f"polynomials up to degree {MAX_POLY_DEGREE}), got {d}"
            )
    return list(chosen), policy


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(chunk) for chunk in x.split(_BATCH)])


def _fit(
    module: nn.Module, values: torch.Tensor, degree: int | None, max_degree: int, tolerance: float
) -> tuple[PolyFit, bool]:
    samples = values.detach().numpy().reshape(-1)

    def function(points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(module(torch.from_numpy(np.ascontiguousarray(points))).numpy())

    if degree is not None:
        return fit_polynomial(function, samples, degree), True
    fit = None
    for candidate in range(2, max_degree + 1):
        fit = fit_polynomial(function, samples, candidate)
        if fit.relative_error <= tolerance:
            return fit, True
    assert fit is not None
    return fit, False


def convert(
    model: nn.Module,
    calibration_x: np.ndarray | torch.Tensor,
    *,
    degrees: int | Sequence[int] | None = None,
    max_degree: int = 4,
    tolerance: float = DEFAULT_TOLERANCE,
) -> tuple[ConvertedNetwork, ConversionReport]:
    """Convert a trained network into a polynomial one; the model itself is not modified.

    Args:
        model: the trained torch model; it is deep-copied and evaluated in eval mode.
        calibration_x: model inputs (already preprocessed as the model expects), shaped
            ``(n, *input_shape)``; typically the training data. The ranges the polynomials are
            fitted on come from these samples.
        degrees: one degree for every activation, one per activation in network order, or
            None to choose per layer.
        max_degree: the largest degree the automatic choice may use (2 up to the engine's
            ``MAX_POLY_DEGREE``).
        tolerance: the relative fit error (RMS error / spread of the activation's outputs on
            the calibration data) the automatic choice accepts.

    Returns:
        The converted network (float64, eval mode) and the report.

    Raises:
        ConversionError: listing every unsupported layer or construct.
        ValueError: for unusable calibration data or degrees.
    """
    x = to_tensor(calibration_x, torch.float64)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"calibration data must be shaped (samples, *input_shape), got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("calibration data holds NaN or infinity")
    input_shape = tuple(int(d) for d in x.shape[1:])
    work = copy.deepcopy(model).to(torch.float64).eval()
    lowered = lower(work, input_shape)
    if lowered.problems:
        raise ConversionError(lowered.problems)
    to_fit = [layer.path for layer in walk(lowered.layers) if layer.kind == "act"]
    plan, policy = _degree_plan(degrees, to_fit, max_degree, tolerance)
    fitter = _Fitter(plan, max_degree, tolerance)
    network, _ = fitter.chain(lowered.layers, x, ())
    network.eval()
    # Report under the network's (unique) paths, as the manifest will.
    paths = {position: path for position, path, _ in network.walk()}
    reports = [_with(r, path=paths[r.layer]) for r in fitter.reports]
    report = ConversionReport(
        input_shape=input_shape,
        calibration_samples=int(x.shape[0]),
        degree_policy=policy,
        changes=tuple(lowered.changes),
        activations=tuple(reports),
        depth=network.depth,
    )
    for line in report.lines():
        logger.info("%s", line)
    return network, report


def _with(report: ActivationReport, **changes: Any) -> ActivationReport:
    return dataclasses.replace(report, **changes)


class _Fitter:
    """Replace activations by fitted polynomials, in network order, branch by branch."""

    def __init__(self, plan: list[int | None], max_degree: int, tolerance: float) -> None:
        self.plan = plan
        self.max_degree = max_degree
        self.tolerance = tolerance
        self.reports: list[ActivationReport] = []

    def chain(
        self, layers: list[Layer], value: torch.Tensor, prefix: Position
    ) -> tuple[ConvertedNetwork, torch.Tensor]:
        """Convert a chain that receives ``value``; return it and its output on ``value``."""
        input_shape = tuple(int(d) for d in value.shape[1:])
        converted: list[tuple[str, nn.Module]] = []
        for index, layer in enumerate(layers):
            position = (*prefix, index)
            module: nn.Module
            if layer.kind == "add":
                branches = [
                    self.chain(branch, value, (*position, number))
                    for number, branch in enumerate(layer.branches)
                ]
                module = Residual([network for network, _ in branches])
                value = branches[0][1]
                for _, out in branches[1:]:
                    value = value + out
            else:
                module = self.layer(layer, value, position)
                value = _apply(module, value)
            converted.append((layer.path, module))
        return ConvertedNetwork(converted, input_shape), value

    def layer(self, layer: Layer, value: torch.Tensor, position: Position) -> nn.Module:
        assert layer.module is not None
        if layer.kind != "act":
            return layer.module
        fit, ok = _fit(
            layer.module, value, self.plan[len(self.reports)], self.max_degree, self.tolerance
        )
        poly = PolyActivation(
            fit.coeffs, fit.lo, fit.hi, source=layer.source, fit_error=fit.rms_error
        )
        self.reports.append(
            ActivationReport(
                path=layer.path,
                layer=position,
                replaces=layer.source,
                degree=poly.degree,
                coeffs=fit.coeffs,
                lo=fit.lo,
                hi=fit.hi,
                rms_error=fit.rms_error,
                relative_error=fit.relative_error,
                levels=poly.levels,
                within_tolerance=ok,
            )
        )
        return poly


def is_pooling(module: nn.Module) -> bool:
    """Return True for an average pooling written as a convolution."""
    return isinstance(module, PoolConv2d)


def finite_range(module: PolyActivation) -> bool:
    """Return True if the polynomial has a fitted (finite) range, False for exact x^2."""
    return math.isfinite(module.lo) and math.isfinite(module.hi)
