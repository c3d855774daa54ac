"""Uploads: the parts of a request too large for one body, staged until the prediction."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from he_service.uploads._backend import (
    StagingBackend,
    StagingUnavailable,
    UploadIncomplete,
    UploadInfo,
    UploadNotFound,
)
from he_service.uploads._disk import DiskStaging
from he_service.uploads._redis import RedisStaging

if TYPE_CHECKING:
    from he_service.config import Config

__all__ = ["Uploads"]

log = logging.getLogger(__name__)


class Uploads:
    """Staged uploads, per owner, bounded in bytes and per-owner count, expiring.

    The parts live in a ``StagingBackend`` shared by every worker (a directory beside the
    contexts, or Redis), so the parts of one upload may reach different workers and hosts.
    An upload lives ``ttl_seconds`` after its creation or its last part; a prediction consumes
    it, whatever the outcome.

    Args:
        backend: where the parts live (``DiskStaging`` or ``RedisStaging``).
        max_bytes: bound on the bytes staged by all uploads of all owners.
        per_owner: open uploads one owner may have.
        ttl_seconds: life of an upload from its creation or its last part.
        clock: seconds since the epoch (tests pass a fake one).
    """

    def __init__(
        self,
        backend: StagingBackend,
        *,
        max_bytes: int,
        per_owner: int,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self._max_bytes, self._per_owner, self._ttl = max_bytes, per_owner, ttl_seconds
        self._clock = clock

    @classmethod
    def from_config(cls, config: Config) -> Uploads:
        """Build the uploads a configuration describes: Redis if ``redis_url``, else a directory.

        Leftovers of uploads that expired while no server ran are removed now.

        Raises:
            StagingUnavailable: the staging directory cannot be created.
        """
        backend: StagingBackend
        if config.redis_url:
            backend = RedisStaging(config.redis_url)
        else:
            backend = DiskStaging(config.key_store_dir / "uploads")
        uploads = cls(
            backend,
            max_bytes=config.uploads_max_bytes,
            per_owner=config.uploads_per_owner,
            ttl_seconds=config.uploads_ttl_seconds,
        )
        try:
            backend.sweep(now=uploads._clock())
        except StagingUnavailable as exc:  # a store that is down now may be up at the upload
            log.warning("could not sweep expired uploads: %s", exc)
        return uploads

    def create(self, owner: str, *, model: str, plan: str, context_id: str) -> UploadInfo:
        """Open an upload for one plan of one model and a stored context.

        Raises:
            TooManyUploads: the owner has ``per_owner`` open uploads.
            StagingUnavailable: the store failed.
        """
        now = self._clock()
        info = UploadInfo(
            owner=owner,
            upload_id=secrets.token_hex(16),
            model=model,
            plan=plan,
            context_id=context_id,
            created=now,
            expires_at=now + self._ttl,
        )
        self.backend.create(info, now=now, max_per_owner=self._per_owner)
        return info

    def put_part(
        self,
        owner: str,
        upload_id: str,
        index: int,
        data: bytes,
        *,
        ciphertexts: int,
        max_ciphertexts: int,
    ) -> UploadInfo:
        """Store one checked part (replacing a part of the same index) and extend the upload.

        Raises:
            UploadNotFound: no live upload of this id for this owner.
            UploadTooLarge: the parts would hold more than ``max_ciphertexts`` ciphertexts.
            StagingFull: the staged bytes of all owners would exceed the bound.
            StagingUnavailable: the store failed.
        """
        now = self._clock()
        return self.backend.put_part(
            owner,
            upload_id,
            index,
            data,
            ciphertexts,
            now=now,
            expires_at=now + self._ttl,
            max_ciphertexts=max_ciphertexts,
            max_bytes=self._max_bytes,
        )

    def info(self, owner: str, upload_id: str) -> UploadInfo:
        """Return a live upload of this owner.

        Raises:
            UploadNotFound: there is none.
        """
        info = self.backend.info(owner, upload_id, now=self._clock())
        if info is None:
            raise UploadNotFound(upload_id)
        return info

    @contextmanager
    def consume(self, owner: str, upload_id: str) -> Iterator[UploadInfo]:
        """Yield a live upload, then delete it, whatever happened meanwhile.

        Raises:
            UploadNotFound: there is none.
        """
        info = self.info(owner, upload_id)
        try:
            yield info
        finally:
            self.backend.delete(owner, upload_id, now=self._clock())

    def parts(self, info: UploadInfo) -> Iterator[bytes]:
        """Return an iterator over an upload's parts in index order, read one at a time.

        Raises:
            UploadIncomplete: no parts, or a gap in their indices (now); a part that vanished
                from the store (while iterating).
        """
        if not info.parts:
            raise UploadIncomplete(
                f"upload {info.upload_id} has no parts; send them with "
                f"PUT /v1/uploads/{info.upload_id}/parts/{{index}} first"
            )
        missing = sorted(set(range(max(info.parts) + 1)) - set(info.parts))
        if missing:
            raise UploadIncomplete(
                f"upload {info.upload_id} lacks parts {missing[:10]}; parts are numbered from 0 "
                "without gaps"
            )
        return self._read(info)

    def delete(self, owner: str, upload_id: str) -> bool:
        """Delete an upload and its parts; return whether a live one existed."""
        return self.backend.delete(owner, upload_id, now=self._clock())

    def close(self) -> None:
        self.backend.close()

    def _read(self, info: UploadInfo) -> Iterator[bytes]:
        for index in sorted(info.parts):
            data = self.backend.read_part(info.owner, info.upload_id, index)
            if data is None:
                raise UploadIncomplete(
                    f"part {index} of upload {info.upload_id} is gone (expired or evicted); "
                    "upload the request again"
                )
            yield data
