"""Networks users train, served through the real service and the SDK.

Each network of ``SERVED`` is trained briefly on data that ships in packages (wine, breast
cancer, diabetes, digits, MNIST), converted to polynomials, exported to a temporary models
directory, served by ``create_app({"models_dir": ...})`` and used through ``HEClient``: keys
made by the SDK once per network and shared by every check. The checks: the conversion report,
public key bytes within the card's figure and the key budget, request bytes as the card says,
and encrypted outputs that agree with the plaintext polynomial network (argmax for
classifiers, absolute error for the regression head). One test serves several of them with
the real ``he-service serve`` process.

Residual blocks are among them (an identity skip around a dense block, a convolutional block
with BatchNorm after the sum), as are the convolutions whose Galois keys once exceeded the key
budget.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from torch import nn

from clients import HEClient, ModelSession
from clients.cli import _free_port
from he_service import create_app
from he_service.artifacts import load_artifact
from he_service.engine import forward_plain, key_budget_of
from he_service.protocol import encode_frames
from models import ConversionReport
from tests.networks.zoo import (
    CLASSIFICATION,
    Converted,
    Data,
    NetworkSpec,
    ResidualCNN,
    ResidualMLP,
    convert_network,
    export_checked,
    load_data,
    mlp,
)

SAMPLES = 5  # held-out samples per network sent encrypted
# Held-out quality of the polynomial network: the data and training are meaningful.
MIN_ACCURACY = 0.8
MIN_R2 = 0.3
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


SERVED: list[NetworkSpec] = [
    NetworkSpec(
        "wine-mlp-relu",
        "wine",
        lambda: mlp([13, 16, 3], nn.ReLU),
        "13-16-3 ReLU",
        epochs=30,
        batch_size=32,
    ),
    NetworkSpec(
        "wine-mlp-bn-gelu-silu",
        "wine",
        lambda: mlp([13, 32, 16, 3], nn.GELU, nn.SiLU, bn=True),
        "13-32-16-3, BatchNorm, GELU then SiLU",
        epochs=30,
        batch_size=32,
    ),
    NetworkSpec(
        "breast-cancer-mlp-tanh",
        "breast-cancer",
        lambda: mlp([30, 16, 8, 2], nn.Tanh),
        "30-16-8-2 Tanh",
        epochs=30,
        batch_size=32,
    ),
    NetworkSpec(
        "breast-cancer-mlp-sigmoid-auto",
        "breast-cancer",
        lambda: mlp([30, 8, 2], nn.Sigmoid),
        "30-8-2 Sigmoid, degree chosen by the converter (up to 4)",
        degrees=None,
        epochs=30,
        batch_size=32,
    ),
    NetworkSpec(
        "diabetes-regression",
        "diabetes",
        lambda: mlp([10, 32, 16, 1], nn.SiLU, nn.ReLU),
        "10-32-16-1 regression, SiLU then ReLU",
        batch_size=32,
        epochs=60,
    ),
    NetworkSpec(
        "digits-mlp-deep",
        "digits",
        lambda: nn.Sequential(nn.Flatten(), mlp([64, 32, 32, 16, 10], nn.ReLU)),
        "64-32-32-16-10 ReLU on 8x8 digits",
    ),
    NetworkSpec(
        "digits-mlp-wide",
        "digits",
        lambda: nn.Sequential(nn.Flatten(), mlp([64, 128, 10], nn.GELU)),
        "64-128-10 GELU on 8x8 digits",
    ),
    NetworkSpec(
        "mnist-mlp",
        "mnist",
        lambda: nn.Sequential(nn.Flatten(), mlp([784, 32, 10], nn.ReLU)),
        "784-32-10 ReLU on MNIST",
        epochs=5,
    ),
    NetworkSpec(
        "digits-cnn-stride",
        "digits",
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(96, 10)
        ),
        "conv 1->6 3x3 stride 2 pad 1, SiLU, 96-10",
        family="cnn",
    ),
    NetworkSpec(
        "digits-cnn-pool",
        "digits",
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(32, 10),
        ),
        "conv 1->2 3x3 pad 1, BatchNorm, ReLU, AvgPool 2, 32-10",
        family="cnn",
    ),
    NetworkSpec(
        "digits-cnn-two-conv",
        "digits",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(128, 10),
        ),
        "conv 1->4 pad 1, BatchNorm, ReLU, conv 4->8 stride 2, GELU, 128-10",
        family="cnn",
    ),
    NetworkSpec(
        "mnist-cnn-small",
        "mnist",
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)
        ),
        "conv 1->2 5x5 stride 3, ReLU, 128-10 on MNIST",
        family="cnn",
        epochs=5,
    ),
    NetworkSpec(
        "digits-cnn-pool-4ch",
        "digits",
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 10),
        ),
        "conv 1->4 3x3 pad 1, BatchNorm, ReLU, AvgPool 2, 64-10",
        family="cnn",
    ),
    NetworkSpec(
        "digits-cnn-5x5",
        "digits",
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(96, 10),
        ),
        "conv 1->6 5x5 pad 2, Tanh, AvgPool 2, 96-10",
        family="cnn",
    ),
    NetworkSpec(
        "wine-mlp-residual",
        "wine",
        ResidualMLP,
        "13-16 + residual 16-16, 16-3",
        epochs=30,
        batch_size=32,
    ),
    NetworkSpec(
        "digits-cnn-residual",
        "digits",
        ResidualCNN,
        "conv 1->4, residual conv 4->4 + BatchNorm, AvgPool 2, 64-10",
        family="residual",
    ),
]
# Networks the batch plan (one sample per slot) is also checked on: few input features.
BATCH_CHECKED = (
    "wine-mlp-bn-gelu-silu",
    "diabetes-regression",
    "digits-cnn-two-conv",
    "wine-mlp-residual",
)
# Served by one real `he-service serve` process (a classifier, a regression head, a CNN).
REAL_SERVER = ("wine-mlp-relu", "diabetes-regression", "digits-cnn-stride")


@dataclass
class ServedNetwork:
    """One network of the zoo: built, exported, served in-process, keys made by the SDK."""

    spec: NetworkSpec
    data: Data
    converted: Converted
    report: ConversionReport
    models_dir: Path
    client: HEClient
    session: ModelSession
    raw: np.ndarray  # held-out samples, as the client holds them
    plain: np.ndarray  # forward_plain of the preprocessed samples

    @functools.cached_property
    def encrypted(self) -> np.ndarray:
        """Return the SDK's ``predict_many`` of the samples (encrypt, POST, decrypt)."""
        return self.session.predict_many(self.raw)

    @property
    def details(self) -> dict[str, object]:
        return self.session.spec.details

    def tolerance(self, session: ModelSession | None = None) -> float:
        """Return how far released outputs may be from the plaintext network's: two steps of
        the plan's published output precision (the SDK's documented bound)."""
        return 2 * (session or self.session).spec.output_precision


class Zoo:
    """Builds and serves each network the first time a test asks for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._served: dict[str, ServedNetwork] = {}
        self._clients: list[HEClient] = []

    def get(self, name: str) -> ServedNetwork:
        if name not in self._served:
            self._served[name] = self._serve(next(s for s in SERVED if s.name == name))
        return self._served[name]

    def _serve(self, spec: NetworkSpec) -> ServedNetwork:
        converted, report = convert_network(spec)
        models_dir = self.root / spec.name
        export_checked(converted, models_dir)
        app = create_app({"models_dir": str(models_dir), "key_store_max_bytes": 1 << 30})
        client = HEClient("http://zoo", transport=httpx.WSGITransport(app=app), timeout=120.0)
        self._clients.append(client)
        session = client.model(spec.name)
        data = load_data(spec.data)
        raw = np.asarray(data.x_test[:SAMPLES])
        artifact = load_artifact(models_dir / spec.name)
        plain = np.stack([forward_plain(artifact, x) for x in data.prepared(raw)])
        return ServedNetwork(spec, data, converted, report, models_dir, client, session, raw, plain)

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    built = Zoo(tmp_path_factory.mktemp("zoo"))
    yield built
    built.close()


NAMES = [spec.name for spec in SERVED]


@pytest.mark.parametrize("name", NAMES)
def test_conversion_report(zoo: Zoo, name: str) -> None:
    """Every activation the user wrote is replaced, in order; depth as the plan counts it."""
    served = zoo.get(name)
    written = [type(m).__name__ for m in served.spec.make().modules() if isinstance(m, ACTIVATIONS)]
    replaced = [a.replaces.split("(")[0] for a in served.report.activations]
    assert replaced == written
    if served.spec.degrees is not None:
        assert {a.degree for a in served.report.activations} == {served.spec.degrees}
    assert all(a.lo < a.hi for a in served.report.activations)
    for change in served.report.changes:
        if change.old.startswith("BatchNorm"):
            assert change.new.startswith("folded into"), change
    assert served.report.depth == served.details["depth"]
    # The artifact records the report the card and `he-models evaluate` read.
    manifest = served.converted.manifest["conversion"]
    assert manifest["depth"] == served.report.depth
    assert len(manifest["activations"]) == len(written)
    training = served.converted.training
    if served.data.task == CLASSIFICATION:
        assert training["poly_metric"] >= MIN_ACCURACY, training
    else:
        assert training["poly_metric"] >= MIN_R2, training


@pytest.mark.parametrize("name", NAMES)
def test_public_keys_within_card_and_budget(zoo: Zoo, name: str) -> None:
    served = zoo.get(name)
    uploaded = len(served.session.public_context())
    card_figure = served.details["public_key_bytes"]
    assert isinstance(card_figure, int)
    budget = key_budget_of(load_artifact(served.models_dir / name))
    assert uploaded <= card_figure <= budget
    # The card's figure is what a client should plan for: not a loose bound.
    assert uploaded >= 0.8 * card_figure
    assert served.client.has_context(served.session.context_id)


@pytest.mark.parametrize("name", NAMES)
def test_request_bytes_match_card(zoo: Zoo, name: str) -> None:
    served = zoo.get(name)
    ciphertexts = served.session.encrypt(served.raw[0])
    assert len(ciphertexts) == served.details["input_ciphertexts"]
    sent = sum(map(len, ciphertexts))
    card_figure = served.details["request_bytes_per_sample"]
    assert isinstance(card_figure, int)
    assert 0.8 * card_figure <= sent <= card_figure
    # Framing adds a few bytes per ciphertext, nothing proportional to the data.
    assert len(encode_frames(ciphertexts)) - sent <= 64 * len(ciphertexts)


# digits-mlp-deep once answered 500 ("result ciphertext is transparent": an all-zero weight
# block reached multiply_plain); plans now never hold an all-zero plaintext.
@pytest.mark.parametrize("name", NAMES)
def test_encrypted_agrees_with_plaintext(zoo: Zoo, name: str) -> None:
    served = zoo.get(name)
    assert served.encrypted.shape == served.plain.shape == (SAMPLES, len(served.data.labels))
    error = float(np.abs(served.encrypted - served.plain).max())
    assert error <= served.tolerance(), f"max abs output error {error:.3g}"
    if served.data.task == CLASSIFICATION:
        np.testing.assert_array_equal(served.encrypted.argmax(1), served.plain.argmax(1))


@pytest.mark.parametrize("name", BATCH_CHECKED)
def test_batch_plan_agrees_with_plaintext(zoo: Zoo, name: str) -> None:
    """One sample per slot: relinearization keys only, the same answers."""
    served = zoo.get(name)
    bulk = served.client.model(name, plan="batch")
    assert bulk.spec.galois_steps == ()
    outputs = bulk.predict_many(served.raw)
    assert float(np.abs(outputs - served.plain).max()) <= served.tolerance(bulk)
    if served.data.task == CLASSIFICATION:
        np.testing.assert_array_equal(outputs.argmax(1), served.plain.argmax(1))


@pytest.fixture(scope="module")
def real_server(zoo: Zoo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``he-service serve`` on loopback with several zoo networks in one models directory."""
    root = tmp_path_factory.mktemp("served")
    models = root / "models"
    for name in REAL_SERVER:
        shutil.copytree(zoo.get(name).models_dir / name, models / name)
    port = _free_port()
    env = {
        **os.environ,
        "HE_SERVICE_KEY_STORE_DIR": str(root / "contexts"),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "he_service.cli", "serve"]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--models-dir", str(models)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "he-service serve did not start in 180 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_real_server_serves_the_zoo(zoo: Zoo, real_server: str) -> None:
    """The same keys (made once by the SDK) work against the real server process."""
    with HEClient(real_server, timeout=120.0) as client:
        assert sorted(client.health()["models"]) == sorted(REAL_SERVER)
        for name in REAL_SERVER:
            served = zoo.get(name)
            session = client.model(name, keys=served.session.keys)
            assert session.card.to_json() == served.session.card.to_json()
            outputs = session.predict_many(served.raw)
            assert float(np.abs(outputs - served.plain).max()) <= served.tolerance()
            if served.data.task == CLASSIFICATION:
                np.testing.assert_array_equal(outputs.argmax(1), served.plain.argmax(1))
