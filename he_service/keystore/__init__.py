"""Uploaded public contexts (evaluation keys), per owner, shared by workers, bounded.

A context is addressed by the sha256 of the uploaded bytes, so a re-upload is recognised
without parsing; it is checked by SEAL once, at upload. The bytes live in a backend that
survives restarts and is shared by every worker: a directory (``DiskBackend``, one host) or
Redis (``RedisBackend``, any number of hosts). Each worker keeps the contexts it used last
loaded in memory.
"""

from he_service.keystore._backend import EntryInfo, StorageBackend
from he_service.keystore._disk import DiskBackend
from he_service.keystore._redis import RedisBackend
from he_service.keystore._store import KeyStore, StoredContext, loaded_key_bytes

__all__ = [
    "DiskBackend",
    "EntryInfo",
    "KeyStore",
    "RedisBackend",
    "StorageBackend",
    "StoredContext",
    "loaded_key_bytes",
]
