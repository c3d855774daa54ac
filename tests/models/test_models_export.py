"""Deterministic, atomic artifact export."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import export
from models.export import ExportError, export_artifact, manifest_bytes, npz_bytes


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"fc.weight": rng.normal(size=(3, 4)), "fc.bias": rng.normal(size=(3,))}


def _manifest(name: str = "tiny") -> dict[str, Any]:
    return {
        "format": "he-inference-model",
        "format_version": 1,
        "name": name,
        "description": "test model",
        "input": {"shape": [4]},
        "layers": [{"kind": "linear", "weight": "fc.weight", "bias": "fc.bias"}],
        "output": {"labels": ["a", "b", "c"]},
    }


def test_npz_bytes_are_deterministic_and_load_without_pickle() -> None:
    arrays = _arrays()
    first = npz_bytes(arrays)
    # Fortran order and float32 inputs must not change anything once stored as float64.
    assert npz_bytes({k: np.asfortranarray(v) for k, v in arrays.items()}) == first
    with np.load(io.BytesIO(first), allow_pickle=False) as npz:
        assert npz.files == ["fc.weight", "fc.bias"]
        for key, value in arrays.items():
            np.testing.assert_array_equal(npz[key], value)
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_npz_bytes_refuses_object_arrays() -> None:
    with pytest.raises(ValueError):
        npz_bytes({"bad": np.array([object()], dtype=object)})


def test_manifest_bytes_are_canonical() -> None:
    data = manifest_bytes({"b": 1, "a": {"d": [1.5], "c": "x"}})
    assert data == b'{\n  "a": {\n    "c": "x",\n    "d": [\n      1.5\n    ]\n  },\n  "b": 1\n}\n'


def test_export_writes_loadable_artifact(tmp_path: Path) -> None:
    result = export_artifact(tmp_path, "tiny", _arrays(), _manifest())
    assert result.path == tmp_path / "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    weights = (result.path / "weights.npz").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == result.weights_sha256
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["weights"] == {"file": "weights.npz", "sha256": result.weights_sha256}

    from he_service.artifacts import load_artifact

    assert load_artifact(result.path).name == "tiny"


def test_failed_export_keeps_previous_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = export_artifact(tmp_path, "tiny", _arrays(), _manifest())
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}

    def refuse(*_: object) -> None:
        raise ExportError("simulated self-check failure")

    monkeypatch.setattr(export, "_self_check", refuse)
    changed = {k: v + 1.0 for k, v in _arrays().items()}
    with pytest.raises(ExportError, match="simulated"):
        export_artifact(tmp_path, "tiny", changed, _manifest())

    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    # No staging directory is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_export_replaces_previous_artifact(tmp_path: Path) -> None:
    export_artifact(tmp_path, "tiny", _arrays(), _manifest())
    changed = {k: v + 1.0 for k, v in _arrays().items()}
    result = export_artifact(tmp_path, "tiny", changed, _manifest())
    with np.load(result.path / "weights.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["fc.bias"], changed["fc.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_export_refuses_a_manifest_the_server_would_refuse(tmp_path: Path) -> None:
    manifest = _manifest()
    manifest["output"] = {"labels": ["a", "b"]}  # the network has 3 outputs
    with pytest.raises(ExportError, match=r"output\.labels"):
        export_artifact(tmp_path, "tiny", _arrays(), manifest)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "manifest", "message"),
    [
        ("Tiny", _manifest("Tiny"), "must match"),
        ("../x", _manifest("../x"), "must match"),
        ("tiny", _manifest("other"), "differs"),
        ("tiny", {**_manifest(), "weights": {}}, "must not contain"),
    ],
)
def test_export_rejects_bad_arguments(
    tmp_path: Path, name: str, manifest: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        export_artifact(tmp_path, name, _arrays(), manifest)
