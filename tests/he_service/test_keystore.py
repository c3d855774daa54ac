"""The key store on both backends: bounds, owners, restarts, several processes, real Redis."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from clients import KeySet
from he_service.config import Config
from he_service.errors import BadRequest, ParameterMismatch, PayloadTooLarge
from he_service.keystore import (
    DiskBackend,
    KeyStore,
    RedisBackend,
    StorageBackend,
    loaded_key_bytes,
)
from he_service.protocol import CkksParams, KeyBundle, decode_key_bundle, encode_key_bundle

PARAMS = CkksParams(4096, (39, 30, 39), 30)
TTL = 60
ALICE, BOB = "alice", "bob"


class Clock:
    """A fake clock that moves a millisecond per reading, so every use has its own time."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def contexts() -> list[bytes]:
    return [KeySet.generate(PARAMS, (1,)).public_context for _ in range(3)]


BackendFactory = Callable[[], StorageBackend]


@pytest.fixture(params=["disk", "redis"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendFactory:
    """Open the test's storage; every call opens it again, as a restarted worker would."""
    if request.param == "disk":
        return lambda: DiskBackend(tmp_path / "contexts")
    url = request.getfixturevalue("redis_url")
    prefix = f"test-{uuid.uuid4().hex}:"
    return lambda: RedisBackend(url, prefix=prefix)


def _store(backend: StorageBackend, clock: Callable[[], float] = time.time, **kw: Any) -> KeyStore:
    settings: dict[str, Any] = {
        "max_bytes": 1 << 30,
        "max_entries": 10,
        "ttl_seconds": TTL,
        "accepts": lambda _: None,
        "cache_entries": 4,
        **kw,
    }
    return KeyStore(backend, clock=clock, **settings)


# --- behaviour on both backends ---------------------------------------------------------------


def test_put_get_delete(make_backend: BackendFactory, contexts: list[bytes]) -> None:
    clock = Clock()
    store = _store(make_backend(), clock)
    stored, created = store.put(ALICE, contexts[0])
    assert created and len(stored.context_id) == 64
    assert stored.expires_at == pytest.approx(clock.now + TTL, abs=0.01)
    got = store.get(ALICE, stored.context_id)
    assert got is not None and got.params == PARAMS and got.galois_steps == {1}
    assert got.missing_steps((1, 2)) == [2] and got.expires_at == stored.expires_at
    assert store.exists(ALICE, stored.context_id)
    assert store.stats() == (1, len(contexts[0])) and len(store) == 1
    assert store.delete(ALICE, stored.context_id)
    assert store.get(ALICE, stored.context_id) is None
    assert not store.exists(ALICE, stored.context_id)
    assert not store.delete(ALICE, stored.context_id)
    assert store.stats() == (0, 0)


def test_same_bytes_are_stored_once_and_the_ttl_restarts(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    clock = Clock()
    store = _store(make_backend(), clock)
    first, created = store.put(ALICE, contexts[0])
    clock.now += 30
    again, created_again = store.put(ALICE, contexts[0])
    assert created and not created_again and again.context_id == first.context_id
    assert again.expires_at == pytest.approx(clock.now + TTL, abs=0.01)
    assert store.stats() == (1, len(contexts[0]))
    clock.now += 45  # past the first upload's life, within the second's
    assert store.get(ALICE, first.context_id) is not None


def test_owners_are_isolated(make_backend: BackendFactory, contexts: list[bytes]) -> None:
    store = _store(make_backend(), Clock())
    stored, _ = store.put(ALICE, contexts[0])
    cid = stored.context_id
    assert store.get(BOB, cid) is None and not store.exists(BOB, cid)
    assert not store.delete(BOB, cid) and store.get(ALICE, cid) is not None
    _, created = store.put(BOB, contexts[0])  # the same bytes: Bob's own entry
    assert created and store.stats() == (2, 2 * len(contexts[0]))
    assert store.delete(ALICE, cid)
    assert store.get(ALICE, cid) is None and store.get(BOB, cid) is not None


def test_entries_expire(make_backend: BackendFactory, contexts: list[bytes]) -> None:
    clock = Clock()
    store = _store(make_backend(), clock)
    stored, _ = store.put(ALICE, contexts[0])
    assert store.get(ALICE, stored.context_id) is not None  # now cached
    clock.now += TTL + 1
    assert store.stats() == (0, 0)
    assert store.get(ALICE, stored.context_id) is None and len(store) == 0
    _, created = store.put(ALICE, contexts[0])  # an expired entry is stored anew
    assert created


def test_count_bound_evicts_least_recently_used(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    store = _store(make_backend(), Clock(), max_entries=2)
    ids = [store.put(ALICE, c)[0].context_id for c in contexts[:2]]
    assert store.get(ALICE, ids[0]) is not None  # ids[1] becomes the least recently used
    third, _ = store.put(BOB, contexts[2])  # bounds hold over all owners
    assert store.get(ALICE, ids[1]) is None
    assert store.get(ALICE, ids[0]) is not None and store.get(BOB, third.context_id) is not None
    assert len(store) == 2


def test_byte_bound_evicts_least_recently_used(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    limit = len(contexts[1]) + len(contexts[2])  # room for the last two, not for three
    store = _store(make_backend(), Clock(), max_bytes=limit, cache_bytes=1 << 30)
    ids = [store.put(ALICE, c)[0].context_id for c in contexts]
    entries, stored_bytes = store.stats()
    assert entries == 2 and stored_bytes <= limit
    assert store.get(ALICE, ids[0]) is None
    assert all(store.get(ALICE, i) is not None for i in ids[1:])


def test_oversized_contexts_are_refused(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    with pytest.raises(PayloadTooLarge, match="this context"):
        _store(make_backend(), max_bytes=len(contexts[0]) - 1).put(ALICE, contexts[0])
    loaded = loaded_key_bytes(PARAMS, 2)
    with pytest.raises(PayloadTooLarge, match="loaded keys"):
        _store(make_backend(), cache_bytes=loaded - 1).put(ALICE, contexts[0])
    assert _store(make_backend()).stats() == (0, 0)


def test_refusals_store_nothing(
    make_backend: BackendFactory, contexts: list[bytes], tmp_path: Path
) -> None:
    KeySet.generate(PARAMS, (1,)).save(tmp_path / "keys")  # a local key file: secret key inside
    secret = (tmp_path / "keys").read_bytes()
    store = _store(make_backend())
    with pytest.raises(BadRequest, match="secret key"):
        store.put(ALICE, secret)
    with pytest.raises(BadRequest):
        store.put(ALICE, b"garbage")
    refusing = _store(make_backend(), accepts=lambda _: "no model uses these")
    with pytest.raises(ParameterMismatch, match="no model uses these"):
        refusing.put(ALICE, contexts[0])
    assert store.stats() == (0, 0)


def test_keys_in_the_wrong_section_are_refused(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    # SEAL loads Galois keys as RelinKeys; relinearizing with them would crash the worker.
    bundle = decode_key_bundle(contexts[0])
    store = _store(make_backend())
    for target, source in (("relin_keys", "galois_keys"), ("galois_keys", "relin_keys")):
        sections = {**bundle.sections, target: bundle.sections[source]}
        swapped = encode_key_bundle(KeyBundle(bundle.params, bundle.galois_steps, sections))
        with pytest.raises(BadRequest, match=target):
            store.put(ALICE, swapped)
    other_step = decode_key_bundle(KeySet.generate(PARAMS, (2,)).public_context)
    sections = {**bundle.sections, "galois_keys": other_step.sections["galois_keys"]}
    with pytest.raises(BadRequest, match="rotation step 1"):
        store.put(ALICE, encode_key_bundle(KeyBundle(bundle.params, (1,), sections)))
    assert store.stats() == (0, 0)


def test_bad_keys_planted_in_the_storage_are_dropped_not_served(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    bundle = decode_key_bundle(contexts[0])
    sections = {**bundle.sections, "relin_keys": bundle.sections["galois_keys"]}
    planted = encode_key_bundle(KeyBundle(bundle.params, bundle.galois_steps, sections))
    cid = hashlib.sha256(planted).hexdigest()
    backend = make_backend()
    now = time.time()
    backend.store(
        ALICE, cid, planted, now=now, expires_at=now + TTL, max_entries=9, max_bytes=1 << 30
    )
    store = _store(backend)
    assert store.exists(ALICE, cid) and store.get(ALICE, cid) is None
    assert store.stats() == (0, 0)


def test_contexts_survive_a_restart(make_backend: BackendFactory, contexts: list[bytes]) -> None:
    clock = Clock()
    before = _store(make_backend(), clock)
    stored, _ = before.put(ALICE, contexts[0])
    before.close()
    after = _store(make_backend(), clock)  # a new worker: empty cache, same storage
    assert after.stats() == (1, len(contexts[0]))
    got = after.get(ALICE, stored.context_id)
    assert got is not None and got.params == PARAMS
    assert after.get(BOB, stored.context_id) is None
    _, created = after.put(ALICE, contexts[0])
    assert not created


def test_cache_serves_a_hot_context_but_never_a_removed_one(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    clock = Clock()
    worker, other = _store(make_backend(), clock), _store(make_backend(), clock)
    stored, _ = worker.put(ALICE, contexts[0])
    first = worker.get(ALICE, stored.context_id)
    second = worker.get(ALICE, stored.context_id)
    assert first is not None and second is not None
    assert second.relin_keys is first.relin_keys  # parsed once
    assert other.delete(ALICE, stored.context_id)
    assert worker.get(ALICE, stored.context_id) is None
    assert worker.cache_stats() == (0, 0)


def test_cache_is_bounded_by_count_and_memory(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    one = loaded_key_bytes(PARAMS, 2)
    by_count = _store(make_backend(), Clock(), cache_entries=2)
    ids = [by_count.put(ALICE, c)[0].context_id for c in contexts]
    assert by_count.cache_stats() == (2, 2 * one)
    by_memory = _store(make_backend(), Clock(), cache_entries=8, cache_bytes=one)
    for cid in ids:
        assert by_memory.get(ALICE, cid) is not None
    assert by_memory.cache_stats() == (1, one)
    uncached = _store(make_backend(), Clock(), cache_entries=0)
    a, b = uncached.get(ALICE, ids[0]), uncached.get(ALICE, ids[0])
    assert a is not None and b is not None and a.relin_keys is not b.relin_keys


def test_malformed_ids_and_hostile_owners(
    make_backend: BackendFactory, contexts: list[bytes]
) -> None:
    store = _store(make_backend())
    for bad in ("", "../" * 10 + "etc/passwd", "A" * 64, "0" * 63, "0" * 64 + "/x"):
        assert store.get(ALICE, bad) is None
        assert not store.exists(ALICE, bad) and not store.delete(ALICE, bad)
    for owner in ("../../escape", "/abs", "a:b:c", "ünïcode", ""):
        stored, _ = store.put(owner, contexts[0])
        assert store.get(owner, stored.context_id) is not None
    assert store.stats()[0] == 5


# --- disk backend -----------------------------------------------------------------------------


def test_disk_layout_is_hashed_private_and_leaves_no_temp_files(
    tmp_path: Path, contexts: list[bytes]
) -> None:
    root = tmp_path / "contexts"
    store = _store(DiskBackend(root))
    stored, _ = store.put("../../evil owner", contexts[0])
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert len(folders) == 1 and len(folders[0].name) == 64
    files = sorted(p.name for p in folders[0].iterdir())
    assert files == [f"{stored.context_id}.bin", f"{stored.context_id}.json"]
    assert (root.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o077) == 0 for p in folders[0].iterdir())
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))


def test_disk_damaged_bytes_are_dropped_not_served(tmp_path: Path, contexts: list[bytes]) -> None:
    root = tmp_path / "contexts"
    stored, _ = _store(DiskBackend(root)).put(ALICE, contexts[0])
    (blob,) = root.glob("*/*.bin")
    blob.write_bytes(blob.read_bytes()[:-100])
    fresh = _store(DiskBackend(root))
    assert fresh.get(ALICE, stored.context_id) is None
    assert fresh.stats() == (0, 0)


def test_disk_sweeps_leftovers_of_dead_processes(tmp_path: Path, contexts: list[bytes]) -> None:
    root = tmp_path / "contexts"
    store = _store(DiskBackend(root))
    stored, _ = store.put(ALICE, contexts[0])
    (record,) = root.glob("*/*.json")
    record.unlink()  # a process died between removing the record and the bytes
    stale = record.parent / ".tmp-dead"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    store.put(ALICE, contexts[1])
    assert not stale.exists() and not record.with_suffix(".bin").exists()
    assert store.get(ALICE, stored.context_id) is None and store.stats()[0] == 1


def test_disk_record_without_bytes_counts_as_absent(tmp_path: Path, contexts: list[bytes]) -> None:
    root = tmp_path / "contexts"
    store = _store(DiskBackend(root))
    stored, _ = store.put(ALICE, contexts[0])
    (blob,) = root.glob("*/*.bin")
    blob.unlink()  # a process died between removing the bytes and the record
    assert not store.exists(ALICE, stored.context_id)
    assert store.put(ALICE, contexts[0])[1]  # stored anew
    assert store.get(ALICE, stored.context_id) is not None and store.stats()[0] == 1


# --- redis backend ----------------------------------------------------------------------------


def test_redis_entries_carry_a_redis_expiry(redis_url: str, contexts: list[bytes]) -> None:
    import redis

    prefix = f"test-{uuid.uuid4().hex}:"
    store = _store(RedisBackend(redis_url, prefix=prefix))
    store.put(ALICE, contexts[0])
    client = redis.Redis.from_url(redis_url)
    keys = client.keys(prefix + "*")
    blobs = [k for k in keys if b":blob:" in k]
    metas = [k for k in keys if b":meta:" in k]
    assert len(blobs) == 1 and len(metas) == 1
    for key in (*blobs, *metas):
        assert 0 < client.pttl(key) <= TTL * 1000
    assert client.zcard(prefix + "lru") == 1
    assert list(client.hvals(prefix + "sizes")) == [str(len(contexts[0])).encode()]
    client.delete(*blobs, *metas)  # as Redis does when they expire
    assert store.stats() == (0, 0)
    assert client.zcard(prefix + "lru") == 0 and client.hlen(prefix + "sizes") == 0


def test_redis_bytes_evicted_by_redis_count_as_absent(
    redis_url: str, contexts: list[bytes]
) -> None:
    import redis

    prefix = f"test-{uuid.uuid4().hex}:"
    store = _store(RedisBackend(redis_url, prefix=prefix))
    stored, _ = store.put(ALICE, contexts[0])
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys(prefix + "blob:*"))  # as a maxmemory policy may do
    assert not store.exists(ALICE, stored.context_id)
    assert store.put(ALICE, contexts[0])[1]  # stored anew
    assert store.get(ALICE, stored.context_id) is not None and store.stats()[0] == 1


def test_redis_unreachable_is_not_ready(contexts: list[bytes]) -> None:
    from he_service.errors import NotReady

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = _store(RedisBackend(f"redis://127.0.0.1:{port}/0", socket_timeout=1.0))
    with pytest.raises(NotReady, match="unavailable"):
        store.put(ALICE, contexts[0])


# --- configuration ----------------------------------------------------------------------------


def test_from_config_uses_the_directory_without_a_redis_url(tmp_path: Path) -> None:
    config = Config(key_store_dir=tmp_path / "ks", key_store_max_entries=3, key_cache_entries=1)
    store = KeyStore.from_config(config, lambda _: None)
    assert isinstance(store.backend, DiskBackend) and store.backend.directory == tmp_path / "ks"
    assert store.stats() == (0, 0)


def test_from_config_uses_redis_when_configured(redis_url: str, contexts: list[bytes]) -> None:
    store = KeyStore.from_config(Config(redis_url=redis_url), lambda _: None)
    assert isinstance(store.backend, RedisBackend)
    stored, _ = store.put(ALICE, contexts[0])
    assert store.delete(ALICE, stored.context_id)
    store.close()


# --- several processes ------------------------------------------------------------------------


def _worker(spec: tuple[str, str, str], conn: Connection) -> None:
    """A second worker process: runs key-store commands sent over ``conn``."""
    kind, where, prefix = spec
    backend = DiskBackend(Path(where)) if kind == "disk" else RedisBackend(where, prefix=prefix)
    store = _store(backend, max_entries=2)
    while True:
        command, *args = conn.recv()
        if command == "stop":
            return
        try:
            if command == "put":
                result: Any = [store.put(ALICE, data)[0].context_id for data in args]
            elif command == "get":
                result = store.get(ALICE, args[0]) is not None
            elif command == "delete":
                result = store.delete(ALICE, args[0])
            else:
                result = store.stats()
        except Exception as exc:  # reported to the test
            result = exc
        conn.send(result)


class OtherWorker:
    """A key store in another process (multiprocessing spawn) on the same storage."""

    def __init__(self, spec: tuple[str, str, str]) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=_worker, args=(spec, theirs), daemon=True)
        self._process.start()

    def start(self, *command: Any) -> None:
        self._conn.send(command)

    def result(self) -> Any:
        if not self._conn.poll(60):
            pytest.fail("the other worker did not answer")
        result = self._conn.recv()
        if isinstance(result, Exception):
            raise result
        return result

    def __call__(self, *command: Any) -> Any:
        self.start(*command)
        return self.result()

    def stop(self) -> None:
        self._conn.send(("stop",))
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()


@pytest.fixture(params=["disk", "redis"])
def two_workers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[KeyStore, OtherWorker]]:
    """This process's store (count bound 2) and another process's store on the same storage."""
    if request.param == "disk":
        spec = ("disk", str(tmp_path / "contexts"), "")
        local = _store(DiskBackend(Path(spec[1])), max_entries=2)
    else:
        spec = ("redis", request.getfixturevalue("redis_url"), f"test-{uuid.uuid4().hex}:")
        local = _store(RedisBackend(spec[1], prefix=spec[2]), max_entries=2)
    other = OtherWorker(spec)
    try:
        yield local, other
    finally:
        other.stop()


def test_two_processes_share_one_store(
    two_workers: tuple[KeyStore, OtherWorker], contexts: list[bytes]
) -> None:
    local, other = two_workers
    cid = local.put(ALICE, contexts[0])[0].context_id
    assert other("get", cid)  # the other process loads it from the shared storage
    (theirs,) = other("put", contexts[1])
    assert local.get(ALICE, theirs) is not None and local.get(ALICE, cid) is not None
    assert other("delete", cid)  # our cache holds it, yet must stop serving it
    assert local.get(ALICE, cid) is None
    assert local.put(ALICE, contexts[0])[1] and other("get", cid)
    other("put", contexts[2])  # the count bound (2) holds across processes: the LRU goes
    assert local.get(ALICE, theirs) is None and other("stats")[0] == 2


def test_concurrent_uploads_from_two_processes_keep_the_bounds(
    two_workers: tuple[KeyStore, OtherWorker], contexts: list[bytes]
) -> None:
    local, other = two_workers
    for _ in range(5):
        other.start("put", *contexts)
        local_ids = [local.put(ALICE, c)[0].context_id for c in reversed(contexts)]
        assert sorted(other.result()) == sorted(local_ids)
        entries, stored = local.stats()
        assert entries == 2 and stored <= 2 * max(map(len, contexts))
