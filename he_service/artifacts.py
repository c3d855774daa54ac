"""Load and check exported model artifacts: ``manifest.json`` + ``weights.npz``.

The artifact format is the only contract between ``models`` (torch, writes artifacts) and
``he_service`` (numpy + SEAL, serves them). Every check lives here, so both sides refuse a bad
artifact with the same precise message.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from he_service.privacy import PrivacyClaimError, check_privacy

FORMAT = "he-inference-model"
FORMAT_VERSION = 2
# Version 1 artifacts are version 2 artifacts without ``add`` layers; exporters write the lowest
# version that holds the layers (``format_version_for``), so servers that read only version 1
# still serve every network without residual blocks.
READABLE_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
# Residual blocks nest; a bound keeps a hostile manifest from recursing without end.
MAX_NESTING = 8
MAX_LAYERS = 1024
# What the outputs mean (manifest ``output.task``): scores whose argmax is the class, or the
# predicted values themselves, named by ``output.labels``.
TASKS = ("classification", "regression")
DEFAULT_TASK = "classification"

__all__ = [
    "DEFAULT_TASK",
    "FORMAT",
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "TASKS",
    "Add",
    "ArtifactError",
    "Conv2d",
    "Flatten",
    "Layer",
    "Linear",
    "ModelArtifact",
    "Poly",
    "format_version_for",
    "load_artifact",
]


class ArtifactError(ValueError):
    """An artifact directory is missing, malformed, or inconsistent."""

    def __init__(self, where: Path | str, problem: str) -> None:
        super().__init__(f"model artifact {where}: {problem}")
        self.where = str(where)
        self.problem = problem


@dataclass(frozen=True)
class Conv2d:
    """2-D convolution, torch layout: weight (out_ch, in_ch, kh, kw), bias (out_ch,)."""

    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    kind: str = field(default="conv2d", init=False)


@dataclass(frozen=True)
class Linear:
    """Dense layer, torch layout: weight (out_features, in_features), bias (out_features,)."""

    weight: np.ndarray
    bias: np.ndarray
    kind: str = field(default="linear", init=False)


@dataclass(frozen=True)
class Poly:
    """Element-wise polynomial activation, coefficients lowest degree first."""

    coeffs: tuple[float, ...]
    kind: str = field(default="poly", init=False)

    @property
    def degree(self) -> int:
        return max((i for i, c in enumerate(self.coeffs) if c != 0.0), default=0)


@dataclass(frozen=True)
class Flatten:
    """Reshape (C, H, W) to a vector in torch's C, H, W order."""

    kind: str = field(default="flatten", init=False)


@dataclass(frozen=True)
class Add:
    """A residual join: ``y = sum_b branch_b(x)``, every branch applied to the same input.

    An empty branch is the identity (a skip connection), so ``x + f(x)`` is
    ``Add(((), f_layers))``. Every branch maps the input shape to the same output shape.
    """

    branches: tuple[tuple[Layer, ...], ...]
    kind: str = field(default="add", init=False)


Layer = Conv2d | Linear | Poly | Flatten | Add


@dataclass(frozen=True)
class ModelArtifact:
    """A checked model: layers with their weights and the manifest they came from.

    ``task`` is ``classification`` (the outputs are class scores, ``labels`` the classes) or
    ``regression`` (the outputs are the predicted values, ``labels`` their names).
    """

    name: str
    description: str
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any]
    layers: tuple[Layer, ...]
    labels: tuple[str, ...]
    manifest: dict[str, Any]
    path: Path
    task: str = DEFAULT_TASK

    @property
    def output_size(self) -> int:
        return len(self.labels)

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Return the activation shape after each layer (index 0 is the input)."""
        return _infer_shapes(self.input_shape, self.layers, self.path)


def load_artifact(path: Path | str) -> ModelArtifact:
    """Load an artifact directory and check it completely.

    A ``privacy`` section (a differential-privacy claim) is checked by recomputing its
    epsilon (``he_service.privacy.check_privacy``).

    Args:
        path: directory holding ``manifest.json`` and the weights file it names.

    Returns:
        The checked artifact.

    Raises:
        ArtifactError: with a message that names the file and the exact problem, or says
            which differential-privacy claim the recorded parameters do not support.
    """
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(root, f"no {MANIFEST_FILE}; rebuild it with `he-models train`")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(manifest_path, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(manifest_path, f"not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(manifest_path, "top level must be a JSON object")

    _expect(manifest.get("format") == FORMAT, manifest_path, f"'format' must be {FORMAT!r}")
    version = manifest.get("format_version")
    _expect(
        version in READABLE_VERSIONS,
        manifest_path,
        f"format_version {version!r} is not supported (this server reads "
        f"{', '.join(map(str, READABLE_VERSIONS))}); re-export the model with the matching "
        "`he-models`",
    )
    name = _get(manifest, "name", str, manifest_path)
    _expect(name == root.name, manifest_path, f"name {name!r} differs from directory {root.name!r}")

    weights = _load_weights(root, _get(manifest, "weights", dict, manifest_path))
    input_spec = _get(manifest, "input", dict, manifest_path)
    shape = _get(input_spec, "shape", list, manifest_path)
    _expect(
        len(shape) in (1, 3) and all(isinstance(d, int) and d > 0 for d in shape),
        manifest_path,
        f"input.shape must be [features] or [channels, height, width], got {shape}",
    )
    preprocessing = _check_preprocessing(input_spec.get("preprocessing", {}), shape, manifest_path)

    raw_layers = _get(manifest, "layers", list, manifest_path)
    _expect(len(raw_layers) > 0, manifest_path, "layers is empty")
    parser = _LayerParser(weights, manifest_path, version == 1)
    layers = parser.chain(raw_layers, "layers", depth=0)
    unused = sorted(set(weights) - parser.used)
    _expect(not unused, manifest_path, f"weights.npz holds arrays no layer uses: {unused}")

    output = _get(manifest, "output", dict, manifest_path)
    labels = _get(output, "labels", list, manifest_path)
    _expect(all(isinstance(x, str) for x in labels), manifest_path, "output.labels must be strings")
    task = output.get("task", DEFAULT_TASK)
    _expect(
        task in TASKS,
        manifest_path,
        f"output.task must be one of {', '.join(map(repr, TASKS))}, got {task!r}",
    )
    artifact = ModelArtifact(
        name=name,
        description=str(manifest.get("description", "")),
        input_shape=tuple(shape),
        preprocessing=preprocessing,
        layers=layers,
        labels=tuple(labels),
        manifest=manifest,
        path=root,
        task=task,
    )
    final = artifact.layer_shapes()[-1]
    _expect(
        final == (len(labels),),
        manifest_path,
        f"network outputs shape {final} but output.labels has {len(labels)} entries",
    )
    if "privacy" in manifest:
        try:
            check_privacy(manifest["privacy"])
        except PrivacyClaimError as exc:
            raise ArtifactError(
                manifest_path, f"differential-privacy claim refused: {exc}"
            ) from None
    return artifact


def format_version_for(layer_specs: list[Any]) -> int:
    """Return the lowest format version that holds these manifest layer specs."""

    def has_add(specs: list[Any]) -> bool:
        return any(
            isinstance(spec, dict)
            and (spec.get("kind") == "add" or any(has_add(b) for b in spec.get("branches", [])))
            for spec in specs
        )

    return 2 if has_add(layer_specs) else 1


def _expect(ok: bool, where: Path, problem: str) -> None:
    if not ok:
        raise ArtifactError(where, problem)


def _get(spec: Mapping[str, Any], key: str, kind: type, where: Path) -> Any:
    value = spec.get(key)
    if not isinstance(value, kind):
        raise ArtifactError(where, f"'{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _load_weights(root: Path, spec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    file_name = spec.get("file")
    if not isinstance(file_name, str) or "/" in file_name or file_name.startswith("."):
        raise ArtifactError(root, f"weights.file must be a plain file name, got {file_name!r}")
    path = root / file_name
    if not path.is_file():
        raise ArtifactError(path, "weights file is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.get("sha256"):
        raise ArtifactError(
            path, f"sha256 {digest} does not match the manifest's {spec.get('sha256')!r}"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key], dtype=np.float64) for key in npz.files}
    except (ValueError, OSError) as exc:
        raise ArtifactError(path, f"cannot read arrays without pickle ({exc})") from None
    for key, array in arrays.items():
        if not np.all(np.isfinite(array)):
            raise ArtifactError(path, f"array {key!r} holds NaN or infinity")
    return arrays


def _check_preprocessing(spec: Any, shape: list[int], where: Path) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise ArtifactError(where, "input.preprocessing must be an object")
    channels = shape[0]  # image channels, or features of a vector input
    result: dict[str, Any] = {"scale": float(spec.get("scale", 1.0))}
    for key, default in (("mean", 0.0), ("std", 1.0)):
        value = spec.get(key, [default])
        if not isinstance(value, list) or len(value) not in (1, channels):
            raise ArtifactError(
                where, f"input.preprocessing.{key} must be a list of 1 or {channels} numbers"
            )
        if key == "std" and any(float(v) == 0.0 for v in value):
            raise ArtifactError(where, "input.preprocessing.std must not contain 0")
        result[key] = [float(v) for v in value]
    return result


class _LayerParser:
    """Parse manifest layer specs (recursively, for residual branches) and track used weights."""

    def __init__(self, weights: Mapping[str, np.ndarray], where: Path, v1: bool) -> None:
        self.weights, self.where, self.v1 = weights, where, v1
        self.used: set[str] = set()
        self.count = 0

    def chain(self, specs: list[Any], path: str, depth: int) -> tuple[Layer, ...]:
        return tuple(self.layer(f"{path}[{i}]", spec, depth) for i, spec in enumerate(specs))

    def layer(self, path: str, spec: Any, depth: int) -> Layer:
        where = self.where
        self.count += 1
        if self.count > MAX_LAYERS:
            raise ArtifactError(where, f"more than {MAX_LAYERS} layers")
        if not isinstance(spec, dict):
            raise ArtifactError(where, f"{path} must be an object")
        kind = spec.get("kind")

        def array(key: str, ndim: int) -> np.ndarray:
            name = spec.get(key)
            if not isinstance(name, str) or name not in self.weights:
                raise ArtifactError(where, f"{path} ({kind}): {key} {name!r} not in weights")
            value = self.weights[name]
            if value.ndim != ndim:
                raise ArtifactError(
                    where, f"{path} ({kind}): {name!r} has {value.ndim} dims, expected {ndim}"
                )
            self.used.add(name)
            return value

        if kind == "conv2d":
            weight, bias = array("weight", 4), array("bias", 1)
            stride, padding = spec.get("stride", [1, 1]), spec.get("padding", [0, 0])
            for label, pair, low in (("stride", stride, 1), ("padding", padding, 0)):
                if not (
                    isinstance(pair, list)
                    and len(pair) == 2
                    and all(isinstance(v, int) and v >= low for v in pair)
                ):
                    raise ArtifactError(where, f"{path} (conv2d): bad {label} {pair!r}")
            if bias.shape != (weight.shape[0],):
                raise ArtifactError(where, f"{path} (conv2d): bias shape {bias.shape}")
            return Conv2d(weight, bias, (stride[0], stride[1]), (padding[0], padding[1]))
        if kind == "linear":
            weight, bias = array("weight", 2), array("bias", 1)
            if bias.shape != (weight.shape[0],):
                raise ArtifactError(where, f"{path} (linear): bias shape {bias.shape}")
            return Linear(weight, bias)
        if kind == "poly":
            coeffs = spec.get("coeffs")
            if not (
                isinstance(coeffs, list)
                and 1 <= len(coeffs) <= 9
                and all(isinstance(c, int | float) and math.isfinite(c) for c in coeffs)
            ):
                raise ArtifactError(where, f"{path} (poly): coeffs must be 1-9 finite numbers")
            return Poly(tuple(float(c) for c in coeffs))
        if kind == "flatten":
            return Flatten()
        if kind == "add" and not self.v1:
            branches = spec.get("branches")
            if not (
                isinstance(branches, list)
                and len(branches) >= 2
                and all(isinstance(b, list) for b in branches)
            ):
                raise ArtifactError(where, f"{path} (add): branches must be 2 or more lists")
            if depth + 1 > MAX_NESTING:
                raise ArtifactError(where, f"{path} (add): nested deeper than {MAX_NESTING}")
            return Add(
                tuple(
                    self.chain(branch, f"{path}.branches[{b}]", depth + 1)
                    for b, branch in enumerate(branches)
                )
            )
        known = "conv2d, linear, poly, flatten" + ("" if self.v1 else ", add")
        raise ArtifactError(where, f"{path}: unknown kind {kind!r} (known: {known})")


def _infer_shapes(
    input_shape: tuple[int, ...], layers: tuple[Layer, ...], where: Path
) -> list[tuple[int, ...]]:
    shapes = [input_shape]
    for index, layer in enumerate(layers):
        shapes.append(_shape_after(layer, shapes[-1], f"layers[{index}]", where))
    return shapes


def _shape_after(layer: Layer, shape: tuple[int, ...], path: str, where: Path) -> tuple[int, ...]:
    """Return the shape ``layer`` produces from ``shape``, or refuse the mismatch."""
    if isinstance(layer, Conv2d):
        if len(shape) != 3 or shape[0] != layer.weight.shape[1]:
            raise ArtifactError(
                where,
                f"{path} (conv2d) expects {layer.weight.shape[1]} input channels, gets shape "
                f"{shape}",
            )
        _, kh, kw = layer.weight.shape[1:]
        out_h = (shape[1] + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
        out_w = (shape[2] + 2 * layer.padding[1] - kw) // layer.stride[1] + 1
        if out_h < 1 or out_w < 1:
            raise ArtifactError(where, f"{path} (conv2d): kernel larger than input")
        return (layer.weight.shape[0], out_h, out_w)
    if isinstance(layer, Flatten):
        return (math.prod(shape),)
    if isinstance(layer, Linear):
        if shape != (layer.weight.shape[1],):
            raise ArtifactError(
                where,
                f"{path} (linear) expects {layer.weight.shape[1]} inputs, gets shape {shape}",
            )
        return (layer.weight.shape[0],)
    if isinstance(layer, Add):
        outputs = []
        for b, branch in enumerate(layer.branches):
            out = shape
            for i, inner in enumerate(branch):
                out = _shape_after(inner, out, f"{path}.branches[{b}][{i}]", where)
            outputs.append(out)
        if len(set(outputs)) > 1:
            shown = ", ".join(
                f"branch {b} ({len(branch)} layers{', identity' if not branch else ''}) "
                f"outputs {out}"
                for b, (branch, out) in enumerate(zip(layer.branches, outputs, strict=True))
            )
            raise ArtifactError(where, f"{path} (add): branches disagree: {shown}")
        return outputs[0]
    return shape
