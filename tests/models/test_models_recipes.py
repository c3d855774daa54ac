"""The newer recipes' networks, and the residual one's plaintext training."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from he_service.artifacts import load_artifact
from he_service.engine import forward_plain
from models import convert
from models.architectures import DigitsResNet, LeNet5
from models.evaluation import artifact_forward
from models.export import manifest_bytes, npz_bytes
from models.recipes import RECIPES
from models.training import preprocess_batch


def test_lenet5_converts_to_depth_4_with_pooling_folded() -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 1, 28, 28))
    network, report = convert(LeNet5().eval(), x, degrees=2)
    kinds = [type(m).__name__ for m in network]
    assert kinds == [
        "Conv2d",
        "PolyActivation",
        "PoolConv2d",
        "Conv2d",
        "PolyActivation",
        "PoolConv2d",
        "Flatten",
        "Linear",
        "PolyActivation",
        "Linear",
        "PolyActivation",
        "Linear",
    ]
    assert network.depth == report.depth == 4
    assert [c.new for c in report.changes if c.path.startswith("bn")] == [
        "folded into conv1",
        "folded into conv2",
    ]


def test_digits_resnet_converts_its_block_to_an_add_layer() -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(16, 1, 8, 8))
    network, _ = convert(DigitsResNet().eval(), x, degrees=2)
    assert [type(m).__name__ for m in network] == [
        "Conv2d",
        "PolyActivation",
        "PoolConv2d",
        "Residual",
        "PolyActivation",
        "PoolConv2d",
        "Flatten",
        "Linear",
    ]
    assert network.depth == 3
    assert network.paths[3] == "block.add"


@pytest.mark.slow
def test_digits_resnet_trains_within_the_accuracy_bar(tmp_path: Path) -> None:
    recipe = RECIPES["digits-resnet"]
    trained = recipe.prepare(0, 0)
    summary = trained.summary
    assert summary["original_accuracy"] - summary["poly_accuracy"] <= 0.015
    assert summary["depth"] == 3
    assert "encrypted_accuracy" not in trained.manifest["training"]
    manifest = trained.manifest
    assert manifest["format_version"] == 2
    # The artifact the recipe will export computes the fine-tuned network.
    directory = tmp_path / "digits-resnet"
    directory.mkdir()
    weights = npz_bytes(trained.arrays)
    (directory / "weights.npz").write_bytes(weights)
    sha = hashlib.sha256(weights).hexdigest()
    full = {**manifest, "weights": {"file": "weights.npz", "sha256": sha}}
    (directory / "manifest.json").write_bytes(manifest_bytes(full))
    artifact = load_artifact(directory)
    split = recipe.load_split(0)
    x = preprocess_batch(split.x_test, artifact.preprocessing, artifact.input_shape)
    outputs, _ = artifact_forward(artifact, x)
    assert float(np.mean(outputs.argmax(axis=1) == split.y_test)) == summary["poly_accuracy"]
    with torch.no_grad():
        expected = trained.network(torch.tensor(x[:3])).numpy()
    for sample, row in zip(x[:3], expected, strict=True):
        np.testing.assert_allclose(forward_plain(artifact, sample), row, rtol=1e-9, atol=1e-9)
