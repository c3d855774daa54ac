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

FORMAT = "he-inference-model"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArtifactError",
    "Conv2d",
    "Flatten",
    "Layer",
    "Linear",
    "ModelArtifact",
    "Poly",
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


Layer = Conv2d | Linear | Poly | Flatten


@dataclass(frozen=True)
class ModelArtifact:
    """A checked model: layers with their weights and the manifest they came from."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    preprocessing: dict[str, Any]
    layers: tuple[Layer, ...]
    labels: tuple[str, ...]
    manifest: dict[str, Any]
    path: Path

    @property
    def output_size(self) -> int:
        return len(self.labels)

    def layer_shapes(self) -> list[tuple[int, ...]]:
        """Return the activation shape after each layer (index 0 is the input)."""
        return _infer_shapes(self.input_shape, self.layers, self.path)


def load_artifact(path: Path | str) -> ModelArtifact:
    """Load an artifact directory and check it completely.

    Args:
        path: directory holding ``manifest.json`` and the weights file it names.

    Returns:
        The checked artifact.

    Raises:
        ArtifactError: with a message that names the file and the exact problem.
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
        version == FORMAT_VERSION,
        manifest_path,
        f"format_version {version!r} is not supported (this server reads {FORMAT_VERSION}); "
        "re-export the model with the matching `he-models`",
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
    layers = tuple(
        _parse_layer(i, spec, weights, manifest_path) for i, spec in enumerate(raw_layers)
    )
    used = {k for spec in raw_layers for k in (spec.get("weight"), spec.get("bias")) if k}
    unused = sorted(set(weights) - used)
    _expect(not unused, manifest_path, f"weights.npz holds arrays no layer uses: {unused}")

    labels = _get(_get(manifest, "output", dict, manifest_path), "labels", list, manifest_path)
    _expect(all(isinstance(x, str) for x in labels), manifest_path, "output.labels must be strings")
    artifact = ModelArtifact(
        name=name,
        description=str(manifest.get("description", "")),
        input_shape=tuple(shape),
        preprocessing=preprocessing,
        layers=layers,
        labels=tuple(labels),
        manifest=manifest,
        path=root,
    )
    final = artifact.layer_shapes()[-1]
    _expect(
        final == (len(labels),),
        manifest_path,
        f"network outputs shape {final} but output.labels has {len(labels)} entries",
    )
    return artifact


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


def _parse_layer(index: int, spec: Any, weights: Mapping[str, np.ndarray], where: Path) -> Layer:
    if not isinstance(spec, dict):
        raise ArtifactError(where, f"layers[{index}] must be an object")
    kind = spec.get("kind")

    def array(key: str, ndim: int) -> np.ndarray:
        name = spec.get(key)
        if not isinstance(name, str) or name not in weights:
            raise ArtifactError(where, f"layers[{index}] ({kind}): {key} {name!r} not in weights")
        value = weights[name]
        if value.ndim != ndim:
            raise ArtifactError(
                where, f"layers[{index}] ({kind}): {name!r} has {value.ndim} dims, expected {ndim}"
            )
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
                raise ArtifactError(where, f"layers[{index}] (conv2d): bad {label} {pair!r}")
        if bias.shape != (weight.shape[0],):
            raise ArtifactError(where, f"layers[{index}] (conv2d): bias shape {bias.shape}")
        return Conv2d(weight, bias, (stride[0], stride[1]), (padding[0], padding[1]))
    if kind == "linear":
        weight, bias = array("weight", 2), array("bias", 1)
        if bias.shape != (weight.shape[0],):
            raise ArtifactError(where, f"layers[{index}] (linear): bias shape {bias.shape}")
        return Linear(weight, bias)
    if kind == "poly":
        coeffs = spec.get("coeffs")
        if not (
            isinstance(coeffs, list)
            and 1 <= len(coeffs) <= 9
            and all(isinstance(c, int | float) and math.isfinite(c) for c in coeffs)
        ):
            raise ArtifactError(where, f"layers[{index}] (poly): coeffs must be 1-9 finite numbers")
        return Poly(tuple(float(c) for c in coeffs))
    if kind == "flatten":
        return Flatten()
    raise ArtifactError(
        where, f"layers[{index}]: unknown kind {kind!r} (known: conv2d, linear, poly, flatten)"
    )


def _infer_shapes(
    input_shape: tuple[int, ...], layers: tuple[Layer, ...], where: Path
) -> list[tuple[int, ...]]:
    shapes = [input_shape]
    shape = input_shape
    for index, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            if len(shape) != 3 or shape[0] != layer.weight.shape[1]:
                raise ArtifactError(
                    where,
                    f"layers[{index}] (conv2d) expects {layer.weight.shape[1]} input "
                    f"channels, gets shape {shape}",
                )
            _, kh, kw = layer.weight.shape[1:]
            out_h = (shape[1] + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
            out_w = (shape[2] + 2 * layer.padding[1] - kw) // layer.stride[1] + 1
            if out_h < 1 or out_w < 1:
                raise ArtifactError(where, f"layers[{index}] (conv2d): kernel larger than input")
            shape = (layer.weight.shape[0], out_h, out_w)
        elif isinstance(layer, Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, Linear):
            if shape != (layer.weight.shape[1],):
                raise ArtifactError(
                    where,
                    f"layers[{index}] (linear) expects {layer.weight.shape[1]} inputs, "
                    f"gets shape {shape}",
                )
            shape = (layer.weight.shape[0],)
        shapes.append(shape)
    return shapes
