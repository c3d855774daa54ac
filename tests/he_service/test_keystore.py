from __future__ import annotations

import pytest

from clients import KeySet
from he_service.errors import BadRequest, ParameterMismatch, PayloadTooLarge
from he_service.keystore import KeyStore, loaded_key_bytes
from he_service.protocol import CkksParams

PARAMS = CkksParams(4096, (39, 30, 39), 30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def contexts() -> list[bytes]:
    return [KeySet.generate(PARAMS, (1,)).public_context for _ in range(3)]


def _store(clock: Clock, **bounds: int) -> KeyStore:
    settings = {"max_bytes": 1 << 30, "max_entries": 10, "ttl_seconds": 60, **bounds}
    return KeyStore(accepts=lambda _: None, clock=clock, **settings)


def test_put_is_idempotent_and_refreshes_ttl(contexts: list[bytes]) -> None:
    clock = Clock()
    store = _store(clock)
    first, created = store.put(contexts[0])
    assert created and len(first.context_id) == 64
    clock.now += 30
    again, created = store.put(contexts[0])
    assert not created and again.expires_at == clock.now + 60


def test_entries_expire(contexts: list[bytes]) -> None:
    clock = Clock()
    store = _store(clock)
    stored, _ = store.put(contexts[0])
    clock.now += 61
    assert store.get(stored.context_id) is None and len(store) == 0


def test_count_bound_evicts_least_recently_used(contexts: list[bytes]) -> None:
    store = _store(Clock(), max_entries=2)
    ids = [store.put(c)[0].context_id for c in contexts[:2]]
    store.get(ids[0])  # touch: ids[1] becomes the least recently used
    third, _ = store.put(contexts[2])
    assert store.get(ids[1]) is None
    assert store.get(ids[0]) is not None and store.get(third.context_id) is not None


def test_byte_bound_evicts_and_refuses_oversized(contexts: list[bytes]) -> None:
    one = loaded_key_bytes(PARAMS, 2)
    store = _store(Clock(), max_bytes=one * 2)
    for data in contexts:
        store.put(data)
    assert len(store) == 2 and store.memory_bytes <= one * 2
    with pytest.raises(PayloadTooLarge):
        _store(Clock(), max_bytes=one - 1).put(contexts[0])


def test_refusals(contexts: list[bytes]) -> None:
    refusing = KeyStore(
        max_bytes=1 << 30, max_entries=4, ttl_seconds=60, accepts=lambda _: "no model uses these"
    )
    with pytest.raises(ParameterMismatch, match="no model uses these"):
        refusing.put(contexts[0])
    with pytest.raises(BadRequest):
        _store(Clock()).put(b"garbage")
