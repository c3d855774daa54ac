"""Staged uploads: the backends (disk, Redis) and the request parts API in-process."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flask import Flask

from clients import BadRequestError, HEClient, ModelSession, NotFoundError, PayloadTooLargeError
from he_service import create_app
from he_service.artifacts import load_artifact
from he_service.config import DEFAULT_MODELS_DIR
from he_service.engine import forward_plain
from he_service.protocol import encode_frames, preprocess
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


# --- the HTTP API in-process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """Limits so low that one batch group of breast-cancer-mlp (30 ciphertexts) needs parts."""
    return create_app(
        {
            "max_batch_bytes": 2 << 20,
            "max_part_bytes": 1 << 20,
            "key_store_dir": tmp_path_factory.mktemp("contexts"),
        }
    )


@pytest.fixture(scope="module")
def small_client(small_app: Flask) -> Iterator[HEClient]:
    with HEClient("http://testserver", transport=httpx.WSGITransport(app=small_app)) as client:
        yield client


@pytest.fixture(scope="module")
def breast_batch(small_client: HEClient) -> ModelSession:
    return small_client.model(BREAST, plan="batch")


def _plain(raw: np.ndarray) -> np.ndarray:
    artifact = load_artifact(DEFAULT_MODELS_DIR / BREAST)
    return np.stack(
        [forward_plain(artifact, preprocess(x, artifact.preprocessing, (30,))) for x in raw]
    )


def test_a_group_larger_than_one_body_goes_in_parts_through_the_sdk(
    small_app: Flask, breast_batch: ModelSession
) -> None:
    spec = breast_batch.spec
    assert spec.costs.request_bytes_per_unit > spec.limits.max_request_bytes  # must be split
    from models.datasets import load_breast_cancer_split

    raw = load_breast_cancer_split(0).x_test[:40]
    logits = breast_batch.predict_many(raw)
    np.testing.assert_allclose(logits, _plain(raw), atol=1e-2)
    assert breast_batch.last_timings["server_affine"] > 0
    # The prediction consumed the upload: nothing stays staged.
    staging = small_app.extensions["he_service"].uploads.backend.directory
    assert not list(staging.glob("*/*"))


class _LoseFirstAnswer(httpx.WSGITransport):
    """Forward every request, but drop the first upload prediction's answer on its way back."""

    lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/predict") and "/uploads/" in request.url.path:
            if not self.lost:
                self.lost += 1
                raise httpx.RemoteProtocolError("Server disconnected", request=request)
        return response


def test_an_upload_whose_answer_was_lost_is_sent_again(small_app: Flask) -> None:
    """The server evaluated and deleted the upload; the retry's 404 makes the SDK resend it."""
    from clients import Retry

    transport = _LoseFirstAnswer(app=small_app)
    retry = Retry(sleep=lambda _: None)
    with HEClient("http://testserver", transport=transport, retry=retry) as client:
        session = client.model(BREAST, plan="batch")
        from models.datasets import load_breast_cancer_split

        raw = load_breast_cancer_split(0).x_test[:10]
        logits = session.predict_many(raw)
    assert transport.lost == 1
    np.testing.assert_allclose(logits, _plain(raw), atol=1e-2)


def _raw(app: Flask, method: str, path: str, **kwargs: Any) -> Any:
    return app.test_client().open(path, method=method, **kwargs)


def test_the_parts_protocol_step_by_step(small_app: Flask, breast_batch: ModelSession) -> None:
    headers = {"X-Context-Id": breast_batch.context_id}
    created = _raw(small_app, "POST", f"/v1/models/{BREAST}/uploads?plan=batch", headers=headers)
    assert created.status_code == 201, created.data
    upload = created.get_json()
    assert upload["parts"] == 0 and upload["max_part_bytes"] == 1 << 20
    assert upload["max_ciphertexts"] == 60  # two groups: the batch sample limit is 8192
    upload_id = upload["upload_id"]
    group = breast_batch.encrypt(np.zeros(30))
    assert len(group) == 30
    for index, first in enumerate(range(0, 30, 3)):
        answer = _raw(
            small_app,
            "PUT",
            f"/v1/uploads/{upload_id}/parts/{index}",
            data=encode_frames(group[first : first + 3]),
        )
        assert answer.status_code == 200, answer.data
    assert answer.get_json()["ciphertexts"] == 30 and answer.get_json()["parts"] == 10
    result = _raw(small_app, "POST", f"/v1/uploads/{upload_id}/predict")
    assert result.status_code == 200, result.data
    assert result.mimetype == "application/vnd.he-inference.frames"
    assert "affine;dur=" in result.headers["Server-Timing"]
    gone = _raw(small_app, "POST", f"/v1/uploads/{upload_id}/predict")
    assert gone.status_code == 404 and gone.get_json()["error"]["code"] == "upload_not_found"


def _send(client: HEClient, upload_id: str, ciphertexts: list[bytes]) -> None:
    """Send ciphertexts as parts of 3 (about 790 KB, under the 1 MiB part limit)."""
    for index, first in enumerate(range(0, len(ciphertexts), 3)):
        client.upload_part(upload_id, index, ciphertexts[first : first + 3])


def test_bad_parts_are_refused(small_client: HEClient, breast_batch: ModelSession) -> None:
    one = breast_batch.keys.encrypt(np.zeros(4096))
    upload_id = small_client.create_upload(BREAST, breast_batch.context_id, plan="batch")[
        "upload_id"
    ]
    with pytest.raises(PayloadTooLargeError, match="upload part exceeds"):
        small_client.upload_part(upload_id, 0, [one] * 10)  # 10 ciphertexts: over 1 MiB
    with pytest.raises(BadRequestError, match="beyond the 60 parts"):
        small_client.upload_part(upload_id, 60, [one])
    with pytest.raises(BadRequestError, match="not a framed message"):
        small_client._request("PUT", f"/v1/uploads/{upload_id}/parts/0", content=b"junk")
    small_client.upload_part(upload_id, 0, [one] * 3)
    with pytest.raises(PayloadTooLargeError, match="limit of 60 ciphertexts"):
        for index in range(1, 21):
            small_client.upload_part(upload_id, index, [one] * 3)
    small_client.delete_upload(upload_id)
    with pytest.raises(NotFoundError, match="no upload"):
        small_client.delete_upload(upload_id)


def test_an_incomplete_upload_is_refused_and_consumed(
    small_client: HEClient, breast_batch: ModelSession
) -> None:
    one = breast_batch.keys.encrypt(np.zeros(4096))
    upload_id = small_client.create_upload(BREAST, breast_batch.context_id, plan="batch")[
        "upload_id"
    ]
    small_client.upload_part(upload_id, 0, [one] * 3)
    small_client.upload_part(upload_id, 2, [one] * 3)
    with pytest.raises(BadRequestError, match=r"lacks parts \[1\]"):
        small_client.predict_upload(upload_id)
    with pytest.raises(NotFoundError):
        small_client.predict_upload(upload_id)
    upload_id = small_client.create_upload(BREAST, breast_batch.context_id, plan="batch")[
        "upload_id"
    ]
    _send(small_client, upload_id, [one] * 29)  # not a whole group
    with pytest.raises(BadRequestError, match="takes 30 ciphertexts per group"):
        small_client.predict_upload(upload_id)


def test_lost_keys_keep_the_upload_until_they_are_back(
    small_client: HEClient, breast_batch: ModelSession
) -> None:
    group = breast_batch.encrypt(np.zeros(30))
    upload_id = small_client.create_upload(BREAST, breast_batch.context_id, plan="batch")[
        "upload_id"
    ]
    _send(small_client, upload_id, group)
    small_client.delete_context(breast_batch.context_id)  # evicted while the parts went up
    with pytest.raises(NotFoundError, match="no context"):
        small_client.predict_upload(upload_id)
    small_client.upload_context(breast_batch.public_context())
    outputs, _ = small_client.predict_upload(upload_id)
    assert len(outputs) == 2


def test_uploads_need_a_known_model_plan_and_context(
    small_client: HEClient, breast_batch: ModelSession
) -> None:
    from clients import ModelNotFoundError, ParameterMismatchError

    with pytest.raises(ModelNotFoundError):
        small_client.create_upload("nope", breast_batch.context_id, plan="batch")
    with pytest.raises(BadRequestError, match="not 'fastest'"):
        small_client.create_upload(BREAST, breast_batch.context_id, plan="fastest")
    with pytest.raises(NotFoundError, match="no context"):
        small_client.create_upload(BREAST, "0" * 64, plan="batch")
    with pytest.raises(ParameterMismatchError, match="latency plan"):
        small_client.create_upload(BREAST, breast_batch.context_id, plan="latency")
