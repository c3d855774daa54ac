"""Benchmark fixtures: the service under waitress on loopback, keys per model and plan, data.

Modules run in the order baseline -> latency -> batch, so that the reference of every
same-run speed ratio is measured first (see ``harness.Measurements``). ``--bench-models``
limits the models; the baseline always runs (it is the reference of mnist-cnn's targets).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from harness import HeldOut, Measurements, Served, Sessions, shipped_models
from waitress.server import create_server

from clients import HEClient
from he_service.app import create_app

_MODULE_ORDER = ("test_baseline_tenseal.py", "test_latency.py", "test_batch.py")
_HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-models",
        default="",
        help="comma-separated models to benchmark (default: every shipped model)",
    )


def pytest_configure(config: pytest.Config) -> None:
    import os
    import tempfile

    # Benchmark keys are thrown away: keep them off the user's durable key store.
    os.environ["HE_SERVICE_KEY_STORE_DIR"] = tempfile.mkdtemp(prefix="he-bench-contexts-")
    models = shipped_models()
    unknown = sorted(set(_chosen(config)) - set(models))
    if unknown:
        raise pytest.UsageError(f"--bench-models: unknown models {unknown}; shipped: {models}")


def _chosen(config: pytest.Config) -> list[str]:
    return [m for m in str(config.getoption("--bench-models")).split(",") if m]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize every benchmark that takes ``model`` over the selected shipped models."""
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", _chosen(metafunc.config) or shipped_models())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run baseline, then latency, then batch benchmarks (references before comparisons)."""
    positions = [i for i, item in enumerate(items) if item.path.parent == _HERE]

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _MODULE_ORDER.index(name) if name in _MODULE_ORDER else len(_MODULE_ORDER)

    ordered = sorted((items[i] for i in positions), key=rank)
    for position, item in zip(positions, ordered, strict=True):
        items[position] = item


@pytest.fixture(scope="session")
def app() -> Flask:
    return create_app()


@pytest.fixture(scope="session")
def server_url(app: Flask) -> Iterator[str]:
    """Serve the app with the production WSGI server on 127.0.0.1, in a background thread."""
    # A batch request for one group of MNIST images is about 150 MB.
    server = create_server(app, host="127.0.0.1", port=0, threads=2, max_request_body_size=1 << 30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}"
    server.close()


@pytest.fixture(scope="session")
def client(server_url: str) -> Iterator[HEClient]:
    with HEClient(server_url, timeout=600.0) as he_client:
        yield he_client


@pytest.fixture(scope="session")
def served(app: Flask) -> Served:
    return Served(app)


@pytest.fixture(scope="session")
def sessions(client: HEClient, served: Served) -> Sessions:
    return Sessions(client, served)


@pytest.fixture(scope="session")
def heldout(served: Served) -> HeldOut:
    return HeldOut(served)


@pytest.fixture(scope="session")
def measurements() -> Measurements:
    return Measurements()
