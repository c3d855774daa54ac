"""Train CKKS-friendly networks, convert torch networks, and export artifacts for ``he_service``.

This package needs torch (the ``train`` extra) and is never imported by the server, which only
reads the exported ``manifest.json`` + ``weights.npz``.

Converting your own network::

    from models import convert, export_converted, fine_tune, validate

    problems = validate(model, (1, 28, 28))        # every unsupported layer, with a fix
    network, report = convert(model, x_train, degrees=2)   # raises ConversionError
    network = fine_tune(network, x_train, y_train)  # optional: recover accuracy
    print("\\n".join(report.lines()), network.depth)
    export_converted(network, "models/artifacts", "my-net", labels=[...],
                     preprocessing={"scale": 1.0, "mean": [0.0], "std": [1.0]},
                     check_x=x_train)

Residual blocks (``x + f(x)``, a ResNet ``BasicBlock``) convert to ``Residual`` modules and
``add`` layers. For a regression head pass ``task="regression"`` to ``fine_tune`` (MSE) and
``export_converted`` (``output.task`` in the manifest; labels name the outputs).
"""

from __future__ import annotations

from models.architectures import (
    BreastCancerMLP,
    DigitsCNN,
    DigitsResNet,
    LeNet5,
    MnistReluCNN,
    Square,
)
from models.conversion import (
    ActivationReport,
    ConversionReport,
    ConvertedNetwork,
    Residual,
    convert,
    depth_of,
    validate,
)
from models.datasets import (
    Split,
    load_breast_cancer_split,
    load_digits_split,
    load_mnist_idx,
    load_mnist_split,
)
from models.evaluation import (
    ArtifactEvaluation,
    EncryptedMeasurement,
    artifact_forward,
    encrypted_outputs,
    evaluate_artifact,
    measure_encrypted,
)
from models.export import ExportError, export_artifact
from models.finetune import FineTuneConfig, fine_tune, out_of_range_fractions
from models.packaging import (
    OUTPUT_LIMIT,
    OutputRangeError,
    check_output_bound,
    converted_manifest,
    export_converted,
    network_layers,
)
from models.polynomial import PolyActivation, PolyFit, fit_polynomial
from models.problems import ConversionError, Problem
from models.recipes import DEFAULT_OUT_DIR, RECIPES, build, get_recipe
from models.training import (
    TrainConfig,
    classifier_accuracy,
    preprocess_batch,
)

__all__ = [
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
