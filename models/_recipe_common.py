"""What every kind of recipe shares: its result, its command line, its encrypted measurement."""

from __future__ import annotations

import enum
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from he_service.artifacts import load_artifact
from he_service.engine import compile_plan
from models.conversion import ConvertedNetwork
from models.datasets import Split
from models.evaluation import measure_encrypted
from models.export import export_artifact
from models.privacy import PrivacyBudget
from models.training import deterministic_torch, preprocess_batch

__all__ = [
    "RECIPE_PRIVACY",
    "Privacy",
    "RecipePrivacy",
    "TrainedModel",
    "command",
    "measured",
    "train_and_measure",
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
