"""Measure an exported artifact: plaintext polynomial metrics and encrypted agreement.

Everything here reads the artifact only (not the torch network it came from), so it measures
exactly what the server serves: ``artifact_forward`` runs the manifest's layers in float64
(batched; the same arithmetic as ``he_service.engine.forward_plain``), and
``encrypted_outputs`` encrypts, evaluates and decrypts with the engine in-process. The metrics
follow the artifact's task: accuracy and argmax agreement for classification, MSE, MAE and R^2
for regression; both report the largest encrypted-vs-plaintext output error, and how many
samples the client SDK would flag as outside the calibrated output ranges.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import he_service
from he_service.artifacts import (
    Add,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    ModelArtifact,
    Poly,
    load_artifact,
)
from he_service.engine import compile_plan, selfcheck
from he_service.engine.plan import Plan
from he_service.protocol import OutputRanges, read_output_ranges, rows_out_of_range
from models.conversion import Position, position_of
from models.training import preprocess_batch, task_metrics, to_tensor

__all__ = [
    "ENCRYPTION_CHUNKS",
    "ArtifactEvaluation",
    "EncryptedMeasurement",
    "artifact_forward",
    "encrypted_outputs",
    "evaluate_artifact",
    "measure_encrypted",
]

# Samples are encrypted in this many fixed chunks (one SEAL key set each, from the same seed),
# run in parallel processes when there are cores; the chunking, not the core count, fixes the
# noise, so results are the same on any machine.
ENCRYPTION_CHUNKS = 2
_WORKER = Path(__file__).resolve().parent / "_encrypt_worker.py"


def artifact_forward(
    artifact: ModelArtifact, x: np.ndarray, *, capture: bool = False
) -> tuple[np.ndarray, dict[Position, np.ndarray]]:
    """Run the artifact's layers on a batch of preprocessed inputs, in float64.

    Args:
        artifact: a checked artifact.
        x: preprocessed inputs ``(n, *input_shape)``.
        capture: also return each ``poly`` layer's inputs.

    Returns:
        The outputs ``(n, outputs)`` and, if ``capture``, ``{position: inputs}`` with the
        positions of ``models.conversion.Position`` (``(index,)``, or ``(index, branch,
        index, ...)`` inside residual branches).
    """
    value = to_tensor(x, torch.float64).reshape((-1, *artifact.input_shape))
    captured: dict[Position, np.ndarray] = {}
    with torch.no_grad():
        value = _forward(artifact.layers, value, (), captured if capture else None)
    return value.numpy(), captured


def _forward(
    layers: tuple[Layer, ...],
    value: torch.Tensor,
    prefix: Position,
    captured: dict[Position, np.ndarray] | None,
) -> torch.Tensor:
    for index, layer in enumerate(layers):
        position = (*prefix, index)
        if isinstance(layer, Conv2d):
            value = F.conv2d(
                value,
                torch.from_numpy(layer.weight),
                torch.from_numpy(layer.bias),
                stride=layer.stride,
                padding=layer.padding,
            )
        elif isinstance(layer, Linear):
            value = value @ torch.from_numpy(layer.weight).T + torch.from_numpy(layer.bias)
        elif isinstance(layer, Flatten):
            value = value.reshape(value.shape[0], -1)
        elif isinstance(layer, Poly):
            if captured is not None:
                captured[position] = value.numpy().copy()
            result = torch.full_like(value, layer.coeffs[-1])
            for c in reversed(layer.coeffs[:-1]):
                result = result * value + c
            value = result
        elif isinstance(layer, Add):
            outputs = [
                _forward(branch, value, (*position, number), captured)
                for number, branch in enumerate(layer.branches)
            ]
            value = outputs[0]
            for output in outputs[1:]:
                value = value + output
    return value


def _chunks(samples: np.ndarray, count: int) -> list[np.ndarray]:
    return [chunk for chunk in np.array_split(samples, count) if len(chunk)]


def encrypted_outputs(
    artifact: ModelArtifact,
    samples: np.ndarray,
    *,
    seed: int = 0,
    workers: int | None = None,
    plan: Plan | None = None,
) -> np.ndarray:
    """Encrypt, evaluate and decrypt preprocessed samples; deterministic for a seed.

    The samples are split into ``ENCRYPTION_CHUNKS`` fixed chunks, each run by
    ``he_service.engine.selfcheck.encrypted_outputs`` with ``seed``. SEAL holds the GIL, so
    with several workers each chunk runs in its own Python process (started by path with
    ``-P``, exchanging ``.npy`` files: no pickle and no re-import of the caller's script).

    Args:
        artifact: the checked artifact (its directory must exist while this runs).
        samples: preprocessed samples ``(n, *input_shape)``.
        seed: seeds SEAL's PRNG (keys and encryption noise).
        workers: processes to use; defaults to ``min(ENCRYPTION_CHUNKS, os.cpu_count())``;
            1 runs everything in this process.
        plan: the compiled plan, for the in-process path.

    Returns:
        The decrypted outputs ``(n, outputs)``.

    Raises:
        RuntimeError: if a worker process fails.
    """
    chunks = _chunks(np.asarray(samples, dtype=np.float64), ENCRYPTION_CHUNKS)
    count = workers if workers is not None else min(len(chunks), os.cpu_count() or 1)
    if count <= 1 or len(chunks) <= 1:
        compiled = plan if plan is not None else compile_plan(artifact)
        results = [selfcheck.encrypted_outputs(compiled, list(c), seed=seed) for c in chunks]
        return np.concatenate(results)
    # The worker must import he_service from wherever this process did (an installed copy or a
    # source checkout), but nothing from the worker's own directory (hence -P).
    env = dict(os.environ)
    root = str(Path(he_service.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="he-encrypt-") as tmp:
        jobs = []
        for index, chunk in enumerate(chunks):
            samples_path = Path(tmp) / f"samples-{index}.npy"
            out_path = Path(tmp) / f"outputs-{index}.npy"
            np.save(samples_path, chunk, allow_pickle=False)
            command = [
                sys.executable,
                "-P",
                str(_WORKER),
                str(Path(artifact.path).resolve()),
                str(samples_path),
                str(out_path),
                str(seed),
            ]
            # The worker writes only to its stderr on failure; read it after it exits.
            errors = (Path(tmp) / f"stderr-{index}.txt").open("wb")
            jobs.append(
                (
                    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env),
                    out_path,
                    errors,
                )
            )
        results = []
        failures = []
        for process, out_path, errors in jobs:
            code = process.wait()
            errors.close()
            if code != 0:
                message = Path(errors.name).read_text(errors="replace").strip().splitlines()
                failures.append(message[-1] if message else f"exit code {code}")
                continue
            results.append(np.load(out_path, allow_pickle=False))
        if failures:
            raise RuntimeError(f"encrypted evaluation failed in a worker process: {failures[0]}")
        return np.concatenate(results)


@dataclass(frozen=True)
class EncryptedMeasurement:
    """Encrypted results on ``samples`` held-out samples with keys from ``seed``.

    ``metrics`` are the task's: ``accuracy`` and ``agreement`` (argmax equal to the plaintext
    artifact's) for classification, ``mse``, ``mae`` and ``r2`` for regression.
    ``max_abs_error`` is the largest encrypted-vs-plaintext output difference; ``outputs``
    are the decrypted outputs themselves.
    """

    samples: int
    seed: int
    metrics: dict[str, float]
    max_abs_error: float
    outputs: np.ndarray = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """Return the manifest form (keys of the ``training`` section)."""
        return {
            "encrypted_samples": self.samples,
            "encrypted_seed": self.seed,
            **{f"encrypted_{name}": value for name, value in self.metrics.items()},
            "encrypted_max_abs_error": self.max_abs_error,
        }


def measure_encrypted(
    artifact: ModelArtifact,
    x: np.ndarray,
    targets: np.ndarray,
    *,
    seed: int = 0,
    plan: Plan | None = None,
) -> EncryptedMeasurement:
    """Compare encrypted outputs with the targets and with the plaintext artifact.

    Args:
        artifact: the checked artifact.
        x: preprocessed samples.
        targets: their labels (classification) or values (regression).
        seed: SEAL seed.
        plan: the compiled plan, if already at hand.

    Returns:
        The task's metrics of the encrypted outputs (with the argmax agreement for
        classification) and the max |error| against the plaintext artifact.
    """
    encrypted = encrypted_outputs(artifact, x, seed=seed, plan=plan)
    plain, _ = artifact_forward(artifact, x)
    metrics = task_metrics(artifact.task, encrypted, np.asarray(targets))
    if artifact.task == "classification":
        metrics["agreement"] = float(np.mean(encrypted.argmax(axis=1) == plain.argmax(axis=1)))
    return EncryptedMeasurement(
        samples=len(x),
        seed=seed,
        metrics=metrics,
        max_abs_error=float(np.abs(encrypted - plain).max()),
        outputs=encrypted,
    )


# How the metrics are printed, and whether more is better.
_METRIC_NAMES = {"accuracy": "accuracy", "mse": "MSE", "mae": "MAE", "r2": "R^2"}


def _shown(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{_METRIC_NAMES[name]} {value:.4f}"
        for name, value in metrics.items()
        if name in _METRIC_NAMES
    )


@dataclass(frozen=True)
class ArtifactEvaluation:
    """What ``he-models evaluate`` prints.

    ``original`` comes from the manifest's ``training`` section (``original_accuracy`` or
    ``original_mse``/``original_mae``/``original_r2``; the network before conversion is not
    shipped); the rest is measured now. ``out_of_range`` is the fraction of the polynomial
    activations' inputs on the held-out data that fall outside the calibrated ranges.
    ``flagged`` and ``encrypted_flagged`` are the fractions of held-out samples whose outputs
    (plaintext polynomial network; encrypted samples) fall outside the manifest's calibrated
    output ranges, which the client SDK flags as unreliable; None without recorded ranges.
    """

    name: str
    task: str
    samples: int
    original: dict[str, float] | None
    poly: dict[str, float]
    encrypted: EncryptedMeasurement
    out_of_range: float
    out_of_range_by_layer: tuple[tuple[str, float], ...]
    depth: int
    ring: int
    flagged: float | None = None
    encrypted_flagged: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        """Return original minus polynomial accuracy (positive: conversion lost accuracy)."""
        if self.original is None or "accuracy" not in self.original:
            return None
        return self.original["accuracy"] - self.poly["accuracy"]

    def lines(self) -> list[str]:
        """Return the evaluation as lines of text."""
        head = f"{self.name}: depth {self.depth}, N={self.ring}, {self.samples} held-out samples"
        ranges = (
            f"pre-activations outside the calibrated ranges: {100 * self.out_of_range:.3f}%"
            + "".join(f"; {path} {100 * f:.3f}%" for path, f in self.out_of_range_by_layer)
        )
        flags = (
            "no calibrated output ranges recorded: the SDK flags no output"
            if self.flagged is None or self.encrypted_flagged is None
            else "outputs outside the calibrated output ranges (flagged unreliable by the SDK): "
            f"polynomial {100 * self.flagged:.3f}% of {self.samples} samples, encrypted "
            f"{100 * self.encrypted_flagged:.3f}% of {self.encrypted.samples}"
        )
        encrypted = self.encrypted
        if self.task == "regression":
            original = "n/a (not recorded)" if not self.original else _shown(self.original)
            return [
                head,
                f"plaintext (original network): {original}",
                f"polynomial: {_shown(self.poly)}",
                f"encrypted: {_shown(encrypted.metrics)} on {encrypted.samples} samples "
                f"(seed {encrypted.seed})",
                f"encrypted vs polynomial: max |error| {encrypted.max_abs_error:.2e}",
                ranges,
                flags,
            ]
        original = (
            "n/a (not recorded)"
            if self.original is None
            else f"{self.original['accuracy']:.4f} (from the manifest)"
        )
        drop = self.accuracy_drop
        return [
            head,
            f"plaintext accuracy (original network): {original}",
            f"polynomial accuracy: {self.poly['accuracy']:.4f}"
            + ("" if drop is None else f" (original minus polynomial: {100 * drop:+.2f} points)"),
            f"encrypted accuracy: {encrypted.metrics['accuracy']:.4f} on {encrypted.samples} "
            f"samples (seed {encrypted.seed})",
            f"encrypted/polynomial agreement: {encrypted.metrics['agreement']:.4f} "
            f"(max |logit error| {encrypted.max_abs_error:.2e})",
            ranges,
            flags,
        ]


def evaluate_artifact(
    path: str | Path,
    x_raw: np.ndarray,
    targets: np.ndarray,
    *,
    encrypted_samples: int | None = 200,
    seed: int = 0,
) -> ArtifactEvaluation:
    """Evaluate an artifact on held-out raw samples, plaintext and encrypted.

    Args:
        path: the artifact directory.
        x_raw: raw held-out samples (the artifact's preprocessing is applied here).
        targets: their labels (classification) or values (regression).
        encrypted_samples: how many of the first samples to run encrypted (None: all).
        seed: SEAL seed.

    Returns:
        The evaluation.
    """
    artifact = load_artifact(path)
    x = preprocess_batch(x_raw, artifact.preprocessing, artifact.input_shape)
    y = np.asarray(targets)
    outputs, captured = artifact_forward(artifact, x, capture=True)
    ranges = _ranges(artifact.manifest)
    outside = 0
    total = 0
    by_layer: list[tuple[str, float]] = []
    for position, values in captured.items():
        if position not in ranges:
            continue
        name, (lo, hi) = ranges[position]
        count = int(np.count_nonzero((values < lo) | (values > hi)))
        outside += count
        total += values.size
        by_layer.append((name, count / max(values.size, 1)))
    plan = compile_plan(artifact)
    n = len(x) if encrypted_samples is None else min(encrypted_samples, len(x))
    measurement = measure_encrypted(artifact, x[:n], y[:n], seed=seed, plan=plan)
    output_ranges = _output_ranges(artifact)
    flagged = encrypted_flagged = None
    if output_ranges is not None:
        flagged = float(np.mean(rows_out_of_range(outputs, output_ranges)))
        encrypted_flagged = float(np.mean(rows_out_of_range(measurement.outputs, output_ranges)))
    return ArtifactEvaluation(
        name=artifact.name,
        task=artifact.task,
        samples=len(x),
        original=_original(artifact.manifest),
        poly=task_metrics(artifact.task, outputs, y),
        encrypted=measurement,
        out_of_range=outside / max(total, 1),
        out_of_range_by_layer=tuple(by_layer),
        depth=int(plan.params_reason["depth"]),
        ring=plan.params.poly_modulus_degree,
        flagged=flagged,
        encrypted_flagged=encrypted_flagged,
    )


def _output_ranges(artifact: ModelArtifact) -> OutputRanges | None:
    bound = artifact.manifest.get("conversion", {}).get("output_bound", {})
    recorded = bound.get("output_ranges") if isinstance(bound, dict) else None
    return read_output_ranges(recorded, artifact.output_size, "conversion.output_bound")


def _original(manifest: dict[str, Any]) -> dict[str, float] | None:
    training = manifest.get("training", {})
    recorded = {
        name: float(training[f"original_{name}"])
        for name in _METRIC_NAMES
        if f"original_{name}" in training
    }
    return recorded or None


def _ranges(manifest: dict[str, Any]) -> dict[Position, tuple[str, tuple[float, float]]]:
    entries: Sequence[dict[str, Any]] = manifest.get("conversion", {}).get("activations", [])
    result = {}
    for entry in entries:
        bounds = entry.get("range")
        if bounds is not None:
            position = position_of(entry["layer"])
            result[position] = (str(entry.get("path", entry["layer"])), tuple(bounds))
    return result
