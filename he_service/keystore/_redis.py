"""Contexts in Redis, shared by every worker of every host that uses the same server.

Keys (``<m>`` = ``<sha256 of owner>:<context id>``, ``<p>`` = the prefix)::

    <p>blob:<m>   string: the uploaded bytes                         expires with the entry
    <p>meta:<m>   hash: owner, context_id, size, created, expires_at  expires with the entry
    <p>lru        sorted set: <m> scored by last use
    <p>sizes      hash: <m> -> size in bytes

Every change runs as one Lua script, so bounds hold across processes and hosts without locks.
Redis drops expired blobs by itself; the scripts also compare ``expires_at`` with the caller's
clock and remove members of ``lru``/``sizes`` whose entry Redis has already dropped. The
scripts name keys they compute: use a single Redis server (not Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from he_service.errors import NotReady
from he_service.keystore._backend import EntryInfo, StorageBackend, check_context_id, owner_key
from he_service.redis_link import TIMEOUT_SECONDS, RedisDown, connect

__all__ = ["RedisBackend"]

DEFAULT_PREFIX = "he-service:contexts:"

# Shared Lua: drop one entry everywhere; purge expired or vanished entries and count the rest.
_HELPERS = """
local prefix, now = ARGV[1], tonumber(ARGV[2])
local lru, sizes = KEYS[1], KEYS[2]
local function drop(m)
  redis.call('DEL', prefix .. 'meta:' .. m, prefix .. 'blob:' .. m)
  redis.call('ZREM', lru, m)
  redis.call('HDEL', sizes, m)
end
-- Live: not expired, and the bytes are there (a maxmemory policy may evict them alone).
local function live(m)
  local e = redis.call('HGET', prefix .. 'meta:' .. m, 'expires_at')
  return e and tonumber(e) > now and redis.call('EXISTS', prefix .. 'blob:' .. m) == 1
end
local function purge()
  local count, total = 0, 0
  for _, m in ipairs(redis.call('ZRANGE', lru, 0, -1)) do
    if live(m) then
      count = count + 1
      total = total + tonumber(redis.call('HGET', sizes, m) or '0')
    else
      drop(m)
    end
  end
  return count, total
end
"""

# ARGV: prefix, now, member, data, owner, context_id, size, expires_at, ttl_ms, max_entries,
# max_bytes. Returns 1 if stored, 0 if a live entry existed (extended).
_STORE = (
    _HELPERS
    + """
local m, size = ARGV[3], tonumber(ARGV[7])
local meta, blob = prefix .. 'meta:' .. m, prefix .. 'blob:' .. m
if live(m) then
  redis.call('HSET', meta, 'expires_at', ARGV[8])
  redis.call('PEXPIRE', meta, ARGV[9])
  redis.call('PEXPIRE', blob, ARGV[9])
  redis.call('ZADD', lru, ARGV[2], m)
  return 0
end
drop(m)
local count, total = purge()
local max_entries, max_bytes = tonumber(ARGV[10]), tonumber(ARGV[11])
while count > 0 and (count + 1 > max_entries or total + size > max_bytes) do
  local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
  total = total - tonumber(redis.call('HGET', sizes, oldest) or '0')
  count = count - 1
  drop(oldest)
end
redis.call('SET', blob, ARGV[4], 'PX', ARGV[9])
redis.call('HSET', meta, 'owner', ARGV[5], 'context_id', ARGV[6], 'size', ARGV[7],
  'created', ARGV[2], 'expires_at', ARGV[8])
redis.call('PEXPIRE', meta, ARGV[9])
redis.call('ZADD', lru, ARGV[2], m)
redis.call('HSET', sizes, m, ARGV[7])
return 1
"""
)

# ARGV: prefix, now, member[, expires_at, ttl_ms]. Returns the meta fields or nil.
_TOUCH = (
    _HELPERS
    + """
local m = ARGV[3]
local meta = prefix .. 'meta:' .. m
if not live(m) then
  drop(m)
  return nil
end
local f = redis.call('HMGET', meta, 'owner', 'context_id', 'size', 'created', 'expires_at')
if ARGV[4] then
  redis.call('HSET', meta, 'expires_at', ARGV[4])
  redis.call('PEXPIRE', meta, ARGV[5])
  redis.call('PEXPIRE', prefix .. 'blob:' .. m, ARGV[5])
  f[5] = ARGV[4]
end
redis.call('ZADD', lru, ARGV[2], m)
return f
"""
)

# ARGV: prefix, now, member. Returns 1 if a live entry was deleted.
_DELETE = (
    _HELPERS
    + """
local existed = live(ARGV[3])
drop(ARGV[3])
if existed then return 1 end
return 0
"""
)

# ARGV: prefix, now. Returns {count, bytes}.
_STATS = (
    _HELPERS
    + """
local count, total = purge()
return {count, total}
"""
)


class RedisBackend(StorageBackend):
    """Store contexts in the Redis server at ``url`` (``redis://host:port/db``).

    Args:
        url: the server, as ``redis.Redis.from_url`` takes it.
        prefix: prepended to every key, so several services can share one database.
        socket_timeout: seconds before a stalled command fails (reported as ``NotReady``);
            commands that carry a context may take ``BULK_TIMEOUT_SECONDS``. While the
            server's breaker is open (see ``he_service.redis_link``) calls fail at once.
    """

    def __init__(
        self, url: str, *, prefix: str = DEFAULT_PREFIX, socket_timeout: float = TIMEOUT_SECONDS
    ) -> None:
        import redis  # the "server" extra; only needed when a Redis URL is configured

        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)
        self._link = connect(url, timeout=socket_timeout)
        self._client = self._link.client
        self._prefix = prefix
        self._keys = [prefix + "lru", prefix + "sizes"]
        # Only this script carries the bytes; the others are small and fail fast.
        self._store = self._link.bulk.register_script(_STORE)
        self._touch = self._client.register_script(_TOUCH)
        self._delete = self._client.register_script(_DELETE)
        self._stats = self._client.register_script(_STATS)
        self._where = self._link.where

    def __repr__(self) -> str:
        return f"RedisBackend(host={self._where!r}, prefix={self._prefix!r})"

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
        args = [
            *self._common(owner, context_id, now),
            data,
            owner,
            context_id,
            len(data),
            repr(expires_at),
            _ttl_ms(expires_at, now),
            max_entries,
            max_bytes,
        ]
        return bool(self._run(self._store, args))

    def touch(
        self, owner: str, context_id: str, *, now: float, expires_at: float | None = None
    ) -> EntryInfo | None:
        args: list[Any] = self._common(owner, context_id, now)
        if expires_at is not None:
            args += [repr(expires_at), _ttl_ms(expires_at, now)]
        fields = self._run(self._touch, args)
        if fields is None:
            return None
        owner_b, id_b, size, created, expires = fields
        if owner_b.decode() != owner:
            return None
        return EntryInfo(owner, id_b.decode(), int(size), float(created), float(expires), now)

    def read(self, owner: str, context_id: str) -> bytes | None:
        key = f"{self._prefix}blob:{owner_key(owner)}:{check_context_id(context_id)}"
        with self._reporting():
            data = self._client.get(key)
        return data if isinstance(data, bytes) else None

    def delete(self, owner: str, context_id: str, *, now: float) -> bool:
        return bool(self._run(self._delete, self._common(owner, context_id, now)))

    def stats(self, *, now: float) -> tuple[int, int]:
        count, total = self._run(self._stats, [self._prefix, repr(now)])
        return int(count), int(total)

    def close(self) -> None:
        self._link.close()

    def _common(self, owner: str, context_id: str, now: float) -> list[Any]:
        return [self._prefix, repr(now), f"{owner_key(owner)}:{check_context_id(context_id)}"]

    def _run(self, script: Callable[..., Any], args: Sequence[Any]) -> Any:
        with self._reporting():
            return script(keys=self._keys, args=list(args))

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        try:
            with self._link.guard():
                yield
        except RedisDown as exc:
            raise NotReady(
                f"the context store is unavailable: {exc}; retry later", exc.retry_after
            ) from None
        except self._errors as exc:
            raise NotReady(
                f"the context store (Redis at {self._where}) is unavailable: {exc}; retry later",
                1,
            ) from None


def _ttl_ms(expires_at: float, now: float) -> int:
    # Relative, so Redis expiry follows the store's clock even if it differs from the server's.
    return max(1, round((expires_at - now) * 1000))
