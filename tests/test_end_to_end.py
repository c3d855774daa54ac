"""The real `he-service serve` process on loopback, driven by the real `he-client` command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from clients.cli import SAMPLES_DIR, _free_port
from he_service.artifacts import ModelArtifact
from he_service.engine import forward_plain
from he_service.protocol import preprocess
from models.recipes import RECIPES


def _cli(name: str) -> list[str]:
    return [sys.executable, "-m", f"{name}.cli"]


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [*_cli("he_service"), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
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
            assert time.monotonic() < deadline, "server did not start in 180 s"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def _run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*_cli("clients"), "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


SHIPPED = sorted(name for name, recipe in RECIPES.items() if recipe.shipped)


def test_served_by_waitress_on_loopback(server_url: str) -> None:
    response = httpx.get(f"{server_url}/v1/health")
    assert response.headers["Server"] == "he-service"
    assert response.json()["models"] == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_predicts_through_he_client(
    server_url: str, tmp_path: Path, name: str
) -> None:
    from he_service.artifacts import load_artifact
    from he_service.config import DEFAULT_MODELS_DIR

    artifact = load_artifact(DEFAULT_MODELS_DIR / name)
    split = RECIPES[name].load_split(0)
    sample = np.asarray(split.x_test[1], dtype=np.float64)
    path = tmp_path / f"{name}.npy"
    np.save(path, sample)
    plain = forward_plain(
        artifact, preprocess(sample, artifact.preprocessing, artifact.input_shape)
    )
    result = _run("predict", "--model", name, str(path), url=server_url)
    assert result.returncode == 0, result.stderr
    assert f"predicted class {artifact.labels[int(np.argmax(plain))]}" in result.stdout


def test_he_client_lists_models(server_url: str) -> None:
    result = _run("models", url=server_url)
    assert result.returncode == 0, result.stderr
    assert "mnist-cnn: input [1, 28, 28]" in result.stdout


def test_he_client_predicts_png_and_npy_with_saved_keys(
    server_url: str, tmp_path: Path, mnist_artifact: ModelArtifact
) -> None:
    png = sorted(SAMPLES_DIR.glob("*.png"))[0]
    from clients.cli import load_sample

    image = load_sample(png, (1, 28, 28))
    npy = tmp_path / "digit.npy"
    np.save(npy, image)
    expected = int(
        np.argmax(
            forward_plain(
                mnist_artifact, preprocess(image, mnist_artifact.preprocessing, (1, 28, 28))
            )
        )
    )
    keys = tmp_path / "keys.bin"
    first = _run(
        "predict", "--model", "mnist-cnn", "--save-keys", str(keys), str(png), url=server_url
    )
    assert first.returncode == 0, first.stderr
    assert f"predicted class {expected}" in first.stdout
    assert re.search(r"server_affine [0-9.]+ ms", first.stdout)
    assert keys.stat().st_mode & 0o777 == 0o600
    second = _run("predict", "--model", "mnist-cnn", "--keys", str(keys), str(npy), url=server_url)
    assert second.returncode == 0, second.stderr
    assert f"predicted class {expected}" in second.stdout


def test_he_client_reports_errors_without_traceback(server_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(5))
    result = _run("predict", "--model", "nope", str(bad), url=server_url)
    assert result.returncode == 1
    assert "no model named 'nope'" in result.stderr and "Traceback" not in result.stderr


def test_readme_main_job_he_client_demo() -> None:
    """The README's first command ends with `he-client demo`: it must start, predict, stop."""
    result = subprocess.run(
        [*_cli("clients"), "demo"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"(\d+)/10 encrypted predictions match the true digit", result.stdout)
    correct = int(re.search(r"(\d+)/10", result.stdout).group(1))  # type: ignore[union-attr]
    assert correct >= 8  # the model is 94% accurate on held-out digits
