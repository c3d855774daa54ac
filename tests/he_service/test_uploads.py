"""Staged uploads: the backends (disk, Redis) and the request parts API in-process."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from he_service.uploads import (
    DiskStaging,
    RedisStaging,
    StagingBackend,
    StagingFull,
    TooManyUploads,
    UploadIncomplete,
    UploadNotFound,
    Uploads,
    UploadTooLarge,
)

ALICE, BOB = "alice", "bob"
TTL = 60
BREAST = "breast-cancer-mlp"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


BackendFactory = Callable[[], StagingBackend]


@pytest.fixture(params=["disk", "redis"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """Open the test's staging store; each call opens it again, as another worker would."""
    if request.param == "disk":
        return lambda: DiskStaging(tmp_path / "uploads")
    url = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex}:"
    return lambda: RedisStaging(url, prefix=prefix)


def _uploads(backend: StagingBackend, clock: Clock, **kw: Any) -> Uploads:
    settings: dict[str, Any] = {"max_bytes": 1 << 20, "per_owner": 2, "ttl_seconds": TTL, **kw}
    return Uploads(backend, clock=clock, **settings)


def _open(uploads: Uploads, owner: str = ALICE) -> str:
    return uploads.create(owner, model="m", plan="batch", context_id="c" * 64).upload_id


# --- both backends -----------------------------------------------------------------------------


def test_parts_are_stored_replaced_read_in_order_and_consumed(make_backend: BackendFactory) -> None:
    clock = Clock()
    uploads = _uploads(make_backend(), clock)
    upload_id = _open(uploads)
    assert len(upload_id) == 32
    clock.now += 10
    uploads.put_part(ALICE, upload_id, 1, b"second", ciphertexts=2, max_ciphertexts=8)
    info = uploads.put_part(ALICE, upload_id, 0, b"first!", ciphertexts=3, max_ciphertexts=8)
    assert info.expires_at == clock.now + TTL  # each part extends the upload's life
    info = uploads.put_part(ALICE, upload_id, 0, b"first", ciphertexts=1, max_ciphertexts=8)
    assert info.parts == {0: (1, 5), 1: (2, 6)} and info.ciphertexts == 3 and info.size == 11
    other = _uploads(make_backend(), clock)  # another worker sees the same upload
    assert other.info(ALICE, upload_id) == info
    with pytest.raises(UploadNotFound):
        other.info(BOB, upload_id)  # uploads are per owner
    with other.consume(ALICE, upload_id) as staged:
        assert list(other.parts(staged)) == [b"first", b"second"]
    with pytest.raises(UploadNotFound):
        uploads.info(ALICE, upload_id)
    assert not uploads.delete(ALICE, upload_id)


def test_bounds_per_upload_per_owner_and_in_all(make_backend: BackendFactory) -> None:
    clock = Clock()
    uploads = _uploads(make_backend(), clock, max_bytes=100)
    first = _open(uploads)
    clock.now += 5
    second = _open(uploads)
    with pytest.raises(TooManyUploads) as too_many:
        _open(uploads)
    assert too_many.value.retry_after == TTL - 5 + 1  # until the first one expires
    _open(uploads, BOB)  # another owner has their own count
    with pytest.raises(UploadTooLarge):
        uploads.put_part(ALICE, first, 0, b"x", ciphertexts=9, max_ciphertexts=8)
    uploads.put_part(ALICE, first, 0, b"x" * 60, ciphertexts=1, max_ciphertexts=8)
    with pytest.raises(StagingFull):
        uploads.put_part(ALICE, second, 0, b"x" * 41, ciphertexts=1, max_ciphertexts=8)
    uploads.put_part(ALICE, first, 0, b"x" * 90, ciphertexts=1, max_ciphertexts=8)  # replaces
    assert uploads.delete(ALICE, first)
    uploads.put_part(ALICE, second, 0, b"x" * 100, ciphertexts=1, max_ciphertexts=8)
    with pytest.raises(UploadNotFound):
        uploads.put_part(ALICE, "0" * 32, 0, b"x", ciphertexts=1, max_ciphertexts=8)
    with pytest.raises(UploadNotFound):
        uploads.info(ALICE, "../../etc/passwd")


def test_expired_uploads_are_removed_and_free_their_bytes(make_backend: BackendFactory) -> None:
    clock = Clock()
    uploads = _uploads(make_backend(), clock, max_bytes=100)
    stale = _open(uploads)
    uploads.put_part(ALICE, stale, 0, b"x" * 100, ciphertexts=1, max_ciphertexts=8)
    clock.now += TTL + 1  # the client was killed mid-upload
    with pytest.raises(UploadNotFound):
        uploads.info(ALICE, stale)
    fresh = _open(uploads)  # sweeps the stale one: its bytes count no more
    uploads.put_part(ALICE, fresh, 0, b"y" * 100, ciphertexts=1, max_ciphertexts=8)
    clock.now += TTL + 1
    uploads.backend.sweep(now=clock.now)
    assert not uploads.delete(ALICE, fresh)


def test_gaps_and_vanished_parts_are_incomplete(make_backend: BackendFactory) -> None:
    clock = Clock()
    uploads = _uploads(make_backend(), clock)
    upload_id = _open(uploads)
    with pytest.raises(UploadIncomplete, match="no parts"):
        uploads.parts(uploads.info(ALICE, upload_id))
    uploads.put_part(ALICE, upload_id, 0, b"a", ciphertexts=1, max_ciphertexts=8)
    uploads.put_part(ALICE, upload_id, 2, b"c", ciphertexts=1, max_ciphertexts=8)
    with pytest.raises(UploadIncomplete, match=r"lacks parts \[1\]"):
        uploads.parts(uploads.info(ALICE, upload_id))


# --- disk: leftovers and several processes -----------------------------------------------------


def test_disk_removes_every_file_of_an_expired_upload(tmp_path: Path) -> None:
    clock = Clock()
    root = tmp_path / "uploads"
    uploads = _uploads(DiskStaging(root), clock)
    upload_id = _open(uploads)
    uploads.put_part(ALICE, upload_id, 0, b"x", ciphertexts=1, max_ciphertexts=8)
    (folder,) = root.glob(f"*/{upload_id}")
    (folder / ".tmp-dead-writer").write_bytes(b"half a part")  # a writer killed mid-part
    clock.now += TTL + 1
    uploads.backend.sweep(now=clock.now)
    assert not folder.exists()


def _put_parts(root: str, upload_id: str, first: int, count: int) -> int:
    uploads = Uploads(DiskStaging(Path(root)), max_bytes=1000, per_owner=2, ttl_seconds=TTL)
    stored = 0
    for index in range(first, first + count):
        try:
            uploads.put_part(ALICE, upload_id, index, b"x" * 100, ciphertexts=1, max_ciphertexts=64)
            stored += 1
        except StagingFull:
            pass
    return stored


def test_disk_bounds_hold_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "uploads"
    uploads = Uploads(DiskStaging(root), max_bytes=1000, per_owner=2, ttl_seconds=TTL)
    upload_id = _open(uploads)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        stored = pool.starmap(_put_parts, [(str(root), upload_id, 8 * i, 8) for i in range(4)])
    assert sum(stored) == 10  # exactly what 1000 bytes hold, whichever processes won
    assert uploads.info(ALICE, upload_id).size == 1000
    assert not list(root.glob("*/*/.tmp-*"))
