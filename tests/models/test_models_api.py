"""The public API of ``models`` and the in-process encrypted measurement."""

from __future__ import annotations

import numpy as np

import models
from he_service.artifacts import load_artifact
from models.evaluation import encrypted_outputs
from models.recipes import DEFAULT_OUT_DIR, RECIPES
from models.training import preprocess_batch


def test_public_api_is_pinned() -> None:
    assert sorted(models.__all__) == sorted(
        [
            "DEFAULT_OUT_DIR",
            "OUTPUT_LIMIT",
            "RECIPES",
            "ActivationReport",
            "ArtifactEvaluation",
            "BreastCancerMLP",
            "ConversionError",
            "ConversionReport",
            "ConvertedNetwork",
            "DigitsCNN",
            "DigitsResNet",
            "EncryptedMeasurement",
            "ExportError",
            "FineTuneConfig",
            "LeNet5",
            "MnistReluCNN",
            "OutputRangeError",
            "PolyActivation",
            "PolyFit",
            "Problem",
            "Residual",
            "Split",
            "Square",
            "TrainConfig",
            "artifact_forward",
            "build",
            "check_output_bound",
            "classifier_accuracy",
            "convert",
            "converted_manifest",
            "depth_of",
            "encrypted_outputs",
            "evaluate_artifact",
            "export_artifact",
            "export_converted",
            "fine_tune",
            "fit_polynomial",
            "get_recipe",
            "load_breast_cancer_split",
            "load_digits_split",
            "load_mnist_idx",
            "load_mnist_split",
            "measure_encrypted",
            "network_layers",
            "out_of_range_fractions",
            "preprocess_batch",
            "validate",
        ]
    )
    for name in models.__all__:
        assert hasattr(models, name), name


def test_worker_processes_give_the_in_process_results() -> None:
    artifact = load_artifact(DEFAULT_OUT_DIR / "breast-cancer-mlp")
    split = RECIPES["breast-cancer-mlp"].load_split(0)
    x = preprocess_batch(split.x_test[:4], artifact.preprocessing, artifact.input_shape)
    parallel = encrypted_outputs(artifact, x, seed=3, workers=2)
    serial = encrypted_outputs(artifact, x, seed=3, workers=1)
    assert parallel.shape == (4, 2)
    np.testing.assert_array_equal(parallel, serial)
