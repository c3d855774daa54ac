"""Train CKKS-friendly networks and export them as artifacts for ``he_service``.

This package needs torch (the ``train`` extra) and is never imported by the server, which only
reads the exported ``manifest.json`` + ``weights.npz``.
"""

from __future__ import annotations

from models.architectures import MnistCNN, Square
from models.datasets import Split, load_mnist_idx, load_mnist_split
from models.export import export_artifact
from models.recipes import DEFAULT_OUT_DIR, RECIPES, build, get_recipe
from models.training import TrainConfig, accuracy, preprocess, train_mnist_cnn

__all__ = [
    "DEFAULT_OUT_DIR",
    "RECIPES",
    "MnistCNN",
    "Split",
    "Square",
    "TrainConfig",
    "accuracy",
    "build",
    "export_artifact",
    "get_recipe",
    "load_mnist_idx",
    "load_mnist_split",
    "preprocess",
    "train_mnist_cnn",
]
