"""The registry: one definition of servable, refused models beside served ones; the config."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from he_service import create_app
from he_service.artifacts import ArtifactError, load_artifact
from he_service.config import DEFAULT_MODELS_DIR, Config
from he_service.registry import ModelRegistry, RegistryError


def _edit_manifest(models_dir: Path, edit, model: str = "mnist-cnn") -> Path:  # type: ignore[no-untyped-def]
    path = models_dir / model / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return path


@pytest.fixture
def two_models(tmp_path: Path) -> Path:
    """A private models directory with breast-cancer-mlp and mnist-cnn, which a test may damage."""
    target = tmp_path / "models"
    for name in ("breast-cancer-mlp", "mnist-cnn"):
        shutil.copytree(DEFAULT_MODELS_DIR / name, target / name)
    return target


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
    # The only model of the directory: nothing is servable, and the reason says why.
    with pytest.raises(RegistryError, match=f"no servable model in .*mnist-cnn: .*{message}"):
        create_app({"models_dir": models_dir_copy})


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        # The engine's refusal: a polynomial it cannot evaluate.
        (lambda m: m["layers"][1].update(coeffs=[0.0] * 5 + [1.0]), "degree"),
        # Over the key budget the artifact sets for itself.
        (lambda m: m.update(serving={"key_budget_bytes": 1000}), "key budget"),
    ],
)
def test_one_bad_artifact_is_refused_and_the_others_served(
    two_models: Path, edit, reason: str, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    _edit_manifest(two_models, edit)
    with caplog.at_level(logging.WARNING, logger="he_service.registry"):
        app = create_app({"models_dir": two_models})
    lines = [r.getMessage() for r in caplog.records if "mnist-cnn" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines  # logged once, with the reason
    assert "\n" not in lines[0]
    test = app.test_client()
    health = test.get("/v1/health").get_json()
    assert health["status"] == "degraded"
    assert health["models"] == ["breast-cancer-mlp"]
    assert reason in health["refused"]["mnist-cnn"]
    assert str(two_models) not in health["refused"]["mnist-cnn"]  # no server paths in public
    listing = test.get("/v1/models").get_json()
    assert [m["name"] for m in listing["models"]] == ["breast-cancer-mlp"]
    assert listing["refused"] == [{"name": "mnist-cnn", "reason": health["refused"]["mnist-cnn"]}]
    for response in (
        test.get("/v1/models/mnist-cnn"),
        test.post("/v1/models/mnist-cnn/predict", data=b"x", headers={"X-Context-Id": "0" * 64}),
    ):
        assert response.status_code == 404
        error = response.get_json()["error"]
        assert error["code"] == "model_not_found"
        assert "'mnist-cnn' is not served" in error["message"] and reason in error["message"]
    assert test.get("/v1/models/breast-cancer-mlp").status_code == 200


def test_a_request_that_cannot_fit_the_body_limit_refuses_only_that_model(
    two_models: Path,
) -> None:
    # One latency sample: breast-cancer-mlp about 197 KB, mnist-cnn about 787 KB.
    registry = ModelRegistry.from_directory(
        two_models, Config.load({"max_predict_bytes": 400_000}, environ={})
    )
    assert registry.names() == ["breast-cancer-mlp"]
    assert "above the 400000-byte request limit" in registry.refused["mnist-cnn"]


def test_healthy_directories_report_ok_and_nothing_refused(app) -> None:  # type: ignore[no-untyped-def]
    health = app.test_client().get("/v1/health").get_json()
    assert health["status"] == "ok" and health["refused"] == {}
    assert app.test_client().get("/v1/models").get_json()["refused"] == []


def test_missing_or_empty_models_dir_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        create_app({"models_dir": tmp_path / "none"})
    with pytest.raises(RegistryError, match="no model artifacts"):
        create_app({"models_dir": tmp_path})


def test_serve_with_nothing_servable_prints_one_line_and_exits_2(models_dir_copy: Path) -> None:
    _edit_manifest(models_dir_copy, lambda m: m.update(format_version=99))
    result = subprocess.run(
        [sys.executable, "-m", "he_service.cli", "serve", "--models-dir", str(models_dir_copy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("he-service:")]
    assert len(ours) == 1 and "format_version 99" in ours[0], result.stderr


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
