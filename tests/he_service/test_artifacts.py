"""The artifact format: residual ``add`` layers, shapes, versions and the reference forward."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from he_service.artifacts import (
    Add,
    ArtifactError,
    Conv2d,
    Linear,
    Poly,
    format_version_for,
    load_artifact,
)
from he_service.engine import forward_plain
from models.export import manifest_bytes, npz_bytes


def _write(root: Path, layers: list[dict], arrays: dict[str, np.ndarray], **extra) -> Path:  # type: ignore[no-untyped-def]
    directory = root / "net"
    directory.mkdir(parents=True, exist_ok=True)
    weights = npz_bytes(arrays)
    (directory / "weights.npz").write_bytes(weights)
    manifest = {
        "format": "he-inference-model",
        "format_version": extra.pop("version", format_version_for(layers)),
        "name": "net",
        "input": {"shape": [2, 4, 4]},
        "layers": layers,
        "output": {"labels": ["a", "b"]},
        "weights": {"file": "weights.npz", "sha256": hashlib.sha256(weights).hexdigest()},
        **extra,
    }
    (directory / "manifest.json").write_bytes(manifest_bytes(manifest))
    return directory


def _conv(name: str, out_ch: int, in_ch: int, k: int = 3, pad: int = 1) -> dict:  # type: ignore[type-arg]
    return {"kind": "conv2d", "weight": f"{name}.weight", "bias": f"{name}.bias",
            "stride": [1, 1], "padding": [pad, pad]}  # fmt: skip


def _arrays(rng: np.random.Generator, specs: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, shape in specs.items():
        arrays[f"{name}.weight"] = rng.normal(size=shape) * 0.3
        arrays[f"{name}.bias"] = rng.normal(size=shape[0]) * 0.1
    return arrays


def _residual(tmp_path: Path, skip: list[dict], version: int | None = None) -> Path:  # type: ignore[type-arg]
    rng = np.random.default_rng(0)
    shapes = {"a": (2, 2, 3, 3), "b": (2, 2, 3, 3), "s": (2, 2, 1, 1), "fc": (2, 32)}
    layers = [
        {"kind": "add", "branches": [skip, [_conv("a", 2, 2), {"kind": "poly",
         "coeffs": [0.1, 0.5, 0.2]}, _conv("b", 2, 2)]]},
        {"kind": "poly", "coeffs": [0.0, 0.5, 0.25]},
        {"kind": "flatten"},
        {"kind": "linear", "weight": "fc.weight", "bias": "fc.bias"},
    ]  # fmt: skip
    used = {"a", "b", "fc"} | ({"s"} if skip else set())
    extra = {} if version is None else {"version": version}
    return _write(tmp_path, layers, _arrays(rng, {k: shapes[k] for k in used}), **extra)


def test_residual_blocks_load_and_run(tmp_path: Path) -> None:
    identity = load_artifact(_residual(tmp_path / "i", []))
    projected = load_artifact(_residual(tmp_path / "p", [_conv("s", 2, 2, k=1, pad=0)]))
    assert identity.manifest["format_version"] == 2
    block = identity.layers[0]
    assert isinstance(block, Add) and block.branches[0] == ()
    assert isinstance(projected.layers[0], Add)
    assert isinstance(projected.layers[0].branches[0][0], Conv2d)
    assert identity.layer_shapes() == [(2, 4, 4), (2, 4, 4), (2, 4, 4), (32,), (2,)]

    x = np.random.default_rng(1).normal(size=(2, 4, 4))
    a, b = block.branches[1][0], block.branches[1][2]
    poly = block.branches[1][1]
    assert isinstance(a, Conv2d) and isinstance(b, Conv2d) and isinstance(poly, Poly)
    from he_service.engine.reference import conv2d

    inner = conv2d(np.polynomial.polynomial.polyval(conv2d(x, a), poly.coeffs), b)
    y = np.polynomial.polynomial.polyval(x + inner, (0.0, 0.5, 0.25)).reshape(-1)
    fc = identity.layers[3]
    assert isinstance(fc, Linear)
    np.testing.assert_allclose(forward_plain(identity, x), fc.weight @ y + fc.bias)


def test_branches_that_disagree_are_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layers = [
        {"kind": "add", "branches": [[], [_conv("a", 3, 2)]]},
        {"kind": "flatten"},
        {"kind": "linear", "weight": "fc.weight", "bias": "fc.bias"},
    ]
    path = _write(tmp_path, layers, _arrays(rng, {"a": (3, 2, 3, 3), "fc": (2, 32)}))
    message = (
        r"layers\[0\] \(add\): branches disagree: branch 0 \(0 layers, identity\) outputs "
        r"\(2, 4, 4\), branch 1 \(1 layers\) outputs \(3, 4, 4\)"
    )
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


def test_add_needs_version_2_and_bounded_nesting(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="unknown kind 'add'"):
        load_artifact(_residual(tmp_path / "v1", [], version=1))
    nested: list = [_conv("a", 2, 2)]  # type: ignore[type-arg]
    for _ in range(9):
        nested = [{"kind": "add", "branches": [[], nested]}]
    rng = np.random.default_rng(0)
    layers = [*nested, {"kind": "flatten"}, {"kind": "linear", "weight": "fc.weight",
              "bias": "fc.bias"}]  # fmt: skip
    path = _write(tmp_path / "deep", layers, _arrays(rng, {"a": (2, 2, 3, 3), "fc": (2, 32)}))
    with pytest.raises(ArtifactError, match="nested deeper than 8"):
        load_artifact(path)


def test_format_version_is_the_lowest_that_holds_the_layers() -> None:
    assert format_version_for([{"kind": "linear"}]) == 1
    assert format_version_for([{"kind": "add", "branches": [[], []]}]) == 2
    inner = {"kind": "add", "branches": [[], []]}
    assert format_version_for([{"kind": "add", "branches": [[inner], []]}]) == 2
    assert json.loads(manifest_bytes({"a": 1})) == {"a": 1}


def test_task_defaults_to_classification_and_is_checked(tmp_path: Path) -> None:
    layers = [{"kind": "flatten"}, {"kind": "linear", "weight": "fc.weight", "bias": "fc.bias"}]
    arrays = _arrays(np.random.default_rng(0), {"fc": (2, 32)})
    assert load_artifact(_write(tmp_path / "a", layers, arrays)).task == "classification"
    regression = {"labels": ["a", "b"], "task": "regression"}
    assert load_artifact(_write(tmp_path / "b", layers, arrays, output=regression)).task == (
        "regression"
    )
    ranking = {"labels": ["a", "b"], "task": "ranking"}
    with pytest.raises(ArtifactError, match="output.task must be one of 'classification'"):
        load_artifact(_write(tmp_path / "c", layers, arrays, output=ranking))
