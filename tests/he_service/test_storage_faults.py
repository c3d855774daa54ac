"""Storage faults on real filesystems: a full tmpfs, a tmpfs remounted read-only, dead writers.

The store directories live on a small tmpfs mounted for the test (root, as in CI): root ignores
file permissions, so only a real read-only mount or a really full disk shows what the service
does then. Each fault is answered (503 naming it, reads still served) and the service recovers
by itself once the fault ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from flask import Flask

from clients import HEClient, KeySet
from he_service import create_app
from he_service.config import DEFAULT_MODELS_DIR
from he_service.errors import NotReady
from he_service.keystore._disk import DiskBackend
from he_service.protocol import seal_io
from he_service.uploads import StagingUnavailable, UploadInfo
from he_service.uploads._disk import DiskStaging

MODEL = "breast-cancer-mlp"
OWNER = "anonymous"
ID_A, ID_B, ID_C = ("a" * 64), ("b" * 64), ("c" * 64)


def _mount(target: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    target = tmp_path / "mnt"
    target.mkdir()
    _mount(target, "size=1m,mode=0700")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _remount(target: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(target)], check=True)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".tmp-*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _store(backend: DiskBackend, context_id: str, size: int) -> bool:
    return backend.store(
        OWNER,
        context_id,
        os.urandom(size),
        now=time.time(),
        expires_at=time.time() + 600,
        max_entries=10,
        max_bytes=1 << 30,
    )


def test_full_disk_answers_503_leaves_nothing_and_recovers_by_itself(tmpfs: Path) -> None:
    backend = DiskBackend(tmpfs / "contexts")
    assert _store(backend, ID_A, 600_000)
    with pytest.raises(NotReady, match="full") as refused:
        _store(backend, ID_B, 600_000)
    assert refused.value.status == 503 and refused.value.retry_after
    assert _leftovers(tmpfs) == []  # the failed write removed its temporary file
    assert backend.read(OWNER, ID_A) is not None  # what is stored is still served
    assert backend.delete(OWNER, ID_A, now=time.time())
    assert _store(backend, ID_B, 600_000)  # space freed: uploads work again, no restart


def test_dead_writers_temporary_files_are_swept_at_start(tmpfs: Path) -> None:
    directory = tmpfs / "contexts"
    backend = DiskBackend(directory)
    assert _store(backend, ID_A, 1000)
    folder = next(p for p in directory.iterdir() if p.is_dir())
    dead = folder / f".tmp-{_dead_pid()}-crashed"
    dead.write_bytes(b"x" * 700_000)  # a crash mid-upload filled the disk
    mine = folder / f".tmp-{os.getpid()}-writing"
    mine.write_bytes(b"x")
    with pytest.raises(NotReady, match="full"):
        _store(backend, ID_B, 400_000)
    DiskBackend(directory)  # a restart
    assert not dead.exists() and mine.exists()  # a live writer's file stays
    assert _store(backend, ID_B, 400_000)


def test_read_only_store_serves_reads_and_refuses_writes(tmpfs: Path) -> None:
    backend = DiskBackend(tmpfs / "contexts")
    assert _store(backend, ID_A, 1000)
    _remount(tmpfs, "ro")
    try:
        reopened = DiskBackend(tmpfs / "contexts")  # a restart on a read-only store works
        for store in (backend, reopened):
            info = store.touch(OWNER, ID_A, now=time.time())  # os.utime fails: skipped
            assert info is not None and store.read(OWNER, ID_A) is not None
            with pytest.raises(NotReady, match="read-only"):
                _store(store, ID_C, 1000)
            with pytest.raises(NotReady, match="read-only"):
                store.delete(OWNER, ID_A, now=time.time())
            # An expired entry reads as absent even though it cannot be removed now.
            assert store.touch(OWNER, ID_A, now=time.time() + 3600) is None
    finally:
        _remount(tmpfs, "rw")
    assert _store(backend, ID_C, 1000)


def test_upload_staging_full_or_read_only_answers_503_and_cleans_up(tmpfs: Path) -> None:
    staging = DiskStaging(tmpfs / "uploads")
    now = time.time()
    info = UploadInfo(OWNER, "0" * 32, MODEL, "batch", ID_A, now, now + 600)
    staging.create(info, now=now, max_per_owner=4)

    def put(index: int, size: int) -> None:
        staging.put_part(
            OWNER,
            info.upload_id,
            index,
            os.urandom(size),
            1,
            now=time.time(),
            expires_at=time.time() + 600,
            max_ciphertexts=100,
            max_bytes=1 << 30,
        )

    put(0, 600_000)
    with pytest.raises(StagingUnavailable, match="full") as refused:
        put(1, 600_000)
    assert refused.value.retry_after
    assert _leftovers(tmpfs) == []
    assert staging.read_part(OWNER, info.upload_id, 0) is not None
    _remount(tmpfs, "ro")
    try:
        with pytest.raises(StagingUnavailable, match="read-only"):
            put(1, 10)
        assert staging.read_part(OWNER, info.upload_id, 0) is not None
        DiskStaging(tmpfs / "uploads")  # starts on a read-only disk too
    finally:
        _remount(tmpfs, "rw")
    put(1, 10)


@pytest.fixture
def ro_app(tmpfs: Path) -> Iterator[tuple[Flask, Path]]:
    models = tmpfs.parent / "models"
    shutil.copytree(DEFAULT_MODELS_DIR / MODEL, models / MODEL)
    subprocess.run(["mount", "-o", "remount,size=8m", str(tmpfs)], check=True)
    app = create_app({"models_dir": models, "key_store_dir": tmpfs / "contexts"})
    yield app, tmpfs
    with contextlib.suppress(subprocess.CalledProcessError):
        _remount(tmpfs, "rw")


def test_http_read_only_store_head_and_predict_work_uploads_get_503(
    ro_app: tuple[Flask, Path],
) -> None:
    app, mount = ro_app
    with HEClient("http://testserver", transport=httpx.WSGITransport(app=app)) as client:
        session = client.model(MODEL, plan="batch")  # keys made and uploaded
        x = np.zeros((1, *session.card.input_shape))
        before = session.predict_many(x)
        context_id = session.context_id
        _remount(mount, "ro")
        http = app.test_client()
        assert http.head(f"/v1/contexts/{context_id}").status_code == 200
        assert np.allclose(session.predict_many(x), before, atol=1e-2)  # predict still works
        other = KeySet.generate(session.spec.ckks, ()).public_context  # new keys must wait
        answer = http.post("/v1/contexts", data=other)
        assert answer.status_code == 503
        assert "read-only" in answer.get_json()["error"]["message"]
        assert answer.headers["Retry-After"]
        _remount(mount, "rw")
        assert http.post("/v1/contexts", data=other).status_code == 201


def test_start_up_problems_print_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {**os.environ, "HE_SERVICE_KEY_STORE_DIR": str(blocker / "contexts")}
    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS_DIR / MODEL, models / MODEL)
    command = [sys.executable, "-m", "he_service.cli", "serve", "--models-dir", str(models)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("he-service: cannot create")
    # A quota database that is not a database.
    state = tmp_path / "state"
    (state / "contexts").mkdir(parents=True)
    (state / "quotas.sqlite3").write_bytes(b"garbage" * 1000)
    env = {
        **os.environ,
        "HE_SERVICE_KEY_STORE_DIR": str(state / "contexts"),
        "HE_SERVICE_API_TOKENS": "alice:" + "0" * 64,
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "cannot open the quota database" in done.stderr.strip().splitlines()[-1]


_LOADER = """
import sys, zstandard
import tenseal.sealapi as seal
from he_service.protocol import CkksParams, load_seal, save_seal, seal_context
params = CkksParams(8192, (60, 40, 40, 60), 40)
context = seal_context(params)
keygen = seal.KeyGenerator(context)
data = save_seal(keygen.create_relin_keys())
print("ready", flush=True)
while True:
    load_seal(seal.RelinKeys, data, context, what="relin_keys")
"""


def _shm_scratch() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir() if p.name.startswith("he-")} if shm.is_dir() else set()


def test_a_worker_killed_during_seal_loads_leaves_no_scratch_file() -> None:
    before = _shm_scratch()
    child = subprocess.Popen(
        [sys.executable, "-c", _LOADER], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # loads in a loop: the kill lands during one (no event to wait for)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert _shm_scratch() - before == set()


def test_named_scratch_files_of_dead_processes_are_swept(tmp_path: Path) -> None:
    dead = tmp_path / f"he-{_dead_pid()}-abcd"
    mine = tmp_path / f"he-{os.getpid()}-efgh"
    other = tmp_path / "he-unrelated"
    for path in (dead, mine, other):
        path.write_bytes(b"x")
    assert seal_io.sweep_scratch_files(str(tmp_path)) == 1
    assert not dead.exists() and mine.exists() and other.exists()
