"""``he-client score --dask``: the same scoring on a 2-worker Dask ``LocalCluster`` gives the
local classes; the key reaches each worker once and leaves at the end; a bad scheduler address
exits 2 before any key is made; a cluster that loses its workers fails the run, not hangs it."""

from __future__ import annotations

import csv
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flask import Flask

from clients import DaskClusterError, HEClient, ModelSession
from clients.cli import main
from clients.score import score_file
from he_service.config import DEFAULT_MODELS_DIR
from tests.clients.test_score import BREAST, _plain

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Two worker processes of one thread each, as ``dask worker --nworkers 2 --nthreads 1``."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as local:
        yield local


@pytest.fixture(scope="module")
def dask_client(cluster: Any) -> Iterator[Any]:
    with distributed.Client(cluster, set_as_default=False) as dask_client:
        yield dask_client


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Rows like the training data (its mean and spread); every class margin is wide."""
    manifest = json.loads((DEFAULT_MODELS_DIR / BREAST / "manifest.json").read_text())
    stats = manifest["input"]["preprocessing"]
    noise = np.random.default_rng(0).normal(size=(30, 30)) * 0.7
    return np.asarray(np.array(stats["mean"]) + np.array(stats["std"]) * noise)


@pytest.fixture(scope="module")
def breast(client: HEClient) -> ModelSession:
    return client.model(BREAST, plan="batch")


def _held_keys(dask_worker: Any) -> list[str]:
    """On a worker: the names of the client keys it holds (plugins and the encryption state)."""
    from clients._pipeline import _state

    names = [name for name in dask_worker.plugins if name.startswith("he-client-key-")]
    return names + ([str(_state["key"])] if "key" in _state else [])


def _seed_release_noise(seed: int | None) -> None:
    """Make ``release``'s fresh generator a seeded one (``None``: back to the real one)."""
    import numpy

    real = getattr(numpy.random, "_real_default_rng", numpy.random.default_rng)
    numpy.random._real_default_rng = real  # type: ignore[attr-defined]
    numpy.random.default_rng = real if seed is None else (lambda *_: real(seed))


def test_dask_scoring_gives_the_local_classes(
    breast: ModelSession, cluster: Any, dask_client: Any, rows: np.ndarray
) -> None:
    local = list(breast.score_iter(rows, group_rows=16, workers=1))
    on_cluster = breast.score_iter(rows, group_rows=16, dask=cluster.scheduler_address)
    first = next(on_cluster)
    # During the run each worker holds this run's key once; afterwards no worker holds it.
    held = dask_client.run(_held_keys)
    assert len(held) == 2 and all(len(set(v)) == 1 and len(v) == 2 for v in held.values())
    remote = [first, *on_cluster]
    assert dask_client.run(_held_keys) == {worker: [] for worker in held}
    assert breast.last_timings["decrypt"] > 0 and breast.last_timings["encrypt_wait"] >= 0

    assert [g.index for g in remote] == [g.index for g in local] == [0, 1]
    assert [g.start for g in remote] == [0, 16] and [len(g.outputs) for g in remote] == [16, 14]
    ours = np.concatenate([g.outputs for g in remote])
    theirs = np.concatenate([g.outputs for g in local])
    np.testing.assert_array_equal(ours.argmax(axis=1), theirs.argmax(axis=1))
    np.testing.assert_array_equal(ours.argmax(axis=1), _plain(BREAST, rows).argmax(axis=1))
    # Fresh encryptions and fresh flooding noise: released values agree to a few steps.
    step = breast.spec.output_precision
    assert np.abs(ours - theirs).max() <= 4 * step
    assert np.all(np.round(ours / step) * step == ours)


def test_a_worker_releases_an_answer_exactly_as_this_process_does(
    breast: ModelSession, dask_client: Any, rows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clients._dask import DaskBackend
    from clients._pipeline import _vectors

    vectors = _vectors(breast, rows[:16])
    outputs = breast._send_group([breast.keys.encrypt(v) for v in vectors], {})
    _seed_release_noise(7)
    dask_client.run(_seed_release_noise, 7)
    try:
        backend = DaskBackend(breast, dask_client)
        try:
            remote = backend.release(outputs, 16, {})
        finally:
            backend.close()
        here = breast._decode(outputs, 16, {})
    finally:
        _seed_release_noise(None)
        dask_client.run(_seed_release_noise, None)
    np.testing.assert_array_equal(remote, here)  # bit for bit: same function, same inputs


def test_the_cli_scores_a_file_on_the_cluster(
    app: Flask, client: HEClient, cluster: Any, rows: np.ndarray, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    np.savetxt(source, rows, delimiter=",", header=",".join(f"f{j}" for j in range(30)))
    here, there = tmp_path / "here.csv", tmp_path / "there.csv"
    score_file(client, source, here, model=BREAST, workers=1, group_rows=16)
    argv = ["score", str(source), "--model", BREAST, "--output", str(there), "--group-rows", "16"]
    transport = httpx.WSGITransport(app=app)
    assert main([*argv, "--dask", cluster.scheduler_address], transport=transport) == 0

    def classes(path: Path) -> list[str]:
        with path.open() as handle:
            return [row["class"] for row in csv.DictReader(handle)]

    assert classes(there) == classes(here) and len(classes(there)) == 30
    assert not there.with_name("there.csv.progress").exists()


def test_a_bad_scheduler_address_exits_2_before_making_keys(
    app: Flask, rows: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.npy"
    np.save(source, rows)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    for address in (f"tcp://127.0.0.1:{port}", "tcp://127.0.0.1:port"):
        output = tmp_path / "out.npy"
        argv = ["score", str(source), "--model", BREAST, "--output", str(output)]
        code = main([*argv, "--dask", address], transport=httpx.WSGITransport(app=app))
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err and "Dask scheduler" in err
        assert not output.with_name("out.npy.keys").exists()


def test_a_cluster_that_loses_its_workers_fails_the_run_and_keeps_scored_groups(
    app: Flask,
    cluster: Any,
    dask_client: Any,
    rows: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clients import _dask

    monkeypatch.setattr(_dask, "NO_WORKERS_SECONDS", 2.0)
    source = tmp_path / "in.npy"
    np.save(source, rows)
    output = tmp_path / "out.npy"

    class StopWorkers(httpx.BaseTransport):
        """The server; its second prediction comes while every worker goes away."""

        def __init__(self) -> None:
            self._inner = httpx.WSGITransport(app=app)
            self.predicts = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/predict"):
                self.predicts += 1
                if self.predicts == 2:
                    cluster.scale(0)
                    while dask_client.nthreads():
                        time.sleep(0.1)
            return self._inner.handle_request(request)

    try:
        with HEClient("http://testserver", transport=StopWorkers(), retry=None) as he:
            with pytest.raises(DaskClusterError, match="no workers for 2 s"):
                score_file(he, source, output, model=BREAST, group_rows=16, dask=dask_client)
        record = json.loads(output.with_name("out.npy.progress").read_text())
        assert record["done"] == [0] and not output.exists()
    finally:
        cluster.scale(2)
        dask_client.wait_for_workers(2, timeout=60)
