"""Turn a ``ConvertedNetwork`` into an artifact: manifest layers, weights, checks, export.

Each child of the network becomes one manifest layer (Conv2d and ``PoolConv2d`` -> ``conv2d``,
Linear -> ``linear``, Flatten -> ``flatten``, ``PolyActivation`` -> ``poly``, ``Residual`` ->
``add`` with its branches' layers, recursively); weights are named after the original module
path (``conv1.weight``). Before anything is written the outputs are
checked against the engine's output headroom; ``export_artifact`` then runs the server's loader
and compiler on the staged files before renaming them into place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from he_service.artifacts import DEFAULT_TASK, TASKS, format_version_for
from he_service.engine.params import OUTPUT_HEADROOM_BITS
from models.conversion import (
    ConversionReport,
    ConvertedNetwork,
    Residual,
    position_json,
    position_of,
)
from models.export import FORMAT, ExportError, ExportResult, export_artifact
from models.polynomial import PolyActivation
from models.training import to_tensor

__all__ = [
    "OUTPUT_LIMIT",
    "OUTPUT_RANGE_MARGIN",
    "OutputRangeError",
    "check_output_bound",
    "converted_manifest",
    "export_converted",
    "max_abs_output",
    "network_layers",
]

# The engine keeps 12 bits above the scale for the result: |output| must stay below 2^11.
OUTPUT_LIMIT = float(2 ** (OUTPUT_HEADROOM_BITS - 1))
# Outputs within a quarter of the calibrated spread beyond it are still trusted.
OUTPUT_RANGE_MARGIN = 0.25
_BATCH = 1024


class OutputRangeError(ExportError):
    """The network's outputs exceed what the engine can decrypt correctly; nothing was written."""


def network_layers(network: ConvertedNetwork) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Return the manifest ``layers`` and the weight arrays of a converted network.

    Args:
        network: the converted network.

    Returns:
        The layer specs (``add`` specs hold their branches' specs) and float64 arrays named
        ``<path>.weight`` / ``<path>.bias``.

    Raises:
        TypeError: for a child that is not a converted layer.
    """
    arrays: dict[str, np.ndarray] = {}

    def chain(part: ConvertedNetwork) -> list[dict[str, Any]]:
        layers: list[dict[str, Any]] = []
        for path, module in zip(part.paths, part, strict=True):
            if isinstance(module, nn.Conv2d | nn.Linear):
                assert module.bias is not None
                arrays[f"{path}.weight"] = module.weight.detach().to(torch.float64).numpy().copy()
                arrays[f"{path}.bias"] = module.bias.detach().to(torch.float64).numpy().copy()
                spec: dict[str, Any] = {
                    "kind": "conv2d" if isinstance(module, nn.Conv2d) else "linear",
                    "weight": f"{path}.weight",
                    "bias": f"{path}.bias",
                }
                if isinstance(module, nn.Conv2d):
                    spec["stride"] = [int(v) for v in module.stride]
                    spec["padding"] = [int(v) for v in module.padding]
                layers.append(spec)
            elif isinstance(module, nn.Flatten):
                layers.append({"kind": "flatten"})
            elif isinstance(module, PolyActivation):
                layers.append({"kind": "poly", "coeffs": list(module.coeffs)})
            elif isinstance(module, Residual):
                layers.append(
                    {"kind": "add", "branches": [chain(branch) for branch in module.networks()]}
                )
            else:
                raise TypeError(f"{path}: {type(module).__name__} is not a converted layer")
        return layers

    return chain(network), arrays


def _outputs(network: nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    inputs = to_tensor(x, torch.float64)
    dtype = next(network.parameters()).dtype
    with torch.no_grad():
        outputs = [network(chunk.to(dtype)) for chunk in inputs.split(_BATCH)]
    return torch.cat(outputs).to(torch.float64).numpy().reshape(len(inputs), -1)


def max_abs_output(network: nn.Module, x: np.ndarray | torch.Tensor) -> float:
    """Return the largest absolute output of the network over the inputs, in float64.

    Args:
        network: the network.
        x: preprocessed inputs ``(n, *input_shape)``.

    Returns:
        ``max |network(x)|``.
    """
    return float(np.abs(_outputs(network, x)).max())


def converted_manifest(
    network: ConvertedNetwork,
    name: str,
    *,
    labels: Sequence[str],
    preprocessing: Mapping[str, Any],
    description: str = "",
    report: ConversionReport | None = None,
    output_bound: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    task: str = DEFAULT_TASK,
    key_budget_bytes: int | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Build the manifest (without ``weights``) and the arrays for ``export_artifact``.

    The manifest's ``conversion`` section records the report (fitted ranges, degrees, errors,
    depth) with each activation's layer position, so evaluation can measure how often
    held-out data leaves the calibrated ranges.

    Args:
        network: the converted network.
        name: the artifact name.
        labels: one label per output (for regression, the name of each output value).
        preprocessing: ``scale``, ``mean``, ``std`` the client applies.
        description: one line for the model card.
        report: the conversion report, if any.
        output_bound: the checked output bound (``max_abs_output``, ``samples``, ``limit``).
        training: the ``training`` section, if any.
        provenance: the ``provenance`` section, if any.
        task: ``classification`` or ``regression`` (``output.task``; written only when it
            is not the default, so classification manifests keep their format-1 bytes).
        key_budget_bytes: the public-key budget the engine holds both plans to
            (``serving.key_budget_bytes``); None leaves the engine's default.
        privacy: the differential-privacy guarantee (``models.privacy``), if the network
            was trained with DP-SGD; None writes no ``privacy`` section.

    Returns:
        The manifest and the arrays.

    Raises:
        ValueError: for an unknown task or a budget that is not positive.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if key_budget_bytes is not None and key_budget_bytes <= 0:
        raise ValueError(f"the key budget must be positive, got {key_budget_bytes} bytes")
    layers, arrays = network_layers(network)
    conversion: dict[str, Any] = {}
    if report is not None:
        conversion.update(report.to_json())
    else:
        conversion["depth"] = network.depth
    conversion["activations"] = _activation_entries(network, conversion.get("activations"))
    if output_bound is not None:
        conversion["output_bound"] = dict(output_bound)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": format_version_for(layers),
        "name": name,
        "description": description,
        "input": {
            "shape": list(network.input_shape),
            "preprocessing": {
                "scale": float(preprocessing.get("scale", 1.0)),
                "mean": [float(v) for v in preprocessing.get("mean", [0.0])],
                "std": [float(v) for v in preprocessing.get("std", [1.0])],
            },
        },
        "layers": layers,
        "output": {"labels": [str(label) for label in labels]},
        "conversion": conversion,
    }
    if task != DEFAULT_TASK:
        manifest["output"]["task"] = task
    if key_budget_bytes is not None:
        manifest["serving"] = {"key_budget_bytes": int(key_budget_bytes)}
    if training is not None:
        manifest["training"] = dict(training)
    if provenance is not None:
        manifest["provenance"] = dict(provenance)
    if privacy is not None:
        manifest["privacy"] = dict(privacy)
    return manifest, arrays


def _activation_entries(
    network: ConvertedNetwork, reported: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    by_position = {position_of(entry["layer"]): entry for entry in reported or []}
    entries = []
    for position, path, module in network.activations():
        entry = dict(by_position.get(position, {"path": path, "layer": position_json(position)}))
        entry["coeffs"] = list(module.coeffs)
        finite = math.isfinite(module.lo) and math.isfinite(module.hi)
        # JSON has no infinity: an exact x^2 has no fitted range.
        entry["range"] = [module.lo, module.hi] if finite else None
        entries.append(entry)
    return entries


def export_converted(
    network: ConvertedNetwork,
    out_dir: str | Path,
    name: str,
    *,
    labels: Sequence[str],
    preprocessing: Mapping[str, Any],
    check_x: np.ndarray | torch.Tensor,
    description: str = "",
    report: ConversionReport | None = None,
    training: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    task: str = DEFAULT_TASK,
    key_budget_bytes: int | None = None,
    privacy: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Check and export a converted network to ``<out_dir>/<name>/``.

    Args:
        network: the converted network.
        out_dir: the parent directory of the artifact.
        name: the artifact name (``[a-z0-9-]``).
        labels: one label per output.
        preprocessing: ``scale``, ``mean``, ``std`` the client applies to raw inputs.
        check_x: preprocessed inputs whose outputs must stay below ``OUTPUT_LIMIT`` (use the
            training and held-out data, or at least the calibration data).
        description: one line for the model card.
        report: the conversion report, recorded in the manifest.
        training: the manifest's ``training`` section, if any.
        provenance: the manifest's ``provenance`` section, if any.
        task: ``classification`` or ``regression``.
        key_budget_bytes: the public-key budget for both plans (None: the engine's default).
        privacy: the manifest's ``privacy`` section after DP-SGD fine-tuning, if any.

    Returns:
        Where the artifact went, its weights sha256 and the compiled plans.

    Raises:
        OutputRangeError: an output reaches ``OUTPUT_LIMIT``; nothing is written.
        ExportError: the server would refuse the artifact or the engine cannot compile it (too
            deep, or public keys over the budget; the message says what to change); nothing
            is written.
        ValueError: for a bad name, task or budget.
        OSError: if the files cannot be written.
    """
    manifest, arrays = converted_manifest(
        network,
        name,
        labels=labels,
        preprocessing=preprocessing,
        description=description,
        report=report,
        output_bound=check_output_bound(network, check_x),
        training=training,
        provenance=provenance,
        task=task,
        key_budget_bytes=key_budget_bytes,
        privacy=privacy,
    )
    return export_artifact(out_dir, name, arrays, manifest)


def check_output_bound(network: nn.Module, x: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """Refuse a network whose outputs on ``x`` reach the engine's output limit.

    Args:
        network: the network.
        x: preprocessed inputs.

    Returns:
        ``{"max_abs_output", "samples", "limit", "output_ranges", "range_margin", "margins"}``
        for the manifest. ``output_ranges`` are, per output, the smallest and largest value
        seen on ``x`` widened on each side by ``range_margin`` times their distance (at least
        1): the client
        flags a decrypted output outside them as unreliable (the polynomials are accurate only
        on inputs like the calibration data). ``margins`` are 100 quantiles of the gap between
        the two largest outputs (for a classifier: how far each sample is from changing
        class), which the engine weighs its expected encryption error against; absent for a
        single output.

    Raises:
        OutputRangeError: if ``max |output| >= OUTPUT_LIMIT``.
    """
    outputs = _outputs(network, x)
    bound = float(np.abs(outputs).max())
    samples = len(x)
    if not bound < OUTPUT_LIMIT:
        raise OutputRangeError(
            f"the network's largest output is {bound:.6g} on {samples} samples, but the engine "
            f"decrypts outputs correctly only below {OUTPUT_LIMIT:g} in absolute value; "
            "scale the last layer down, train with weight decay, or fine-tune with a larger "
            "range_weight so that activations stay inside their fitted ranges"
        )
    low, high = outputs.min(axis=0), outputs.max(axis=0)
    widen = OUTPUT_RANGE_MARGIN * np.maximum(high - low, 1.0)
    result: dict[str, Any] = {
        "max_abs_output": bound,
        "samples": samples,
        "limit": OUTPUT_LIMIT,
        "output_ranges": [
            [float(f"{lo:.6g}"), float(f"{hi:.6g}")]
            for lo, hi in zip(low - widen, high + widen, strict=True)
        ],
        "range_margin": OUTPUT_RANGE_MARGIN,
    }
    if outputs.shape[1] > 1:
        top = np.sort(outputs, axis=1)
        gaps = top[:, -1] - top[:, -2]
        quantiles = np.quantile(gaps, (np.arange(100) + 0.5) / 100)
        result["margins"] = [float(f"{q:.4g}") for q in quantiles]
    return result
