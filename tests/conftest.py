"""Shared fixtures: the shipped model, an in-process app and client, one key set per session."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from flask import Flask

from clients import HEClient, ModelSession
from he_service import create_app
from he_service.artifacts import ModelArtifact, load_artifact
from he_service.config import DEFAULT_MODELS_DIR

MNIST_DIR = DEFAULT_MODELS_DIR / "mnist-cnn"


def pytest_configure(config: pytest.Config) -> None:
    """Keep every app and served process of the run off the user's durable key store."""
    import os
    import tempfile

    os.environ["HE_SERVICE_KEY_STORE_DIR"] = tempfile.mkdtemp(prefix="he-test-contexts-")
    os.environ.pop("HE_SERVICE_API_TOKENS", None)
    os.environ.pop("HE_SERVICE_REDIS_URL", None)


@pytest.fixture(scope="session", autouse=True)
def _compile_each_artifact_once() -> Iterator[None]:
    """Compile each artifact once per test run, however many apps the tests create.

    Compiling is deterministic and the compiled model is read-only, so the apps of different
    tests may share it; the five shipped models take about 20 s to compile, which every
    module's ``create_app`` would otherwise pay again. Keyed by the folder and the manifest, which
    holds the weights' sha256 (the loader checks it).
    """
    import json

    from he_service import registry
    from he_service.engine import CompiledModel

    compile_model = registry.compile_model
    compiled: dict[str, CompiledModel] = {}

    def once(artifact: ModelArtifact) -> CompiledModel:
        key = f"{artifact.path}\n{json.dumps(artifact.manifest, sort_keys=True)}"
        if key not in compiled:
            compiled[key] = compile_model(artifact)
        return compiled[key]

    registry.compile_model = once  # type: ignore[assignment]
    yield
    registry.compile_model = compile_model  # type: ignore[assignment]


@pytest.fixture(scope="session")
def mnist_artifact() -> ModelArtifact:
    return load_artifact(MNIST_DIR)


@pytest.fixture(scope="session")
def app() -> Flask:
    return create_app({"key_store_max_bytes": 1 << 30})  # keeps the suite's memory modest


@pytest.fixture(scope="session")
def client(app: Flask) -> Iterator[HEClient]:
    with HEClient("http://testserver", transport=httpx.WSGITransport(app=app)) as he_client:
        yield he_client


@pytest.fixture(scope="session")
def session(client: HEClient) -> ModelSession:
    """Keys for mnist-cnn, generated once: key generation takes seconds."""
    return client.model("mnist-cnn")


@pytest.fixture(scope="session")
def mnist_test_images() -> tuple[np.ndarray, np.ndarray]:
    from models.datasets import load_mnist_split

    split = load_mnist_split(0)
    return split.x_test, split.y_test


@pytest.fixture
def models_dir_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped mnist-cnn artifact that a test may damage."""
    import shutil

    target = tmp_path / "models"
    shutil.copytree(MNIST_DIR, target / "mnist-cnn")
    return target


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real, throwaway redis-server on a free port, without persistence.

    Tests share it: each one uses its own key prefix instead of flushing the database.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: install it as the README's test command does")
    import redis

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
