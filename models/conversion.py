"""Convert a trained torch network into one that CKKS can evaluate, and say what it costs.

``validate`` lists every layer the converter cannot handle, with its path, the reason and what
to use instead (like opacus' ``ModuleValidator``). ``convert`` refuses with all of them at once,
or works on a deep copy:

1. the model's ``forward`` is traced with ``torch.fx`` into a straight chain of layers
   (``nn.Sequential`` or a module whose ``forward`` calls its layers one after another;
   custom submodules with their own ``forward`` are refused, skip connections too);
2. BatchNorm is folded into the neighbouring Conv2d/Linear, average pooling becomes a
   convolution with fixed weights, Dropout and Identity disappear (all exact, in float64);
3. each activation is replaced by a polynomial fitted by least squares on the pre-activations
   the calibration data produces there (after the earlier activations were replaced, so each
   fit sees the converted network's own values), degree fixed by the caller or the smallest in
   2..``max_degree`` whose relative fit error is under ``tolerance``.

Every replacement is logged (logger ``models.conversion``), one line per layer. The result is a
``ConvertedNetwork`` (an ``nn.Sequential`` of Conv2d, Linear, Flatten and ``PolyActivation``)
and a ``ConversionReport`` with the fitted ranges, degrees, errors and the multiplicative depth.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from he_service.engine import max_depth_by_ring as engine_max_depth_by_ring
from models._lowering import ACTIVATION, Change, Layer, PoolConv2d, lower
from models.polynomial import (
    DEFAULT_TOLERANCE,
    MAX_DEGREE,
    PolyActivation,
    PolyFit,
    fit_polynomial,
)
from models.problems import ConversionError, Problem
from models.training import to_tensor

__all__ = [
    "ActivationReport",
    "ConversionReport",
    "ConvertedNetwork",
    "convert",
    "depth_of",
    "max_depth_by_ring",
    "validate",
]

logger = logging.getLogger("models.conversion")
_BATCH = 1024


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
    """A network of Conv2d, Linear, Flatten and ``PolyActivation`` layers only.

    Each child maps one-to-one to a layer of the exported artifact. ``paths`` holds the module
    path each child came from in the original model (``features.0``); exported weights are
    named ``<path>.weight`` and ``<path>.bias``. ``PoolConv2d`` children are average poolings.
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

    def activations(self) -> list[tuple[int, str, PolyActivation]]:
        """Return ``(layer index, path, module)`` of every polynomial activation."""
        return [
            (index, path, module)
            for index, (path, module) in enumerate(zip(self.paths, self, strict=True))
            if isinstance(module, PolyActivation)
        ]

    @property
    def depth(self) -> int:
        """Return the multiplicative depth the engine will need (see ``depth_of``)."""
        return depth_of(self)


def depth_of(layers: Sequence[nn.Module] | nn.Sequential) -> int:
    """Count the levels (primes) a chain of layers costs, the way the engine compiles it.

    With lazy rescaling an affine map costs no level of its own: each activation's first
    rescale pays for the map before it. A polynomial of degree <= 1 merges into its neighbours
    (0 levels), degree 2 costs one level, degrees 3-4 two.

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
        raise TypeError(f"not a converted layer: {type(module).__name__}")
    return depth


def max_depth_by_ring() -> dict[int, int]:
    """Return the largest depth each ring degree N holds (at 128-bit security), per the engine.

    Returns:
        ``{N: max depth}``, e.g. ``{4096: 1, 8192: 5, ...}``.
    """
    return {n: depth for n, depth in engine_max_depth_by_ring().items() if depth > 0}


def _ring_text(depth: int) -> str:
    limits = max_depth_by_ring()
    for n, limit in sorted(limits.items()):
        if depth <= limit:
            return f"N={n} (holds depth <= {limit})"
    largest = max(limits)
    return f"too deep: N={largest} holds at most depth {limits[largest]}"


@dataclasses.dataclass(frozen=True)
class ActivationReport:
    """How one activation was replaced."""

    path: str
    layer: int
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
            "layer": self.layer,
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

    @property
    def ring(self) -> str:
        """Return the ring the depth alone calls for, e.g. ``N=8192 (holds depth <= 5)``.

        The exporter's ``compile_plan`` has the final word (a very wide layer can also need
        a larger ring for its slots).
        """
        return _ring_text(self.depth)

    def _targets(self) -> list[str]:
        fits = iter(self.activations)
        targets = []
        for change in self.changes:
            if change.new == ACTIVATION:
                fit = next(fits)
                targets.append(f"poly degree {fit.degree} on [{fit.lo:.6g}, {fit.hi:.6g}]")
            else:
                targets.append(change.new)
        return targets

    def lines(self) -> list[str]:
        """Return the report as lines of text, one per original layer, then the depth."""
        fits = iter(self.activations)
        lines = []
        for change in self.changes:
            if change.new == ACTIVATION:
                lines.append(next(fits).describe())
            else:
                lines.append(f"{change.path}: {change.old} -> {change.new}")
        lines.append(
            f"multiplicative depth {self.depth} (activation levels; affine maps ride on "
            f"them): {self.ring}"
        )
        return lines

    def to_json(self) -> dict[str, Any]:
        """Return the manifest's ``conversion`` section."""
        return {
            "calibration_samples": self.calibration_samples,
            "degree_policy": self.degree_policy,
            "depth": self.depth,
            "activations": [a.to_json() for a in self.activations],
            "changes": [
                {"path": change.path, "from": change.old, "to": to}
                for change, to in zip(self.changes, self._targets(), strict=True)
            ],
        }


def _degree_plan(
    degrees: int | Sequence[int] | None, paths: list[str], max_degree: int, tolerance: float
) -> tuple[list[int | None], str]:
    if degrees is None:
        if not 2 <= max_degree <= MAX_DEGREE:
            raise ValueError(f"max_degree must be 2..{MAX_DEGREE}, got {max_degree}")
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
        if not 1 <= d <= MAX_DEGREE:
            raise ValueError(f"polynomial degree must be 1..{MAX_DEGREE}, got {d}")
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
            return module(torch.from_numpy(np.ascontiguousarray(points))).numpy()

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
        max_degree: the largest degree the automatic choice may use (2..8; the engine
            evaluates up to 4).
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
    to_fit = [layer.path for layer in lowered.layers if layer.kind == "act"]
    plan, policy = _degree_plan(degrees, to_fit, max_degree, tolerance)

    converted: list[tuple[str, nn.Module]] = []
    reports: list[ActivationReport] = []
    value = x
    fitted = 0
    for layer in lowered.layers:
        module = _convert_layer(layer, value, plan, fitted, max_degree, tolerance, reports)
        if layer.kind == "act":
            fitted += 1
            reports[-1] = _with(reports[-1], layer=len(converted))
        converted.append((layer.path, module))
        value = _apply(module, value)
    network = ConvertedNetwork(converted, input_shape).eval()
    # Report under the network's (unique) paths, as the manifest will.
    reports = [_with(r, path=network.paths[r.layer]) for r in reports]
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


def _convert_layer(
    layer: Layer,
    value: torch.Tensor,
    plan: list[int | None],
    fitted: int,
    max_degree: int,
    tolerance: float,
    reports: list[ActivationReport],
) -> nn.Module:
    if layer.kind != "act":
        return layer.module
    fit, ok = _fit(layer.module, value, plan[fitted], max_degree, tolerance)
    poly = PolyActivation(fit.coeffs, fit.lo, fit.hi, source=layer.source, fit_error=fit.rms_error)
    reports.append(
        ActivationReport(
            path=layer.path,
            layer=-1,
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
