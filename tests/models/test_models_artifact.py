"""The shipped ``models/artifacts/mnist-cnn`` artifact: integrity, accuracy, reproducibility."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.architectures import MnistCNN
from models.cli import main
from models.datasets import Split, load_mnist_split
from models.recipes import DEFAULT_OUT_DIR

SHIPPED = DEFAULT_OUT_DIR / "mnist-cnn"


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return json.loads((SHIPPED / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    with np.load(SHIPPED / "weights.npz", allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="module")
def split(manifest: dict[str, Any]) -> Split:
    return load_mnist_split(manifest["training"]["split_seed"])


@pytest.fixture(scope="module")
def retrained(manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Retrain once, through the CLI, with the seeds the shipped manifest records."""
    out = tmp_path_factory.mktemp("retrained")
    training = manifest["training"]
    argv = ["train", "mnist-cnn", "--out", str(out), "--seed", str(training["seed"])]
    argv += ["--split-seed", str(training["split_seed"])]
    assert main(argv) == 0
    return out / "mnist-cnn"


def _preprocess(images: np.ndarray, manifest: dict[str, Any]) -> np.ndarray:
    spec = manifest["input"]["preprocessing"]
    mean = np.asarray(spec["mean"], dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float64).reshape(1, -1, 1, 1)
    return (images.astype(np.float64) * spec["scale"] - mean) / std


def _torch_model(weights: dict[str, np.ndarray]) -> MnistCNN:
    model = MnistCNN().to(torch.float64).eval()
    model.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
    return model


def _run_manifest_layers(
    x: np.ndarray, manifest: dict[str, Any], weights: dict[str, np.ndarray]
) -> np.ndarray:
    """Evaluate one preprocessed input by reading the manifest literally, in numpy."""
    for layer in manifest["layers"]:
        kind = layer["kind"]
        if kind == "conv2d":
            kernel, bias = weights[layer["weight"]], weights[layer["bias"]]
            (ph, pw), (sh, sw) = layer["padding"], layer["stride"]
            padded = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
            windows = np.lib.stride_tricks.sliding_window_view(
                padded, kernel.shape[2:], axis=(1, 2)
            )[:, ::sh, ::sw]
            x = np.einsum("chwij,ocij->ohw", windows, kernel) + bias[:, None, None]
        elif kind == "poly":
            x = sum(c * x**i for i, c in enumerate(layer["coeffs"]))
        elif kind == "flatten":
            x = x.reshape(-1)
        elif kind == "linear":
            x = weights[layer["weight"]] @ x + weights[layer["bias"]]
        else:
            raise AssertionError(f"unexpected layer kind {kind}")
    return x


def test_manifest_sha256_matches_weights_file(manifest: dict[str, Any]) -> None:
    assert manifest["weights"]["file"] == "weights.npz"
    digest = hashlib.sha256((SHIPPED / "weights.npz").read_bytes()).hexdigest()
    assert manifest["weights"]["sha256"] == digest


def test_manifest_follows_the_contract(manifest: dict[str, Any]) -> None:
    expected_layers = [
        {
            "kind": "conv2d",
            "weight": "conv1.weight",
            "bias": "conv1.bias",
            "stride": [3, 3],
            "padding": [0, 0],
        },
        {"kind": "poly", "coeffs": [0.0, 0.0, 1.0]},
        {"kind": "flatten"},
        {"kind": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
        {"kind": "poly", "coeffs": [0.0, 0.0, 1.0]},
        {"kind": "linear", "weight": "fc2.weight", "bias": "fc2.bias"},
    ]
    assert manifest["format"] == "he-inference-model"
    assert manifest["format_version"] == 1
    assert manifest["name"] == "mnist-cnn"
    assert manifest["input"] == {
        "shape": [1, 28, 28],
        "preprocessing": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]},
    }
    assert manifest["layers"] == expected_layers
    assert manifest["output"] == {"labels": [str(d) for d in range(10)]}
    assert manifest["training"]["n_train"] == 4000
    assert manifest["training"]["n_test"] == 1000
    raw = (SHIPPED / "manifest.json").read_bytes()
    assert raw == (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()


def test_weights_have_the_promised_names_shapes_and_dtype(
    weights: dict[str, np.ndarray],
) -> None:
    shapes = {key: value.shape for key, value in weights.items()}
    assert shapes == {
        "conv1.weight": (4, 1, 7, 7),
        "conv1.bias": (4,),
        "fc1.weight": (64, 256),
        "fc1.bias": (64,),
        "fc2.weight": (10, 64),
        "fc2.bias": (10,),
    }
    assert all(v.dtype == np.float64 and v.flags.c_contiguous for v in weights.values())


def test_server_loader_accepts_the_shipped_artifact() -> None:
    from he_service.artifacts import load_artifact

    artifact = load_artifact(SHIPPED)
    assert artifact.layer_shapes()[-1] == (10,)


def test_held_out_accuracy_matches_manifest(
    manifest: dict[str, Any], weights: dict[str, np.ndarray], split: Split
) -> None:
    model = _torch_model(weights)
    with torch.no_grad():
        logits = model(torch.from_numpy(_preprocess(split.x_test, manifest)))
    accuracy = int((logits.argmax(dim=1).numpy() == split.y_test).sum()) / len(split.y_test)
    assert accuracy == manifest["training"]["test_accuracy"]
    assert accuracy >= 0.93


def test_manifest_layers_mean_what_torch_computes(
    manifest: dict[str, Any], weights: dict[str, np.ndarray], split: Split
) -> None:
    # Guards the semantics the server relies on: flatten order, poly coefficient order, stride.
    x = _preprocess(split.x_test[:5], manifest)
    with torch.no_grad():
        expected = _torch_model(weights)(torch.from_numpy(x)).numpy()
    got = np.stack([_run_manifest_layers(image, manifest, weights) for image in x])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_retraining_reproduces_the_shipped_bytes(retrained: Path) -> None:
    for file_name in ("weights.npz", "manifest.json"):
        shipped = hashlib.sha256((SHIPPED / file_name).read_bytes()).hexdigest()
        rebuilt = hashlib.sha256((retrained / file_name).read_bytes()).hexdigest()
        assert rebuilt == shipped, (
            f"{file_name} differs after retraining; if torch or the CPU changed, "
            "bit-for-bit reproduction is not expected (see models/training.py)"
        )
