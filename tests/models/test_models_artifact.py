"""The shipped artifacts: integrity, the accuracy bars, and bit-for-bit reproduction."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from he_service.artifacts import ModelArtifact, load_artifact
from he_service.engine import compile_plan, forward_plain
from he_service.protocol import preprocess
from models.datasets import Split
from models.evaluation import artifact_forward
from models.polynomial import relu_square
from models.recipes import DEFAULT_OUT_DIR, RECIPES
from models.training import preprocess_batch

# The recipes whose artifacts ship in models/artifacts/.
NAMES = sorted(name for name, recipe in RECIPES.items() if recipe.shipped)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return {
        name: json.loads((DEFAULT_OUT_DIR / name / "manifest.json").read_text(encoding="utf-8"))
        for name in NAMES
    }


@pytest.fixture(scope="module")
def artifacts() -> dict[str, ModelArtifact]:
    return {name: load_artifact(DEFAULT_OUT_DIR / name) for name in NAMES}


@pytest.fixture(scope="module")
def splits(manifests: dict[str, dict[str, Any]]) -> dict[str, Split]:
    return {
        name: RECIPES[name].load_split(manifests[name]["training"]["split_seed"]) for name in NAMES
    }


@pytest.fixture(scope="module")
def retrained(
    manifests: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Retrain every recipe once, through the CLI, with the seeds its manifest records.

    Each recipe trains on one thread, so two run at once (the longest first) on separate
    processes: the retraining is the longest part of the suite.
    """
    out = tmp_path_factory.mktemp("retrained")
    commands = []
    for name in sorted(NAMES, key=lambda n: -_RETRAIN_SECONDS.get(n, 0)):
        training = manifests[name]["training"]
        argv = ["train", name, "--out", str(out), "--seed", str(training["seed"])]
        commands.append([*argv, "--split-seed", str(training["split_seed"])])
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(_he_models, commands))
    for argv, run in zip(commands, runs, strict=True):
        assert run.returncode == 0, f"he-models {' '.join(argv)}: {run.stderr[-2000:]}"
    return out


# Seconds each recipe took to retrain on two shared cores, to start the longest first.
_RETRAIN_SECONDS = {"mnist-lenet5": 170, "digits-resnet": 60}


def _he_models(argv: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "models.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_every_shipped_recipe_has_its_artifact() -> None:
    assert {"mnist-cnn", "digits-cnn", "breast-cancer-mlp"} <= set(NAMES)
    assert NAMES == sorted(path.name for path in DEFAULT_OUT_DIR.iterdir() if path.is_dir())
    for name in NAMES:
        assert sorted(p.name for p in (DEFAULT_OUT_DIR / name).iterdir()) == [
            "manifest.json",
            "weights.npz",
        ]


@pytest.mark.parametrize("name", NAMES)
def test_manifest_sha256_matches_weights_file(
    name: str, manifests: dict[str, dict[str, Any]]
) -> None:
    manifest = manifests[name]
    assert manifest["weights"]["file"] == "weights.npz"
    digest = hashlib.sha256((DEFAULT_OUT_DIR / name / "weights.npz").read_bytes()).hexdigest()
    assert manifest["weights"]["sha256"] == digest
    raw = (DEFAULT_OUT_DIR / name / "manifest.json").read_bytes()
    assert raw == (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()


@pytest.mark.parametrize("name", NAMES)
def test_manifest_records_the_measurements(
    name: str, manifests: dict[str, dict[str, Any]], splits: dict[str, Split]
) -> None:
    training = manifests[name]["training"]
    for key in ("dataset", "split", "seed", "split_seed", "n_train", "n_test"):
        assert key in training
    assert training["n_test"] == splits[name].n_test
    assert training["encrypted_seed"] == 0
    # The recipe's count of held-out samples, or all of them when there are fewer.
    samples = RECIPES[name].encrypted_samples or splits[name].n_test
    assert training["encrypted_samples"] == min(samples, splits[name].n_test)
    assert training["encrypted_agreement"] >= 0.99
    assert training["accuracy_drop"] == pytest.approx(
        training["original_accuracy"] - training["poly_accuracy"]
    )
    assert training["max_abs_output"] < 2048
    if name == "mnist-cnn":
        assert training["poly_accuracy"] >= 0.93
    else:
        assert training["original_accuracy"] - training["poly_accuracy"] <= 0.02
    conversion = manifests[name]["conversion"]
    assert conversion["depth"] <= 5
    if RECIPES[name].default_privacy is None:
        assert {a["degree"] for a in conversion["activations"]} == {2}
        assert all(a["replaces"] == "ReLU()" for a in conversion["activations"])
    else:
        # DP models are trained with fixed polynomials: nothing is fitted on private records,
        # so every activation is kept as trained (the same polynomial of ReLU on [-4, 4]).
        changes = {c["path"]: c["to"] for c in conversion["changes"]}
        for activation in conversion["activations"]:
            assert "replaces" not in activation and changes[activation["path"]] == "poly (kept)"
            assert activation["coeffs"] == list(relu_square(4.0).coeffs)
            assert activation["range"] == [-4.0, 4.0]
        assert training["original_accuracy"] == training["poly_accuracy"]


@pytest.mark.parametrize("name", NAMES)
def test_server_compiles_it_in_the_smallest_ring_for_its_depth(
    name: str, artifacts: dict[str, ModelArtifact], manifests: dict[str, dict[str, Any]]
) -> None:
    plan = compile_plan(artifacts[name])
    depth = manifests[name]["conversion"]["depth"]
    # Two levels fit N=8192; LeNet-5's four need N=16384 (218 bits cannot hold five primes).
    assert plan.params.poly_modulus_degree == (8192 if depth <= 2 else 16384)
    assert plan.params_reason["depth"] == depth
    costs = plan.costs()
    assert costs["public_key_bytes"] <= artifacts[name].manifest.get("serving", {}).get(
        "key_budget_bytes", 96 << 20
    )
    assert costs["request_bytes_per_sample"] <= 1 << 20  # one sample, at most 1 MiB


@pytest.mark.parametrize("name", NAMES)
def test_poly_accuracy_matches_manifest(
    name: str,
    artifacts: dict[str, ModelArtifact],
    manifests: dict[str, dict[str, Any]],
    splits: dict[str, Split],
) -> None:
    artifact, split = artifacts[name], splits[name]
    x = preprocess_batch(split.x_test, artifact.preprocessing, artifact.input_shape)
    outputs, _ = artifact_forward(artifact, x)
    accuracy = float(np.mean(outputs.argmax(axis=1) == split.y_test))
    assert accuracy == manifests[name]["training"]["poly_accuracy"]
    # The batched forward used for the numbers is the server's plaintext reference.
    for i in range(3):
        sample = preprocess(split.x_test[i], artifact.preprocessing, artifact.input_shape)
        np.testing.assert_allclose(
            forward_plain(artifact, sample), outputs[i], rtol=1e-10, atol=1e-10
        )


def test_mnist_keeps_its_interface(manifests: dict[str, dict[str, Any]]) -> None:
    manifest = manifests["mnist-cnn"]
    assert manifest["input"] == {
        "shape": [1, 28, 28],
        "preprocessing": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
    }
    assert manifest["output"] == {"labels": [str(d) for d in range(10)]}
    kinds = [layer["kind"] for layer in manifest["layers"]]
    assert kinds == ["conv2d", "poly", "flatten", "linear", "poly", "linear"]
    assert manifest["layers"][0]["stride"] == [3, 3]
    assert manifest["training"]["n_train"] == 4000
    assert manifest["training"]["n_test"] == 1000


def test_breast_cancer_preprocessing_uses_training_statistics(
    manifests: dict[str, dict[str, Any]], splits: dict[str, Split]
) -> None:
    spec = manifests["breast-cancer-mlp"]["input"]["preprocessing"]
    train = splits["breast-cancer-mlp"].x_train
    np.testing.assert_array_equal(spec["mean"], train.mean(axis=0))
    np.testing.assert_array_equal(spec["std"], train.std(axis=0))
    assert manifests["breast-cancer-mlp"]["output"]["labels"] == ["malignant", "benign"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_retraining_reproduces_the_shipped_bytes(name: str, retrained: Path) -> None:
    for file_name in ("weights.npz", "manifest.json"):
        shipped = hashlib.sha256((DEFAULT_OUT_DIR / name / file_name).read_bytes()).hexdigest()
        rebuilt = hashlib.sha256((retrained / name / file_name).read_bytes()).hexdigest()
        assert rebuilt == shipped, (
            f"{name}/{file_name} differs after retraining; if torch, the CPU or the engine "
            "(encrypted numbers in the manifest) changed, bit-for-bit reproduction is not "
            "expected (see models/training.py)"
        )


@pytest.mark.parametrize("name", NAMES)
def test_output_ranges_hold_the_held_out_outputs(
    name: str, artifacts: dict[str, ModelArtifact], splits: dict[str, Split]
) -> None:
    """The ranges the client flags unreliable outputs by contain every held-out output."""
    artifact, split = artifacts[name], splits[name]
    bound = artifact.manifest["conversion"]["output_bound"]
    ranges = np.asarray(bound["output_ranges"])
    x = preprocess_batch(split.x_test, artifact.preprocessing, artifact.input_shape)
    outputs, _ = artifact_forward(artifact, x)
    assert ranges.shape == (outputs.shape[1], 2)
    assert np.all(outputs >= ranges[:, 0]) and np.all(outputs <= ranges[:, 1])
    # Widened by the margin, but not so much that a wildly wrong output would pass: at most
    # the margin beyond the outputs of every sample the recipe saw.
    x_all = preprocess_batch(
        np.concatenate([split.x_train, split.x_test]), artifact.preprocessing, artifact.input_shape
    )
    every, _ = artifact_forward(artifact, x_all)
    spread = np.maximum(every.max(axis=0) - every.min(axis=0), 1.0)
    widths = ranges[:, 1] - ranges[:, 0]
    assert np.all(widths <= (1 + 2 * bound["range_margin"]) * spread * (1 + 1e-5))
