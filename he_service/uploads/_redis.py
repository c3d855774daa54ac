"""Upload parts in Redis, shared by every worker of every host that uses the same server.

Keys (``<m>`` = ``<sha256 of owner>:<upload id>``, ``<p>`` = the prefix)::

    <p>meta:<m>      hash: owner, upload_id, model, plan, context_id, created, expires_at
    <p>parts:<m>     hash: part index -> "<ciphertexts>:<bytes>"
    <p>part:<m>:<i>  string: one part's bytes
    <p>expiry        sorted set: <m> scored by expires_at
    <p>sizes         hash: <m> -> bytes staged by the upload

Every key of an upload expires with it (Redis drops them by itself), and every change runs as
one Lua script that first drops expired uploads from ``expiry`` and ``sizes``, so bounds hold
across processes and hosts without locks. Use a single Redis server (not Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from he_service.keystore._backend import owner_key
from he_service.redis_link import TIMEOUT_SECONDS, RedisDown, connect
from he_service.uploads._backend import (
    StagingBackend,
    StagingFull,
    StagingUnavailable,
    TooManyUploads,
    UploadInfo,
    UploadNotFound,
    UploadTooLarge,
    check_upload_id,
)

__all__ = ["RedisStaging"]

DEFAULT_PREFIX = "he-service:uploads:"

# Shared Lua: drop one upload everywhere; drop expired or vanished uploads.
_HELPERS = """
local prefix, now = ARGV[1], tonumber(ARGV[2])
local expiry, sizes = KEYS[1], KEYS[2]
local function drop(m)
  local parts = prefix .. 'parts:' .. m
  for _, i in ipairs(redis.call('HKEYS', parts)) do
    redis.call('DEL', prefix .. 'part:' .. m .. ':' .. i)
  end
  redis.call('DEL', prefix .. 'meta:' .. m, parts)
  redis.call('ZREM', expiry, m)
  redis.call('HDEL', sizes, m)
end
local function purge()
  for _, m in ipairs(redis.call('ZRANGE', expiry, 0, -1)) do
    local e = redis.call('HGET', prefix .. 'meta:' .. m, 'expires_at')
    if not e or tonumber(e) <= now then drop(m) end
  end
end
local function soonest()
  local first = redis.call('ZRANGE', expiry, 0, 0, 'WITHSCORES')
  return first[2] or ARGV[2]
end
"""

# ARGV: prefix, now, member, owner prefix, max_per_owner, expires_at, ttl_ms, then the meta
# field/value pairs. Returns {1} if created, {0, soonest expiry of the owner's uploads} if full.
_CREATE = (
    _HELPERS
    + """
purge()
local m, mine, soon = ARGV[3], 0, nil
local all = redis.call('ZRANGE', expiry, 0, -1, 'WITHSCORES')
for i = 1, #all, 2 do
  if string.sub(all[i], 1, #ARGV[4]) == ARGV[4] then
    mine = mine + 1
    if soon == nil then soon = all[i + 1] end
  end
end
if mine >= tonumber(ARGV[5]) then return {0, soon} end
local meta = prefix .. 'meta:' .. m
redis.call('HSET', meta, unpack(ARGV, 8))
redis.call('PEXPIRE', meta, ARGV[7])
redis.call('ZADD', expiry, ARGV[6], m)
redis.call('HSET', sizes, m, 0)
return {1}
"""
)

# ARGV: prefix, now, member, index, data, ciphertexts, bytes, expires_at, ttl_ms,
# max_ciphertexts, max_bytes. Returns {1, total ciphertexts}, {-1} not found, {-2, total}
# too many ciphertexts, {-3, soonest expiry} staging full.
_PUT = (
    _HELPERS
    + """
purge()
local m, index = ARGV[3], ARGV[4]
local meta, parts = prefix .. 'meta:' .. m, prefix .. 'parts:' .. m
if redis.call('EXISTS', meta) == 0 then return {-1} end
local count, size = tonumber(ARGV[6]), tonumber(ARGV[7])
local old = redis.call('HGET', parts, index)
local old_count, old_size = 0, 0
if old then
  local sep = string.find(old, ':')
  old_count, old_size = tonumber(string.sub(old, 1, sep - 1)), tonumber(string.sub(old, sep + 1))
end
local total = count - old_count
for _, value in ipairs(redis.call('HVALS', parts)) do
  total = total + tonumber(string.sub(value, 1, string.find(value, ':') - 1))
end
if total > tonumber(ARGV[10]) then return {-2, total} end
local staged = size - old_size
for _, value in ipairs(redis.call('HVALS', sizes)) do staged = staged + tonumber(value) end
if staged > tonumber(ARGV[11]) then return {-3, soonest()} end
local ttl = ARGV[9]
redis.call('SET', prefix .. 'part:' .. m .. ':' .. index, ARGV[5], 'PX', ttl)
redis.call('HSET', parts, index, ARGV[6] .. ':' .. ARGV[7])
redis.call('HINCRBY', sizes, m, size - old_size)
redis.call('HSET', meta, 'expires_at', ARGV[8])
redis.call('ZADD', expiry, ARGV[8], m)
redis.call('PEXPIRE', meta, ttl)
redis.call('PEXPIRE', parts, ttl)
for _, i in ipairs(redis.call('HKEYS', parts)) do
  redis.call('PEXPIRE', prefix .. 'part:' .. m .. ':' .. i, ttl)
end
return {1, total}
"""
)

# ARGV: prefix, now, member. Returns {meta fields..., parts fields...} or nil.
_INFO = (
    _HELPERS
    + """
local m = ARGV[3]
local meta = prefix .. 'meta:' .. m
local e = redis.call('HGET', meta, 'expires_at')
if not e or tonumber(e) <= now then return nil end
return {redis.call('HGETALL', meta), redis.call('HGETALL', prefix .. 'parts:' .. m)}
"""
)

# ARGV: prefix, now, member. Returns 1 if a live upload was deleted.
_DELETE = (
    _HELPERS
    + """
local e = redis.call('HGET', prefix .. 'meta:' .. ARGV[3], 'expires_at')
drop(ARGV[3])
if e and tonumber(e) > now then return 1 end
return 0
"""
)

# ARGV: prefix, now.
_SWEEP = _HELPERS + "\npurge()\nreturn 0\n"


class RedisStaging(StagingBackend):
    """Stage parts in the Redis server at ``url`` (``redis://host:port/db``).

    Args:
        url: the server, as ``redis.Redis.from_url`` takes it.
        prefix: prepended to every key, so several services can share one database.
        socket_timeout: seconds before a stalled command fails (``StagingUnavailable``);
            the command that carries a part may take ``BULK_TIMEOUT_SECONDS``. While the
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
        self._keys = [prefix + "expiry", prefix + "sizes"]
        self._create = self._client.register_script(_CREATE)
        # Only this script carries the bytes; the others are small and fail fast.
        self._put = self._link.bulk.register_script(_PUT)
        self._info = self._client.register_script(_INFO)
        self._delete = self._client.register_script(_DELETE)
        self._sweep = self._client.register_script(_SWEEP)
        self._where = self._link.where

    def __repr__(self) -> str:
        return f"RedisStaging(host={self._where!r}, prefix={self._prefix!r})"

    def create(self, info: UploadInfo, *, now: float, max_per_owner: int) -> None:
        fields = {
            "owner": info.owner,
            "upload_id": info.upload_id,
            "model": info.model,
            "plan": info.plan,
            "context_id": info.context_id,
            "created": repr(info.created),
            "expires_at": repr(info.expires_at),
        }
        args = [
            *self._common(info.owner, info.upload_id, now),
            owner_key(info.owner) + ":",
            max_per_owner,
            repr(info.expires_at),
            _ttl_ms(info.expires_at, now),
            *(item for pair in fields.items() for item in pair),
        ]
        result = self._run(self._create, args)
        if int(result[0]) != 1:
            raise TooManyUploads(max_per_owner, _seconds(float(result[1]) - now))

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
        args = [
            *self._common(owner, upload_id, now),
            index,
            data,
            ciphertexts,
            len(data),
            repr(expires_at),
            _ttl_ms(expires_at, now),
            max_ciphertexts,
            max_bytes,
        ]
        result = self._run(self._put, args)
        status = int(result[0])
        if status == -1:
            raise UploadNotFound(upload_id)
        if status == -2:
            raise UploadTooLarge(int(result[1]), max_ciphertexts)
        if status == -3:
            raise StagingFull(max_bytes, _seconds(float(result[1]) - now))
        info = self.info(owner, upload_id, now=now)
        if info is None:  # expired between the two calls: only with a TTL of a few ms
            raise UploadNotFound(upload_id)
        return info

    def info(self, owner: str, upload_id: str, *, now: float) -> UploadInfo | None:
        result = self._run(self._info, self._common(owner, upload_id, now))
        if result is None:
            return None
        meta = _pairs(result[0])
        if meta.get("owner") != owner:
            return None
        parts = {}
        for index, value in _pairs(result[1]).items():
            count, _, size = value.partition(":")
            parts[int(index)] = (int(count), int(size))
        return UploadInfo(
            owner=owner,
            upload_id=meta["upload_id"],
            model=meta["model"],
            plan=meta["plan"],
            context_id=meta["context_id"],
            created=float(meta["created"]),
            expires_at=float(meta["expires_at"]),
            parts=parts,
        )

    def read_part(self, owner: str, upload_id: str, index: int) -> bytes | None:
        key = f"{self._prefix}part:{owner_key(owner)}:{check_upload_id(upload_id)}:{int(index)}"
        with self._reporting():
            data = self._client.get(key)
        return data if isinstance(data, bytes) else None

    def delete(self, owner: str, upload_id: str, *, now: float) -> bool:
        return bool(self._run(self._delete, self._common(owner, upload_id, now)))

    def sweep(self, *, now: float) -> None:
        self._run(self._sweep, [self._prefix, repr(now)])

    def close(self) -> None:
        self._link.close()

    def _common(self, owner: str, upload_id: str, now: float) -> list[Any]:
        return [self._prefix, repr(now), f"{owner_key(owner)}:{check_upload_id(upload_id)}"]

    def _run(self, script: Callable[..., Any], args: Sequence[Any]) -> Any:
        with self._reporting():
            return script(keys=self._keys, args=list(args))

    @contextmanager
    def _reporting(self) -> Iterator[None]:
        try:
            with self._link.guard():
                yield
        except RedisDown as exc:
            raise StagingUnavailable(
                f"the upload staging store is unavailable: {exc}; retry later", exc.retry_after
            ) from None
        except self._errors as exc:
            raise StagingUnavailable(
                f"the upload staging store (Redis at {self._where}) is unavailable: {exc}; "
                "retry later",
                1,
            ) from None


def _pairs(flat: list[bytes]) -> dict[str, str]:
    return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}


def _ttl_ms(expires_at: float, now: float) -> int:
    return max(1, round((expires_at - now) * 1000))


def _seconds(delta: float) -> int:
    return max(1, int(delta) + 1)
