"""How cost grows: a series of MLPs and CNNs of growing width and depth, and one row per network.

Every network is trained for real (briefly, deterministically, one thread) on data that ships
in packages, converted to degree-2 polynomials and fine-tuned (``tests/networks/zoo.py``). The
trained artifact is cached under ``--scale-cache`` (default ``.benchmarks/scale-networks``),
keyed by the network's definition and the source of the ``models`` package, and rebuilt when
missing. Each run then compiles it as the server does (``compile_model``) and measures it:

* served: the plan's ring, primes, rotations and Galois keys; the public keys the SDK makes
  (``clients.KeySet``, bytes as uploaded); the request body of one sample; the server's
  evaluation time (``EncryptedEvaluator``, timed by pytest-benchmark, setup outside); the max
  abs output error and the argmax agreement against ``forward_plain`` on held-out samples;
* refused by the engine: the reason, and the latency plan's figures without the key budget
  where the engine can still plan it (marked ``estimated``: what the budget saved the user);
* refused by the converter: the reason.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from torch import nn

import models
from he_service.artifacts import Add, Conv2d, Layer, Linear, ModelArtifact, load_artifact
from he_service.engine import (
    CompiledModel,
    CompileError,
    EncryptedEvaluator,
    ParameterError,
    Plan,
    compile_model,
    compile_plan,
    forward_plain,
    key_budget_of,
)
from he_service.protocol import (
    decode_key_bundle,
    decode_output,
    encode_frames,
    encode_input,
    load_seal,
    save_seal,
)
from tests.networks.zoo import (
    NetworkSpec,
    ResidualCNN,
    convert_network,
    load_data,
    mlp,
    write_unchecked,
)

__all__ = [
    "SERIES",
    "Measured",
    "Row",
    "ScaleRun",
    "artifact_for",
    "compile_row",
    "measure",
    "not_converted",
]


def _mnist_mlp(width: int, hidden: int) -> NetworkSpec:
    sizes = [784, *([width] * hidden), 10]
    return NetworkSpec(
        f"mnist-mlp-w{width}-h{hidden}",
        "mnist",
        lambda: nn.Sequential(nn.Flatten(), mlp(sizes, nn.ReLU)),
        "-".join(map(str, sizes)) + " ReLU",
        epochs=5,
        fine_tune_epochs=2,
    )


def _digits_cnn(channels: int, convs: int) -> NetworkSpec:
    """``convs`` 3x3 convolutions of ``channels`` on 8x8 digits; pooling after the first."""

    def make() -> nn.Module:
        layers: list[nn.Module] = [
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AvgPool2d(2),
        ]
        side = 4
        for index in range(1, convs):
            stride = 2 if index == 2 else 1
            layers += [
                nn.Conv2d(channels, channels, 3, stride=stride, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
            side //= stride
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * side * side, 10))

    return NetworkSpec(
        f"digits-cnn-c{channels}-l{convs}",
        "digits",
        make,
        f"{convs} conv 3x3 x{channels} (BN, ReLU, AvgPool 2{', stride 2' if convs > 2 else ''})",
        family="cnn",
    )


def _mnist_cnn(kernel: int) -> NetworkSpec:
    side = ((28 - kernel) // 2 + 1) // 2
    return NetworkSpec(
        f"mnist-cnn-k{kernel}",
        "mnist",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, kernel, stride=2),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * side * side, 10),
        ),
        f"conv 1->4 {kernel}x{kernel} stride 2, BN, ReLU, AvgPool 2, {4 * side * side}-10",
        family="cnn",
        epochs=5,
        fine_tune_epochs=2,
    )


def _lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def _wine_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(13, 64),
        nn.BatchNorm1d(64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.BatchNorm1d(64),
        nn.GELU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    )


SERIES: list[NetworkSpec] = [
    # MLP width at two hidden layers, then depth at width 64 (784-64-64-10 is in both).
    *(_mnist_mlp(width, 2) for width in (32, 64, 128, 256, 512)),
    *(_mnist_mlp(64, hidden) for hidden in (1, 3, 4)),
    NetworkSpec(
        "wine-mlp-64-64-32",
        "wine",
        _wine_mlp,
        "13-64-64-32-3, BN, ReLU and GELU (issue 10)",
        epochs=30,
        fine_tune_epochs=10,
        batch_size=32,
    ),
    # CNN channels at one convolution, then convolutions at 8 channels.
    *(_digits_cnn(channels, 1) for channels in (2, 4, 8, 16)),
    *(_digits_cnn(8, convs) for convs in (2, 3)),
    *(_mnist_cnn(kernel) for kernel in (3, 5)),
    NetworkSpec(
        "mnist-lenet5",
        "mnist",
        _lenet5,
        "LeNet-5: conv 6 5x5, conv 16 5x5 (BN, ReLU, AvgPool 2), 256-120-84-10",
        family="cnn",
        epochs=8,
        fine_tune_epochs=2,
    ),
    NetworkSpec(
        "digits-cnn-residual",
        "digits",
        ResidualCNN,
        "conv 1->4, residual conv 4->4 + BN, AvgPool 2, 64-10",
        family="residual",
    ),
]


@dataclass
class Row:
    """One network of the series: what it is, what the engine decided, what it costs."""

    name: str
    family: str
    data: str
    summary: str
    parameters: int
    status: str = "served"  # served | refused | not converted | failed
    reason: str = ""
    depth: int | None = None
    original_metric: float | None = None
    poly_metric: float | None = None
    poly_modulus_degree: int | None = None
    coeff_modulus_bits: list[int] | None = None
    rotations: int | None = None
    galois_keys: int | None = None
    relinearizations: int | None = None
    public_key_bytes: int | None = None  # served: as uploaded; else the plan's figure
    card_public_key_bytes: int | None = None
    key_budget_bytes: int | None = None
    request_bytes: int | None = None  # served: one sample's body; else the plan's figure
    response_bytes: int | None = None
    estimated: bool = False  # sizes are the plan's figures, not measured
    expected_max_logit_error: float | None = None
    compile_seconds: float | None = None
    keygen_seconds: float | None = None
    server_seconds: float | None = None  # median of the timed evaluations
    max_abs_error: float | None = None
    agreement: float | None = None
    samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _source_digest() -> str:
    # Conversion and fine-tuning code shape the trained network: a change rebuilds the cache.
    root = Path(models.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def artifact_for(spec: NetworkSpec, cache: Path) -> ModelArtifact:
    """Return the network's artifact, trained and cached on first use.

    Raises:
        ConversionError: the converter refuses the network (nothing is cached).
    """
    entry = cache / f"{spec.name}-{spec.fingerprint()}-{_source_digest()}"
    if not (entry / spec.name / "manifest.json").is_file():
        converted, _ = convert_network(spec)
        write_unchecked(converted, entry)
    return load_artifact(entry / spec.name)


def not_converted(spec: NetworkSpec, reason: str) -> Row:
    """Return the row of a network the converter refuses."""
    parameters = sum(int(p.numel()) for p in spec.make().parameters())
    return Row(spec.name, spec.family, spec.data, spec.summary, parameters, "not converted", reason)


def compile_row(spec: NetworkSpec, artifact: ModelArtifact) -> tuple[Row, CompiledModel | None]:
    """Compile as the server does; fill the row from the plan (or the refusal)."""
    manifest = artifact.manifest
    training = manifest.get("training", {})
    row = Row(
        spec.name,
        spec.family,
        spec.data,
        spec.summary,
        parameters=sum(int(w.size) for w in _weights(artifact.layers)),
        depth=manifest.get("conversion", {}).get("depth"),
        original_metric=training.get("original_metric"),
        poly_metric=training.get("poly_metric"),
        key_budget_bytes=key_budget_of(artifact),
    )
    start = time.perf_counter()
    try:
        compiled = compile_model(artifact)
    except (CompileError, ParameterError) as exc:
        row.compile_seconds = time.perf_counter() - start
        row.status, row.reason = "refused", str(exc)
        try:  # what the plan would cost without the budget, if the engine can plan it
            _fill_plan(row, compile_plan(artifact))
            row.estimated = True
        except (CompileError, ParameterError):
            pass
        return row, None
    row.compile_seconds = time.perf_counter() - start
    _fill_plan(row, compiled.latency)
    return row, compiled


def _weights(layers: Iterable[Layer]) -> list[np.ndarray]:
    found: list[np.ndarray] = []
    for layer in layers:
        if isinstance(layer, Conv2d | Linear):
            found += [layer.weight, layer.bias]
        elif isinstance(layer, Add):
            for branch in layer.branches:
                found += _weights(branch)
    return found


def _fill_plan(row: Row, plan: Plan) -> None:
    summary = plan.summary()
    row.poly_modulus_degree = plan.params.poly_modulus_degree
    row.coeff_modulus_bits = list(plan.params.coeff_modulus_bits)
    row.depth = summary.get("depth", row.depth)
    row.rotations = summary.get("rotations")
    row.galois_keys = summary.get("galois_keys")
    row.relinearizations = summary.get("relinearizations")
    row.public_key_bytes = row.card_public_key_bytes = summary.get("public_key_bytes")
    row.request_bytes = summary.get("request_bytes_per_sample")
    row.response_bytes = summary.get("response_bytes_per_sample")
    row.expected_max_logit_error = summary.get("expected_max_logit_error")


@dataclass
class ScaleRun:
    """The options of one run of the series and the rows measured so far."""

    cache: Path
    samples: int
    rounds: int
    rows: list[Row] = field(default_factory=list)


@dataclass
class Measured:
    """A served network ready to time: SEAL keys loaded as the server loads them, inputs."""

    evaluate: Callable[[], seal.Ciphertext]
    row: Row


def measure(row: Row, compiled: CompiledModel, samples: int) -> Measured:
    """Make keys with the SDK, run ``samples`` held-out samples encrypted, fill the row.

    Returns:
        The row and a no-argument call that evaluates the first sample (to be timed).

    Raises:
        RuntimeError: from SEAL when the plan cannot evaluate a valid input (recorded first).
    """
    from clients._crypto import KeySet  # the SDK's own key generation

    plan, artifact = compiled.latency, compiled.artifact
    row.poly_modulus_degree = plan.params.poly_modulus_degree
    row.coeff_modulus_bits = list(plan.params.coeff_modulus_bits)
    start = time.perf_counter()
    keys = KeySet.generate(plan.params, plan.galois_steps)
    row.keygen_seconds = time.perf_counter() - start
    row.public_key_bytes = len(keys.public_context)

    evaluator = EncryptedEvaluator(plan)
    bundle = decode_key_bundle(keys.public_context)
    relin = load_seal(seal.RelinKeys, bundle.sections["relin_keys"], evaluator.context, what="r")
    galois = None
    if "galois_keys" in bundle.sections:
        galois = load_seal(
            seal.GaloisKeys, bundle.sections["galois_keys"], evaluator.context, what="g"
        )

    data = load_data(artifact.manifest.get("training", {}).get("dataset", row.data))
    prepared = data.prepared(np.asarray(data.x_test[:samples]))
    bodies = [[keys.encrypt(v) for v in encode_input(x, plan.input_encoding)] for x in prepared]
    row.request_bytes = len(encode_frames(bodies[0]))
    inputs = [
        [load_seal(seal.Ciphertext, b, evaluator.context, what="input") for b in body]
        for body in bodies
    ]
    for unit in inputs:
        evaluator.check_inputs(unit)
    outputs = []
    try:
        for unit in inputs:
            outputs.append(save_seal(evaluator.evaluate(unit, relin, galois)))
    except RuntimeError as exc:
        row.status, row.reason = "failed", f"evaluation: {exc}"
        raise
    row.response_bytes = len(outputs[0])
    decrypted = np.stack(
        [decode_output(keys._decrypt_slots(o).real, plan.output_decoding) for o in outputs]
    )
    expected = np.stack([forward_plain(artifact, x) for x in prepared])
    row.max_abs_error = float(np.abs(decrypted - expected).max())
    if data.task == "classification":
        row.agreement = float(np.mean(decrypted.argmax(1) == expected.argmax(1)))
    row.samples = len(prepared)
    first = inputs[0]
    return Measured(lambda: evaluator.evaluate(first, relin, galois), row)
