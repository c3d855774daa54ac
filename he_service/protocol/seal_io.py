"""Move SEAL objects to and from bytes safely.

SEAL's Python binding saves and loads through file paths only, so bytes pass through a scratch
file. On Linux that file is anonymous (``memfd_create``, opened by SEAL as ``/proc/self/fd/N``):
it has no name, so a worker killed during a load (``kill -9``) leaves nothing behind. Elsewhere
it is a private temporary file named ``he-<pid>-...``, and ``sweep_scratch_files`` removes the
ones of dead processes.

Before SEAL sees client bytes we check its 16-byte header and inflate zstd ourselves, straight
into the scratch file in chunks, with a hard output bound: SEAL would inflate a compression
bomb without limit. The bound is ``MAX_INFLATE_RATIO`` times the input, or less when the caller
knows how large the object can be (``max_bytes``: a key of the plan's parameters, a fresh
ciphertext); a zstd frame that declares more than that is refused before any inflation.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import tenseal.sealapi as seal
import zstandard

from he_service.protocol.errors import ProtocolError

__all__ = ["MAX_INFLATE_RATIO", "load_seal", "save_seal", "sweep_scratch_files"]

_HEADER = struct.Struct("<HBBBBHQ")
_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# Legitimate SEAL data (coefficients below 2^60 in 64-bit words) inflates 1-4x; anything beyond
# this ratio is a bomb, not a key or ciphertext.
MAX_INFLATE_RATIO = 8
_INFLATE_CHUNK = 1 << 20
# mkstemp makes private (0600), unpredictable names, so a shared tmpfs is safe and fast.
_SHM = "/dev/shm"  # noqa: S108
_TMP_DIR = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
_SCRATCH_PREFIX = "he-"
_USE_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class _Loadable(Protocol):
    def load(self, context: seal.SEALContext, path: str) -> None: ...


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


T = TypeVar("T", bound=_Loadable)


@contextlib.contextmanager
def _scratch() -> Iterator[tuple[int, str]]:
    """Yield an open, empty, private scratch file: its descriptor and a path SEAL can open."""
    if _USE_MEMFD:
        try:
            fd = os.memfd_create("he-seal", os.MFD_CLOEXEC)
        except OSError:
            pass  # e.g. a seccomp profile without memfd_create: fall back to a named file
        else:
            try:
                yield fd, f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
    fd, path = tempfile.mkstemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=_TMP_DIR)
    try:
        yield fd, path
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def sweep_scratch_files(directory: str | None = None) -> int:
    """Remove named scratch files (``he-<pid>-...``) of processes that no longer exist.

    Only used when anonymous files are unavailable; a no-op elsewhere. Returns how many.
    """
    folder = Path(directory or _TMP_DIR or tempfile.gettempdir())
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        pid_text = entry.name[len(_SCRATCH_PREFIX) :].split("-", 1)[0]
        if not (entry.name.startswith(_SCRATCH_PREFIX) and pid_text.isdigit()):
            continue
        if int(pid_text) == os.getpid() or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed += 1
        except PermissionError:
            pass  # another user's live process
    return removed


def save_seal(obj: _Saveable | Any) -> bytes:
    """Serialize a SEAL object (or SEAL ``Serializable``: seeded, half size) with zstd."""
    with _scratch() as (fd, path):
        obj.save(path)
        size = os.fstat(fd).st_size
        chunks = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(size - offset, 1 << 26), offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)


def load_seal(
    kind: type[T],
    data: bytes,
    context: seal.SEALContext,
    *,
    what: str,
    max_bytes: int | None = None,
) -> T:
    """Check and load client bytes as a SEAL object valid for ``context``.

    Args:
        kind: the SEAL class, e.g. ``seal.Ciphertext``.
        data: the serialized object.
        context: the SEAL context the object must belong to.
        what: a name for error messages ("input ciphertext 0").
        max_bytes: the largest the uncompressed object can legitimately be; more is refused
            before SEAL (or, when the zstd frame declares its size, zstd) sees it.

    Returns:
        The loaded object.

    Raises:
        ProtocolError: bad header, bomb, too large, or SEAL finds the data invalid.
    """
    with _scratch() as (fd, path):
        _write_uncompressed(fd, data, what, max_bytes)
        obj = kind()
        try:
            obj.load(context, path)
        except MemoryError:
            raise  # out of memory is the server's condition, not the client's bytes
        except Exception as exc:  # SEAL raises std::logic_error / invalid_argument subclasses
            raise ProtocolError(
                f"{what} is not valid for the model's CKKS parameters ({_short(exc)}); "
                "create it with the parameters of the model card"
            ) from None
        return obj


def _write_uncompressed(fd: int, data: bytes, what: str, max_bytes: int | None) -> None:
    """Check ``data``'s SEAL header and write it to ``fd`` uncompressed, within the bounds."""
    if len(data) < _HEADER.size:
        raise ProtocolError(f"{what} is {len(data)} bytes: too short for a SEAL object")
    magic, header_size, major, minor, compr, reserved, size = _HEADER.unpack_from(data)
    if magic != _MAGIC or header_size != _HEADER.size or major != 4:
        raise ProtocolError(f"{what} is not a SEAL 4.x object (bad header)")
    if size != len(data):
        raise ProtocolError(f"{what}: header declares {size} bytes but {len(data)} arrived")
    if max_bytes is not None and len(data) > max_bytes:
        raise ProtocolError(f"{what} is {len(data)} bytes; these parameters allow {max_bytes}")
    if compr == _COMPR_NONE:
        _write_all(fd, data)
        return
    if compr != _COMPR_ZSTD:
        raise ProtocolError(f"{what}: compression mode {compr} not accepted (use zstd or none)")
    limit = MAX_INFLATE_RATIO * len(data) + 65536
    if max_bytes is not None:
        limit = min(limit, max_bytes - _HEADER.size)
    frame = memoryview(data)[_HEADER.size :]
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"{what}: corrupt zstd data ({exc})") from None
    if declared > limit:  # -1: the frame does not say; the streaming bound still holds
        raise ProtocolError(
            f"{what} inflates beyond {limit} bytes (its zstd frame declares {declared}): refused"
        )
    # The header first with a placeholder size, then the payload as it inflates, chunk by chunk.
    os.pwrite(fd, b"\0" * _HEADER.size, 0)
    written = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame)
        while True:
            chunk = reader.read(min(_INFLATE_CHUNK, limit + 1 - written))
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                raise ProtocolError(
                    f"{what} inflates beyond {limit} bytes "
                    f"({'the size its parameters allow' if max_bytes else 'a bomb'}): refused"
                )
            _write_all(fd, chunk, _HEADER.size + written - len(chunk))
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"{what}: corrupt zstd data ({exc})") from None
    header = _HEADER.pack(
        magic, header_size, major, minor, _COMPR_NONE, reserved, _HEADER.size + written
    )
    os.pwrite(fd, header, 0)


def _write_all(fd: int, data: bytes | memoryview, offset: int = 0) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _short(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
