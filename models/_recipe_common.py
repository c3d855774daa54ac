"""What every kind of recipe shares: its result, its command line, its encrypted measurement."""

from __future__ import annotations

import enum
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from he_service.artifacts import load_artifact
from he_service.engine import compile_plan
from models.conversion import ConversionReport, ConvertedNetwork
from models.datasets import Split
from models.evaluation import measure_encrypted
from models.export import export_artifact, torch_release
from models.packaging import converted_manifest
from models.privacy import PrivacyBudget, PrivateTraining
from models.training import (
    MNIST_MEAN,
    MNIST_STD,
    PIXEL_SCALE,
    deterministic_torch,
    preprocess_batch,
)

__all__ = [
    "RECIPE_PRIVACY",
    "Privacy",
    "RecipePrivacy",
    "TrainedModel",
    "command",
    "measured",
    "mnist_constants",
    "package",
    "standardisation",
    "train_and_measure",
    "training_record",
]


class RecipePrivacy(enum.Enum):
    """The privacy a recipe trains with when the caller names none: its own default."""

    DEFAULT = "the recipe's default"


RECIPE_PRIVACY = RecipePrivacy.DEFAULT
# A budget (DP-SGD), None (no differential privacy) or the recipe's own default.
Privacy = PrivacyBudget | None | RecipePrivacy


@dataclass(frozen=True)
class TrainedModel:
    """Output of a recipe: the network, its weights, the manifest without ``weights``, metrics.

    ``network`` is the fine-tuned polynomial network; ``test_accuracy`` is its held-out
    accuracy; ``summary`` holds the numbers ``he-models train`` prints. After ``prepare`` the
    manifest and summary lack the encrypted measurement, which ``train`` adds.
    """

    network: ConvertedNetwork
    arrays: dict[str, np.ndarray]
    manifest: dict[str, Any]
    test_accuracy: float
    train_seconds: float
    summary: dict[str, Any]


def command(name: str, seed: int, split_seed: int, privacy: PrivacyBudget | None) -> str:
    """Return the ``he-models train`` command that rebuilds a model, for its provenance.

    A secret noise seed is not part of it: such a run cannot be repeated.
    """
    parts = ["he-models", "train", name]
    if seed != 0:
        parts += ["--seed", str(seed)]
    if split_seed != 0:
        parts += ["--split-seed", str(split_seed)]
    if privacy is not None:
        parts += ["--dp-epsilon", f"{privacy.epsilon:g}", "--dp-delta", f"{privacy.delta:g}"]
        parts += ["--max-grad-norm", f"{privacy.max_grad_norm:g}"]
        if privacy.noise_seed is not None:
            parts += ["--dp-noise-seed", str(privacy.noise_seed)]
    return " ".join(parts)


class _Described(Protocol):
    """What packaging a trained network needs to know of its recipe."""

    @property
    def name(self) -> str: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def description(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def split_description(self) -> str: ...


def training_record(
    recipe: _Described, split: Split, seed: int, split_seed: int, **run: Any
) -> dict[str, Any]:
    """Return the manifest's ``training`` section as every recipe starts it, plus ``run``."""
    return {
        "dataset": recipe.dataset,
        "split": recipe.split_description,
        "split_seed": split_seed,
        "seed": seed,
        "n_train": split.n_train,
        "n_test": split.n_test,
        **run,
    }


def package(
    recipe: _Described,
    network: ConvertedNetwork,
    *,
    seed: int,
    split_seed: int,
    privacy: Privacy,
    budget: PrivacyBudget | None,
    session: PrivateTraining | None,
    outside_guarantee: Sequence[str],
    preprocessing: dict[str, Any],
    report: ConversionReport,
    output_bound: dict[str, Any],
    training: dict[str, Any],
    key_budget_bytes: int | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any] | None]:
    """Build a trained network's manifest and arrays, and its privacy section (if DP-SGD ran).

    Args:
        recipe: the recipe that trained it.
        network: the polynomial network.
        seed, split_seed: the run's seeds.
        privacy: what the caller asked for (the recipe's default is not repeated in the
            provenance command).
        budget: the budget the run used, or None.
        session: the run's DP-SGD accounting, or None.
        outside_guarantee: what touched data outside DP-SGD, and why that is not private.
        preprocessing, report, output_bound, training, key_budget_bytes: the manifest's.
    """
    section = None
    if session is not None:
        section = session.section(
            dataset=f"{recipe.dataset}, training split ({recipe.split_description})",
            outside_guarantee=outside_guarantee,
        )
    named = None if privacy is RECIPE_PRIVACY else budget
    manifest, arrays = converted_manifest(
        network,
        recipe.name,
        labels=recipe.labels,
        preprocessing=preprocessing,
        description=recipe.description,
        report=report,
        output_bound=output_bound,
        training=training,
        provenance={
            "command": command(recipe.name, seed, split_seed, named),
            "torch": torch_release(),
        },
        key_budget_bytes=key_budget_bytes,
        privacy=section,
    )
    return manifest, arrays, section


def standardisation(records: np.ndarray) -> dict[str, Any]:
    """Return per-feature standardisation (the client applies it) with ``records``' statistics."""
    features = np.asarray(records, dtype=np.float64)
    return {
        "scale": 1.0,
        "mean": [float(v) for v in features.mean(axis=0)],
        "std": [float(v) for v in features.std(axis=0)],
    }


def mnist_constants(_: np.ndarray) -> dict[str, Any]:
    """Return MNIST's customary constants: public, computed from no record of the split."""
    return {"scale": PIXEL_SCALE, "mean": list(MNIST_MEAN), "std": list(MNIST_STD)}


def measured(
    trained: TrainedModel,
    name: str,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    samples: int | None,
    seed: int,
) -> TrainedModel:
    """Add the encrypted measurement on the first ``samples`` held-out samples (None: all).

    Args:
        trained: a prepared model (manifest without the measurement).
        name: the artifact name.
        x_test: preprocessed held-out samples.
        y_test: their labels.
        samples: how many to encrypt; None for all.
        seed: SEAL's seed.

    Returns:
        The model with the measurement in its manifest's ``training`` section and summary.
    """
    started = time.perf_counter()
    # The engine reads artifacts from disk; stage one privately (it is checked and compiled
    # there, as the final export will be).
    with tempfile.TemporaryDirectory() as tmp:
        staged = export_artifact(tmp, name, trained.arrays, trained.manifest)
        artifact = load_artifact(staged.path)
        plan = compile_plan(artifact)
        n = len(x_test) if samples is None else samples
        with deterministic_torch(0):
            measurement = measure_encrypted(artifact, x_test[:n], y_test[:n], seed=seed, plan=plan)
    manifest = {**trained.manifest, "training": {**trained.manifest["training"]}}
    manifest["training"].update(measurement.to_json())
    summary = {
        **trained.summary,
        "encrypted_accuracy": measurement.metrics["accuracy"],
        "encrypted_agreement": measurement.metrics["agreement"],
        "encrypted_samples": measurement.samples,
        "encrypted_seconds": time.perf_counter() - started,
    }
    return replace(trained, manifest=manifest, summary=summary)


class _Preparable(Protocol):
    """What ``train_and_measure`` needs of a recipe."""

    @property
    def name(self) -> str: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...
    @property
    def encrypted_samples(self) -> int | None: ...
    @property
    def encrypted_seed(self) -> int: ...
    @property
    def load_split(self) -> Callable[[int], Split]: ...

    def prepare(self, seed: int, split_seed: int, privacy: Privacy = ...) -> TrainedModel: ...


def train_and_measure(
    recipe: _Preparable, seed: int, split_seed: int, privacy: Privacy = RECIPE_PRIVACY
) -> TrainedModel:
    """Run a recipe's ``prepare``, then measure it encrypted on its held-out split.

    Args:
        recipe: a recipe (converted or private).
        seed: the training seed.
        split_seed: the split's seed.
        privacy: a budget, None, or the recipe's default.

    Returns:
        The model with the encrypted measurement in its manifest and summary.
    """
    trained = recipe.prepare(seed, split_seed, privacy)
    split = recipe.load_split(split_seed)
    x_test = preprocess_batch(
        split.x_test, trained.manifest["input"]["preprocessing"], recipe.input_shape
    )
    return measured(
        trained,
        recipe.name,
        x_test,
        split.y_test,
        samples=recipe.encrypted_samples,
        seed=recipe.encrypted_seed,
    )
