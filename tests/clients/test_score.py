"""``he-client score``: files in, scored files out, through a real in-process server; resume
after an interruption without re-sending scored groups; bad input refused before encryption."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from flask import Flask

from clients import HEClient
from clients.cli import main
from clients.score import score_file
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import preprocess

BREAST = "breast-cancer-mlp"


def _plain(model: str, raw: np.ndarray) -> np.ndarray:
    """The plaintext polynomial network's outputs on raw rows."""
    artifact = load_artifact(DEFAULT_MODELS_DIR / model)
    prepared = [preprocess(x, artifact.preprocessing, artifact.input_shape) for x in raw]
    return np.stack([forward_plain(artifact, x) for x in prepared])


def _assert_classes(model: str, raw: np.ndarray, labels: list[str], step: float) -> None:
    """Every row whose top two plaintext outputs are apart by more than the noise is right."""
    plain = _plain(model, raw)
    top2 = np.sort(plain, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 4 * step
    assert clear.sum() >= len(raw) // 2  # the comparison is not vacuous
    names = np.array(load_artifact(DEFAULT_MODELS_DIR / model).labels)
    np.testing.assert_array_equal(np.array(labels)[clear], names[plain.argmax(axis=1)][clear])


class _Counting(httpx.BaseTransport):
    """The in-process server, counting predict requests; interrupts the run after ``stop``."""

    def __init__(self, app: Flask, stop: int | None = None) -> None:
        self._inner = httpx.WSGITransport(app=app)
        self.predicts = 0
        self._stop = stop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/predict"):
            if self.predicts == self._stop:
                raise KeyboardInterrupt  # the user stops the run while a group is in flight
            self.predicts += 1
        return self._inner.handle_request(request)


@pytest.fixture(scope="module")
def breast_rows() -> np.ndarray:
    from sklearn.datasets import load_breast_cancer

    rows: np.ndarray = load_breast_cancer().data[:30]
    return rows


def _write_input(kind: str, rows: np.ndarray, folder: Path) -> Path:
    path = folder / f"in.{kind}"
    if kind == "csv":
        header = ",".join(f"f{j}" for j in range(rows.shape[1]))
        np.savetxt(path, rows, delimiter=",", header=header, comments="")
    elif kind == "npy":
        np.save(path, rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({f"f{j}": rows[:, j] for j in range(rows.shape[1])}), path)
    return path


def _read_output(kind: str, path: Path, labels: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """Return the class column and the input columns of a scored file."""
    if kind == "csv":
        with path.open() as handle:
            table = list(csv.DictReader(handle))
        inputs = np.array([[float(r[f"f{j}"]) for j in range(30)] for r in table])
        return [r["class"] for r in table], inputs
    if kind == "npy":
        array = np.load(path)
        return [labels[int(c)] for c in array[:, 30]], array[:, :30]
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    return table["class"], np.array([table[f"f{j}"] for j in range(30)]).T


@pytest.mark.parametrize("kind", ["csv", "npy", "parquet"])
def test_a_file_comes_back_with_the_plaintext_networks_classes(
    kind: str, client: HEClient, breast_rows: np.ndarray, tmp_path: Path
) -> None:
    source = _write_input(kind, breast_rows, tmp_path)
    output = tmp_path / f"out.{kind}"
    summary = score_file(
        client, source, output, model=BREAST, workers=1, group_rows=16, with_outputs=True
    )
    assert (summary.rows, summary.scored_rows, summary.groups) == (30, 30, 2)
    assert summary.bytes_sent > 0
    card = client.card(BREAST)
    labels, inputs = _read_output(kind, output, card.labels)
    np.testing.assert_array_equal(inputs, breast_rows)
    _assert_classes(BREAST, breast_rows, labels, card.plan("batch").output_precision)
    assert not output.with_name(output.name + ".progress").exists()
    keys = output.with_name(output.name + ".keys")
    assert keys.stat().st_mode & 0o777 == 0o600


def test_an_image_folder_gives_a_csv_of_files_and_classes(client: HEClient, tmp_path: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits().images[:6]  # 8x8, values 0..16
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(digits):
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(folder / f"d{i}.png")
    output = tmp_path / "out.csv"
    score_file(client, folder, output, model="digits-cnn", workers=1)
    with output.open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["file"] for r in table] == [f"d{i}.png" for i in range(6)]
    raw = np.stack([(image * 16).clip(0, 255).astype(np.uint8) for image in digits])
    step = client.card("digits-cnn").plan("batch").output_precision
    _assert_classes("digits-cnn", raw.astype(np.float64), [r["class"] for r in table], step)


def test_an_interrupted_run_resumes_without_sending_scored_groups_again(
    app: Flask, breast_rows: np.ndarray, tmp_path: Path
) -> None:
    source = _write_input("csv", breast_rows, tmp_path)
    output = tmp_path / "out.csv"
    first = _Counting(app, stop=1)
    with HEClient("http://testserver", transport=first, retry=None) as client:
        with pytest.raises(KeyboardInterrupt):
            score_file(client, source, output, model=BREAST, workers=1, group_rows=10)
    record = json.loads(output.with_name("out.csv.progress").read_text())
    assert first.predicts == 1 and record["done"] == [0] and not output.exists()

    again = _Counting(app)
    with HEClient("http://testserver", transport=again) as client:
        summary = score_file(client, source, output, model=BREAST, workers=2, group_rows=10)
        step = client.card(BREAST).plan("batch").output_precision
    assert again.predicts == 2  # groups 1 and 2; group 0 was kept from the first run
    # The pool handed its ciphertexts over in scratch files: none is left behind.
    assert not glob.glob(f"/dev/shm/he-{os.getpid()}-score-*")
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"he-{os.getpid()}-score-*"))
    assert (summary.scored_rows, summary.skipped_groups) == (20, 1)
    with output.open() as handle:
        labels = [r["class"] for r in csv.DictReader(handle)]
    _assert_classes(BREAST, breast_rows, labels, step)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1,2,3\n4,5,6\n", "line 1: 3 columns, the model expects 30 values per row"),
        (
            "\n".join([",".join(["1"] * 30)] * 2 + [",".join(["1"] * 29 + ["x"])]),
            "line 3, column 30",
        ),
    ],
)
def test_a_bad_csv_exits_2_naming_the_first_bad_row_before_encrypting(
    content: str, message: str, app: Flask, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "bad.csv"
    source.write_text(content)
    transport = _Counting(app)
    argv = ["score", str(source), "--model", BREAST, "--output", str(tmp_path / "out.csv")]
    assert main(argv, transport=transport) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert transport.predicts == 0 and not (tmp_path / "out.csv.keys").exists()


def test_an_image_of_another_size_exits_2_naming_it(
    app: Flask, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "a.png")
    Image.new("L", (9, 8)).save(folder / "b.png")
    argv = ["score", str(folder), "--model", "digits-cnn", "--output", str(tmp_path / "o.csv")]
    assert main(argv, transport=_Counting(app)) == 2
    assert "b.png: 9x8 pixels, the model expects 8x8" in capsys.readouterr().err


def test_scratch_files_of_killed_runs_are_swept(tmp_path: Path) -> None:
    from clients._pipeline import _sweep_scratch

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    folder = tempfile.gettempdir()
    stale = Path(folder, f"he-{dead}-score-stale")
    mine = Path(folder, f"he-{os.getpid()}-score-live")
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    try:
        _sweep_scratch()
        assert not stale.exists() and mine.exists()
    finally:
        stale.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)
