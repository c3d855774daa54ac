"""Move SEAL objects to and from bytes safely.

SEAL's Python binding saves and loads through file paths only, so bytes pass through a private
temporary file. Before SEAL sees client bytes we check its 16-byte header and inflate zstd
ourselves with a hard output bound: SEAL would inflate a compression bomb without limit.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Protocol, TypeVar

import tenseal.sealapi as seal
import zstandard

from he_service.protocol.errors import ProtocolError

__all__ = ["MAX_INFLATE_RATIO", "load_seal", "save_seal"]

_HEADER = struct.Struct("<HBBBBHQ")
_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
# Legitimate SEAL data (coefficients below 2^60 in 64-bit words) inflates 1-4x; anything beyond
# this ratio is a bomb, not a key or ciphertext.
MAX_INFLATE_RATIO = 8
# mkstemp makes private (0600), unpredictable names, so a shared tmpfs is safe and fast.
_SHM = "/dev/shm"  # noqa: S108
_TMP_DIR = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None


class _Loadable(Protocol):
    def load(self, context: seal.SEALContext, path: str) -> None: ...


class _Saveable(Protocol):
    def save(self, path: str) -> None: ...


T = TypeVar("T", bound=_Loadable)


def save_seal(obj: _Saveable | Any) -> bytes:
    """Serialize a SEAL object (or SEAL ``Serializable``: seeded, half size) with zstd."""
    fd, path = tempfile.mkstemp(prefix="he-", dir=_TMP_DIR)
    os.close(fd)
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def load_seal(kind: type[T], data: bytes, context: seal.SEALContext, *, what: str) -> T:
    """Check and load client bytes as a SEAL object valid for ``context``.

    Args:
        kind: the SEAL class, e.g. ``seal.Ciphertext``.
        data: the serialized object.
        context: the SEAL context the object must belong to.
        what: a name for error messages ("input ciphertext 0").

    Returns:
        The loaded object.

    Raises:
        ProtocolError: bad header, bomb, or SEAL finds the data invalid for the context.
    """
    data = _uncompressed(data, what)
    fd, path = tempfile.mkstemp(prefix="he-", dir=_TMP_DIR)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        obj = kind()
        try:
            obj.load(context, path)
        except Exception as exc:  # SEAL raises std::logic_error / invalid_argument subclasses
            raise ProtocolError(
                f"{what} is not valid for the model's CKKS parameters ({_short(exc)}); "
                "create it with the parameters of the model card"
            ) from None
        return obj
    finally:
        os.unlink(path)


def _uncompressed(data: bytes, what: str) -> bytes:
    if len(data) < _HEADER.size:
        raise ProtocolError(f"{what} is {len(data)} bytes: too short for a SEAL object")
    magic, header_size, major, minor, compr, reserved, size = _HEADER.unpack_from(data)
    if magic != _MAGIC or header_size != _HEADER.size or major != 4:
        raise ProtocolError(f"{what} is not a SEAL 4.x object (bad header)")
    if size != len(data):
        raise ProtocolError(f"{what}: header declares {size} bytes but {len(data)} arrived")
    if compr == _COMPR_NONE:
        return data
    if compr != _COMPR_ZSTD:
        raise ProtocolError(f"{what}: compression mode {compr} not accepted (use zstd or none)")
    limit = MAX_INFLATE_RATIO * len(data) + 65536
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data[_HEADER.size :]))
        payload = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"{what}: corrupt zstd data ({exc})") from None
    if len(payload) > limit:
        raise ProtocolError(f"{what} inflates beyond {MAX_INFLATE_RATIO}x: refused")
    header = _HEADER.pack(
        magic, header_size, major, minor, _COMPR_NONE, reserved, _HEADER.size + len(payload)
    )
    return header + payload


def _short(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
