"""Upload parts in a directory shared by the worker processes of one host.

Layout (``<owner>`` is the sha256 hex of the owner name)::

    <directory>/.lock                        flock held while uploads are added or changed
    <directory>/<owner>/<upload_id>/upload.json   the upload's record and its parts' sizes
    <directory>/<owner>/<upload_id>/<index>.part  one part's bytes

A part is written to a private temporary file in its upload's directory outside the lock,
then renamed into place and recorded under the lock, so a reader sees the old or the new part,
never a torn one. Removing an upload removes its directory, temporary files of dead writers
included; every ``create`` and ``put_part`` first removes expired uploads of every owner.
Temporary files are named ``.tmp-<pid>-<random>``: a failed write removes its own, and opening
the staging area removes those of processes that no longer exist. Full or read-only storage
answers ``StagingUnavailable`` (503) naming the condition.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from he_service.keystore._backend import owner_key
from he_service.tempfiles import TMP_PREFIX, tmp_prefix, writer_is_dead
from he_service.uploads._backend import (
    StagingBackend,
    StagingFull,
    StagingUnavailable,
    TooManyUploads,
    UploadInfo,
    UploadNotFound,
    UploadTooLarge,
    check_upload_id,
    is_upload_id,
)

__all__ = ["DiskStaging"]

log = logging.getLogger(__name__)

_RECORD = "upload.json"
_MAX_RECORD_BYTES = 1 << 20


class DiskStaging(StagingBackend):
    """Stage parts as files under ``directory`` (created with mode 0700 if missing)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StagingUnavailable(
                f"cannot create the upload staging directory {self.directory}: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.R_OK | os.X_OK):
            raise StagingUnavailable(
                f"the upload staging directory {self.directory} cannot be read"
            )
        try:
            removed = self.sweep_temporary_files()
        except (OSError, StagingUnavailable) as exc:
            log.warning("the upload staging area %s is not writable: %s", self.directory, exc)
        else:
            if removed:
                log.info("removed %d temporary upload files of dead processes", removed)

    def __repr__(self) -> str:
        return f"DiskStaging({str(self.directory)!r})"

    def create(self, info: UploadInfo, *, now: float, max_per_owner: int) -> None:
        folder = self._folder(info.owner, info.upload_id)
        with self._reporting(), self._locked():
            mine = [u for u in self._sweep_locked(now).values() if u.owner == info.owner]
            if len(mine) >= max_per_owner:
                soonest = min(u.expires_at for u in mine)
                raise TooManyUploads(max_per_owner, _seconds(soonest - now))
            folder.mkdir(mode=0o700, parents=True)
            try:
                self._write_record(folder, info)
            except OSError:
                shutil.rmtree(folder, ignore_errors=True)
                raise

    def put_part(
        self,
        owner: str,
        upload_id: str,
        index: int,
        data: bytes,
        ciphertexts: int,
        *,
        now: float,
        expires_at: float,
        max_ciphertexts: int,
        max_bytes: int,
    ) -> UploadInfo:
        folder = self._folder(owner, upload_id)
        with self._reporting():
            try:
                fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), dir=folder)  # mode 0600
            except FileNotFoundError:
                raise UploadNotFound(upload_id) from None
            try:
                # The slow write happens before the lock, so parts only serialize on bookkeeping.
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                with self._locked():
                    live = self._sweep_locked(now)
                    info = live.get(folder)
                    if info is None or info.owner != owner:
                        raise UploadNotFound(upload_id)
                    old_count, old_size = info.parts.get(index, (0, 0))
                    count = info.ciphertexts - old_count + ciphertexts
                    if count > max_ciphertexts:
                        raise UploadTooLarge(count, max_ciphertexts)
                    staged = sum(u.size for u in live.values()) - old_size + len(data)
                    if staged > max_bytes:
                        soonest = min(u.expires_at for u in live.values())
                        raise StagingFull(max_bytes, _seconds(soonest - now))
                    os.replace(tmp, folder / f"{index}.part")
                    parts = {**info.parts, index: (ciphertexts, len(data))}
                    info = replace(info, expires_at=expires_at, parts=parts)
                    self._write_record(folder, info)
                    return info
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def info(self, owner: str, upload_id: str, *, now: float) -> UploadInfo | None:
        info = _read_record(self._folder(owner, upload_id))
        if info is None or info.owner != owner or info.expires_at <= now:
            return None
        return info

    def read_part(self, owner: str, upload_id: str, index: int) -> bytes | None:
        path = self._folder(owner, upload_id) / f"{index}.part"
        with self._reporting():
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

    def delete(self, owner: str, upload_id: str, *, now: float) -> bool:
        folder = self._folder(owner, upload_id)
        with self._reporting(), self._locked():
            info = _read_record(folder)
            shutil.rmtree(folder, ignore_errors=True)
        return info is not None and info.owner == owner and info.expires_at > now

    def sweep(self, *, now: float) -> None:
        with self._reporting(), self._locked():
            self._sweep_locked(now)

    def sweep_temporary_files(self) -> int:
        """Remove temporary part files whose writer process is gone; return how many."""
        removed = 0
        with self._reporting(), self._locked():
            for owner_dir in _scandir(self.directory):
                if not owner_dir.is_dir(follow_symlinks=False):
                    continue
                for upload in _scandir(Path(owner_dir.path)):
                    if not upload.is_dir(follow_symlinks=False):
                        continue
                    for item in _scandir(Path(upload.path)):
                        if item.name.startswith(TMP_PREFIX) and writer_is_dead(item.name):
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(item.path)
                            removed += 1
        return removed

    def _folder(self, owner: str, upload_id: str) -> Path:
        return self.directory / owner_key(owner) / check_upload_id(upload_id)

    def _sweep_locked(self, now: float) -> dict[Path, UploadInfo]:
        """Under the lock: remove expired or damaged uploads; return the live ones."""
        live: dict[Path, UploadInfo] = {}
        for owner_dir in _scandir(self.directory):
            if not owner_dir.is_dir(follow_symlinks=False):
                continue
            for item in _scandir(Path(owner_dir.path)):
                folder = Path(item.path)
                if not (is_upload_id(item.name) and item.is_dir(follow_symlinks=False)):
                    continue
                info = _read_record(folder)
                # Under the lock no create is half done: a folder without a record is a dead
                # process's.
                if info is None or info.expires_at <= now:
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    live[folder] = info
        return live

    def _write_record(self, folder: Path, info: UploadInfo) -> None:
        record = {**asdict(info), "parts": {str(i): list(p) for i, p in info.parts.items()}}
        fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), dir=folder)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            os.replace(tmp, folder / _RECORD)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock belongs to the open file description: threads and processes exclude each other.
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _reporting(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _unavailable(exc) from None


def _unavailable(exc: OSError) -> StagingUnavailable:
    """Return the 503 for an operation the storage refused, naming the condition."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StagingUnavailable(
            f"the upload staging area is full ({exc.strerror}); parts are accepted again when "
            "space is freed",
            retry_after=30,
        )
    if exc.errno == errno.EROFS:
        return StagingUnavailable(
            "the upload staging area is read-only; uploads resume when it is writable",
            retry_after=30,
        )
    return StagingUnavailable(
        f"the upload staging directory is not usable: {exc.strerror}; retry later", retry_after=5
    )


def _read_record(folder: Path) -> UploadInfo | None:
    try:
        with open(folder / _RECORD, "rb") as handle:
            raw = handle.read(_MAX_RECORD_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        record: Any = json.loads(raw)
        return UploadInfo(
            owner=str(record["owner"]),
            upload_id=str(record["upload_id"]),
            model=str(record["model"]),
            plan=str(record["plan"]),
            context_id=str(record["context_id"]),
            created=float(record["created"]),
            expires_at=float(record["expires_at"]),
            parts={int(i): (int(p[0]), int(p[1])) for i, p in record["parts"].items()},
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None  # damaged or not ours: the upload counts as absent


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _seconds(delta: float) -> int:
    return max(1, int(delta) + 1)
