"""Regression heads: MSE training and fine-tuning, the task in the manifest, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes
from torch import nn

from he_service.artifacts import load_artifact
from models import FineTuneConfig, TrainConfig, convert, evaluate_artifact, fine_tune
from models.cli import main
from models.packaging import export_converted
from models.training import (
    deterministic_torch,
    model_outputs,
    preprocess_batch,
    target_tensor,
    task_metrics,
    train_loop,
)

MLP_SOURCE = """
from torch import nn


def make():
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
"""


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))


@pytest.fixture(scope="module")
def diabetes() -> dict[str, np.ndarray]:
    """scikit-learn's diabetes data (442 patients, 10 features), 88 held out."""
    data = load_diabetes()
    order = np.random.default_rng(0).permutation(len(data.target))
    test, train = order[:88], order[88:]
    return {
        "x_train": data.data[train],
        "y_train": data.target[train],
        "x_test": data.data[test],
        "y_test": data.target[test],
    }


@pytest.fixture(scope="module")
def trained(diabetes: dict[str, np.ndarray]) -> nn.Sequential:
    """The MLP trained with mean squared error, in target units."""
    x = diabetes["x_train"]
    preprocessing = {"mean": list(x.mean(axis=0)), "std": list(x.std(axis=0))}
    x = preprocess_batch(x, preprocessing, (10,))
    y = diabetes["y_train"]
    mean, std = float(y.mean()), float(y.std())
    with deterministic_torch(0):
        model = _mlp()
        # Standardised targets train quickly; the last layer then maps back to target units.
        train_loop(
            model,
            torch.tensor(x, dtype=torch.float32),
            target_tensor((y - mean) / std, "regression"),
            TrainConfig(epochs=100, batch_size=32, lr=1e-2, weight_decay=1e-3),
            task="regression",
        )
    last = model[3]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.mul_(std)
        last.bias.mul_(std).add_(mean)
    return model


def _standardised(diabetes: dict[str, np.ndarray], key: str) -> np.ndarray:
    x = diabetes["x_train"]
    spec = {"mean": list(x.mean(axis=0)), "std": list(x.std(axis=0))}
    return preprocess_batch(diabetes[key], spec, (10,))


def test_task_metrics() -> None:
    outputs = np.array([[1.0], [2.0], [4.0]])
    metrics = task_metrics("regression", outputs, np.array([1.0, 3.0, 4.0]))
    assert metrics == pytest.approx({"mse": 1 / 3, "mae": 1 / 3, "r2": 1 - 1 / (14 / 3)})
    scores = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert task_metrics("classification", scores, np.array([1, 1])) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="task must be one of"):
        task_metrics("ranking", scores, np.array([1, 1]))


def test_regression_mlp_is_fine_tuned_with_mse_and_served_with_its_task(
    diabetes: dict[str, np.ndarray], trained: nn.Sequential, tmp_path: Path
) -> None:
    x_train = _standardised(diabetes, "x_train")
    x_test = _standardised(diabetes, "x_test")
    y_train, y_test = diabetes["y_train"], diabetes["y_test"]
    original = task_metrics("regression", model_outputs(trained, x_test), y_test)
    assert original["r2"] > 0.4
    network, report = convert(trained, x_train, degrees=2)
    before = task_metrics("regression", model_outputs(network, x_test), y_test)
    tuned = fine_tune(
        network, x_train, y_train, FineTuneConfig(epochs=20, batch_size=32), task="regression"
    )
    after = task_metrics("regression", model_outputs(tuned, x_test), y_test)
    assert after["mse"] < before["mse"]
    assert after["r2"] > original["r2"] - 0.05

    x_raw = diabetes["x_train"]
    preprocessing = {"mean": list(x_raw.mean(axis=0)), "std": list(x_raw.std(axis=0))}
    export_converted(
        tuned,
        tmp_path,
        "diabetes-mlp",
        labels=["disease progression"],
        preprocessing=preprocessing,
        check_x=np.concatenate([x_train, x_test]),
        report=report,
        task="regression",
    )
    artifact = load_artifact(tmp_path / "diabetes-mlp")
    assert artifact.task == "regression" and artifact.labels == ("disease progression",)
    evaluation = evaluate_artifact(
        tmp_path / "diabetes-mlp", diabetes["x_test"], y_test, encrypted_samples=6
    )
    assert evaluation.poly == pytest.approx(after, rel=1e-9)
    assert evaluation.original is None
    # Encryption costs a tiny fraction of the outputs (about 150 on average).
    assert evaluation.encrypted.max_abs_error < 0.5
    assert set(evaluation.encrypted.metrics) == {"mse", "mae", "r2"}
    lines = evaluation.lines()
    assert lines[2].startswith("polynomial: MSE ") and ", R^2 " in lines[2]
    assert lines[3].startswith("encrypted: MSE ") and "on 6 samples (seed 0)" in lines[3]
    assert lines[4].startswith("encrypted vs polynomial: max |error| ")


def test_cli_converts_and_evaluates_a_regression_model(
    diabetes: dict[str, np.ndarray],
    trained: nn.Sequential,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "diabetes_net.py").write_text(MLP_SOURCE)
    monkeypatch.chdir(tmp_path)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "x.npy", diabetes["x_train"])
    np.save(tmp_path / "x_test.npy", diabetes["x_test"])
    np.save(tmp_path / "y_test.npy", diabetes["y_test"])
    argv = ["convert", "diabetes_net:make", "--weights", "w.pt", "--calibration", "x.npy"]
    argv += ["--name", "diabetes", "--out", "out", "--degree", "2", "--standardize"]
    assert main([*argv, "--task", "regression", "--labels", "progression"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "out" / "diabetes" / "manifest.json").read_text())
    assert manifest["output"] == {"labels": ["progression"], "task": "regression"}
    np.testing.assert_array_equal(
        manifest["input"]["preprocessing"]["mean"], diabetes["x_train"].mean(axis=0)
    )
    evaluate = ["evaluate", "diabetes", "--models-dir", "out", "--samples", "3"]
    assert main([*evaluate, "--data", "x_test.npy", "--targets", "y_test.npy"]) == 0
    out = capsys.readouterr().out
    assert "plaintext (original network): n/a (not recorded)" in out
    assert "polynomial: MSE " in out and "encrypted: MSE " in out and "on 3 samples" in out
    assert "accuracy" not in out


def test_export_writes_the_task_only_for_regression(tmp_path: Path, trained: nn.Sequential) -> None:
    network, _ = convert(trained, np.random.default_rng(0).normal(size=(32, 10)), degrees=2)
    x = np.zeros((1, 10))
    export_converted(network, tmp_path, "net", labels=["y"], preprocessing={}, check_x=x)
    manifest = json.loads((tmp_path / "net" / "manifest.json").read_text())
    assert "task" not in manifest["output"]  # the default keeps format-1 manifests as they were
    assert load_artifact(tmp_path / "net").task == "classification"
    with pytest.raises(ValueError, match="task must be one of"):
        export_converted(
            network, tmp_path, "net", labels=["y"], preprocessing={}, check_x=x, task="ranking"
        )
