"""Contexts in a directory shared by the worker processes of one host.

Layout (``<owner>`` is the sha256 hex of the owner name, ``<id>`` the context id)::

    <directory>/.lock               flock held while entries are added, extended or removed
    <directory>/<owner>/<id>.bin    the uploaded bytes
    <directory>/<owner>/<id>.json   owner, context id, size, created, expires_at; mtime = last use

Every file is written to a private temporary file in the same directory and renamed over its
target (``os.replace`` is atomic), so a reader sees the old or the new file, never a torn one;
an open file keeps its data even if another process deletes or replaces it meanwhile. The
``.json`` file is the commit record: it is written after the ``.bin`` file and removed before
it, so an entry whose record exists has its bytes unless a process died in between (the entry
then counts as absent and the next ``store`` removes the leftover). Reads take no lock; a use only
updates the record's mtime (one ``utime`` call), and is not recorded at all when the storage
cannot be written (read-only, full): reads keep being served, writes answer 503.

Temporary files are named ``.tmp-<pid>-<random>``: a write that fails removes its own, and
opening the store removes those of processes that no longer exist (a crash, ``kill -9``), so a
full disk recovers by itself once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from he_service.errors import NotReady
from he_service.keystore._backend import (
    EntryInfo,
    StorageBackend,
    check_context_id,
    is_context_id,
    owner_key,
)
from he_service.tempfiles import TMP_PREFIX, tmp_prefix, writer_is_dead

__all__ = ["DiskBackend"]

log = logging.getLogger(__name__)

# Temporary files are written outside the lock; one older than this belongs to a dead process
# (the sweep at start-up does not wait: it reads the writer's pid from the name).
_STALE_TMP_SECONDS = 3600.0
_MAX_RECORD_BYTES = 1 << 16


class DiskBackend(StorageBackend):
    """Store contexts as files under ``directory`` (created with mode 0700 if missing)."""

    def __init__(self, directory: Path) -> None:
        """Open the store, creating its directory, and remove dead writers' temporary files.

        A store that can be read but not written (read-only, full) opens: it serves what it
        holds and answers writes with 503.

        Raises:
            NotReady: the directory cannot be created, is not a directory, or cannot be read.
        """
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise NotReady(
                f"cannot create the context store directory {self.directory}: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.R_OK | os.X_OK):
            raise NotReady(f"the context store directory {self.directory} cannot be read")
        try:
            removed = self.sweep_temporary_files()
        except (OSError, NotReady) as exc:
            log.warning("the context store %s is not writable: %s", self.directory, exc)
        else:
            if removed:
                log.info("removed %d temporary files of dead processes", removed)

    def __repr__(self) -> str:
        return f"DiskBackend({str(self.directory)!r})"

    def store(
        self,
        owner: str,
        context_id: str,
        data: bytes,
        *,
        now: float,
        expires_at: float,
        max_entries: int,
        max_bytes: int,
    ) -> bool:
        record_path, blob_path = self._paths(owner, context_id)
        # The slow write happens before the lock, so uploads only serialize on bookkeeping.
        tmp = self._write_tmp(blob_path.parent, data)
        moved = False
        try:
            with self._locked():
                entries = self._sweep(now)
                existing = entries.pop(record_path, None)
                if existing is not None:
                    self._write_record(record_path, replace(existing, expires_at=expires_at), now)
                    return False
                count, total = len(entries), sum(e.size for e in entries.values())
                for path, entry in sorted(entries.items(), key=lambda item: _lru_key(item[1])):
                    if count + 1 <= max_entries and total + len(data) <= max_bytes:
                        break
                    self._remove(path)
                    count, total = count - 1, total - entry.size
                os.replace(tmp, blob_path)
                moved = True
                info = EntryInfo(owner, context_id, len(data), now, expires_at, now)
                self._write_record(record_path, info, now)
                return True
        except OSError as exc:
            raise _write_error(exc) from None
        finally:
            if not moved:
                _unlink(Path(tmp))

    def touch(
        self, owner: str, context_id: str, *, now: float, expires_at: float | None = None
    ) -> EntryInfo | None:
        record_path, blob_path = self._paths(owner, context_id)
        info = _read_record(record_path)
        if info is None or info.owner != owner or not blob_path.exists():
            return None
        if info.expires_at <= now and expires_at is None:
            try:
                return self._touch_locked(record_path, now, None)
            except NotReady:
                return None  # cannot remove it now (read-only): it is expired all the same
        if expires_at is not None:
            return self._touch_locked(record_path, now, expires_at)
        try:
            os.utime(record_path, ns=(_ns(now), _ns(now)))
        except FileNotFoundError:
            return None  # deleted or evicted by another process just now
        except OSError as exc:
            # Read-only or full storage: serve the read; the entry's LRU age stays as it was.
            log.debug("cannot mark context %s… used: %s", context_id[:12], exc.strerror)
        return replace(info, last_used=now)

    def read(self, owner: str, context_id: str) -> bytes | None:
        _, blob_path = self._paths(owner, context_id)
        try:
            return blob_path.read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, owner: str, context_id: str, *, now: float) -> bool:
        record_path, _ = self._paths(owner, context_id)
        try:
            with self._locked():
                info = _read_record(record_path)
                self._remove(record_path)
        except OSError as exc:
            raise _write_error(exc) from None
        return info is not None and info.owner == owner and info.expires_at > now

    def stats(self, *, now: float) -> tuple[int, int]:
        live = [info for _, info in self._records() if info is not None and info.expires_at > now]
        return len(live), sum(info.size for info in live)

    def _touch_locked(
        self, record_path: Path, now: float, expires_at: float | None
    ) -> EntryInfo | None:
        with self._locked():
            info = _read_record(record_path)  # again: another process may have changed it
            if info is None:
                return None
            if info.expires_at <= now:
                try:
                    self._remove(record_path)
                except OSError as exc:
                    raise _write_error(exc) from None
                return None
            if expires_at is not None:
                info = replace(info, expires_at=expires_at)
                self._write_record(record_path, info, now)
            else:
                with contextlib.suppress(OSError):  # read-only: the read is served regardless
                    os.utime(record_path, ns=(_ns(now), _ns(now)))
            return replace(info, last_used=now)

    def _paths(self, owner: str, context_id: str) -> tuple[Path, Path]:
        folder = self.directory / owner_key(owner)
        name = check_context_id(context_id)
        return folder / f"{name}.json", folder / f"{name}.bin"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock belongs to the open file description: threads of one process, each opening the
        # file, exclude each other as separate processes do; closing releases it, even on crash.
        try:
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _write_error(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _records(self) -> Iterator[tuple[Path, EntryInfo | None]]:
        """Yield every record file with its content (None: damaged or not ours)."""
        for folder in _scandir(self.directory):
            if not (is_context_id(folder.name) and folder.is_dir(follow_symlinks=False)):
                continue
            for item in _scandir(Path(folder.path)):
                if item.name.endswith(".json") and is_context_id(item.name[:-5]):
                    yield Path(item.path), _read_record(Path(item.path))

    def _sweep(self, now: float) -> dict[Path, EntryInfo]:
        """Under the lock: drop expired entries and leftovers; return the live entries."""
        live: dict[Path, EntryInfo] = {}
        for path, info in self._records():
            # Under the lock no write is half done: a record without bytes is a dead process's.
            if info is None or info.expires_at <= now or not path.with_suffix(".bin").exists():
                self._remove(path)
            else:
                live[path] = info
        wall = time.time()
        for folder in _scandir(self.directory):
            if not (is_context_id(folder.name) and folder.is_dir(follow_symlinks=False)):
                continue
            for item in _scandir(Path(folder.path)):
                path = Path(item.path)
                if item.name.endswith(".bin") and path.with_suffix(".json") not in live:
                    _unlink(path)  # bytes of an entry whose record is gone
                elif item.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if (
                            writer_is_dead(item.name)
                            or wall - item.stat().st_mtime > _STALE_TMP_SECONDS
                        ):
                            _unlink(path)
        return live

    def _remove(self, record_path: Path) -> None:
        _unlink(record_path)  # the record first: from here on the entry does not exist
        _unlink(record_path.with_suffix(".bin"))

    def sweep_temporary_files(self) -> int:
        """Remove temporary files whose writer process is gone; return how many.

        Raises:
            NotReady: the store cannot be locked (read-only, or not ours).
            OSError: a file cannot be removed.
        """
        removed = 0
        with self._locked():
            for folder in _scandir(self.directory):
                if not (is_context_id(folder.name) and folder.is_dir(follow_symlinks=False)):
                    continue
                for item in _scandir(Path(folder.path)):
                    if item.name.startswith(TMP_PREFIX) and writer_is_dead(item.name):
                        _unlink(Path(item.path))
                        removed += 1
        return removed

    def _write_tmp(self, folder: Path, data: bytes) -> str:
        tmp = None
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(), dir=folder)  # mode 0600
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            if tmp is not None:  # a full disk must not stay full because of our leftovers
                _unlink(Path(tmp))
            raise _write_error(exc) from None
        return tmp

    def _write_record(self, record_path: Path, info: EntryInfo, now: float) -> None:
        record = {
            "owner": info.owner,
            "context_id": info.context_id,
            "size": info.size,
            "created": info.created,
            "expires_at": info.expires_at,
        }
        tmp = self._write_tmp(record_path.parent, json.dumps(record).encode())
        try:
            os.utime(tmp, ns=(_ns(now), _ns(now)))  # mtime survives the rename
            os.replace(tmp, record_path)
        except OSError as exc:
            raise _write_error(exc) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _write_error(exc: OSError) -> NotReady:
    """Return the 503 for a write the storage refused, naming the condition."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NotReady(
            f"the context store is full ({exc.strerror}); uploads resume when space is freed. "
            "Stored contexts can still be used",
            retry_after=30,
        )
    if exc.errno == errno.EROFS:
        return NotReady(
            "the context store is read-only; uploads and deletions resume when it is writable. "
            "Stored contexts can still be used",
            retry_after=30,
        )
    return NotReady(f"the context store cannot write: {exc.strerror}", retry_after=5)


def _read_record(path: Path) -> EntryInfo | None:
    try:
        with open(path, "rb") as handle:
            # fstat of the open file: its mtime belongs to the same version as its content
            mtime = os.fstat(handle.fileno()).st_mtime_ns / 1e9
            raw = handle.read(_MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    try:
        record: Any = json.loads(raw)
        return EntryInfo(
            owner=str(record["owner"]),
            context_id=str(record["context_id"]),
            size=int(record["size"]),
            created=float(record["created"]),
            expires_at=float(record["expires_at"]),
            last_used=mtime,
        )
    except (ValueError, TypeError, KeyError):
        return None  # not ours or damaged: ignored, so the entry is absent


def _lru_key(info: EntryInfo) -> tuple[float, float]:
    return info.last_used, info.created


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
