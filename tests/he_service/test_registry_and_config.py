from __future__ import annotations

import json
from pathlib import Path

import pytest

from he_service import create_app
from he_service.artifacts import ArtifactError, load_artifact
from he_service.config import Config
from he_service.registry import RegistryError


def _edit_manifest(models_dir: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    path = models_dir / "mnist-cnn" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m["weights"].update(sha256="0" * 64), "does not match the manifest"),
        (lambda m: m["layers"].append({"kind": "maxpool"}), "unknown kind 'maxpool'"),
        (lambda m: m["layers"][3].update(weight="nope"), "weight 'nope' not in weights"),
        (lambda m: m["output"].update(labels=["a"]), "has 1 entries"),
        (lambda m: m["layers"].pop(2), r"expects 256 inputs, gets shape \(4, 8, 8\)"),
        (lambda m: m.update(name="other"), "differs from directory"),
    ],
)
def test_bad_manifests_are_refused_precisely(models_dir_copy: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    _edit_manifest(models_dir_copy, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(models_dir_copy / "mnist-cnn")
    with pytest.raises(RegistryError, match="refusing to serve"):
        create_app({"models_dir": models_dir_copy})


def test_missing_or_empty_models_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        create_app({"models_dir": tmp_path / "none"})
    with pytest.raises(RegistryError, match="no model artifacts"):
        create_app({"models_dir": tmp_path})


def test_weights_that_need_pickle_are_refused(models_dir_copy: Path) -> None:
    import hashlib

    import numpy as np

    weights = models_dir_copy / "mnist-cnn" / "weights.npz"
    np.savez(weights, **{"conv1.weight": np.array([object()], dtype=object)})
    _edit_manifest(
        models_dir_copy,
        lambda m: m["weights"].update(sha256=hashlib.sha256(weights.read_bytes()).hexdigest()),
    )
    with pytest.raises(ArtifactError, match="without pickle"):
        load_artifact(models_dir_copy / "mnist-cnn")


def test_config_precedence_defaults_env_overrides() -> None:
    assert Config.load(environ={}).max_samples_per_request == 16
    env = {"HE_SERVICE_MAX_SAMPLES_PER_REQUEST": "4", "HE_SERVICE_KEY_STORE_TTL_SECONDS": "9"}
    config = Config.load({"max_samples_per_request": 2}, environ=env)
    assert config.max_samples_per_request == 2 and config.key_store_ttl_seconds == 9
    with pytest.raises(ValueError, match="unknown configuration keys"):
        Config.load({"nope": 1}, environ={})
    with pytest.raises(ValueError, match="is not an integer"):
        Config.load(environ={"HE_SERVICE_MAX_PREDICT_BYTES": "lots"})
