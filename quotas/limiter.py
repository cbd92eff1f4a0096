"""The quota limiter (PROTOCOL §4.3): the per-node token bucket for requests per
minute, the concurrent-stream slots and the daily token total.

Two backends keep the bucket and the slots, both atomic across hub processes:
- ``RedisLimiter`` (when ``settings.REDIS_URL`` is set): one Lua script checks and
  takes both, with Redis' own clock;
- ``DatabaseLimiter``: one transaction that locks the node's bucket row (SQLite
  runs with IMMEDIATE transactions, so a transaction serialises writers there).

Stream slots are leases: the stream renews its slot while it runs, so a hub
process that dies cannot hold a slot for longer than one lease. The daily token
total always lives in the database (it must survive a restart).

All functions here are synchronous: call them through ``database_sync_to_async``.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from django.conf import settings
from django.db import OperationalError, transaction
from django.db.models import F
from django.utils import timezone

from quotas.models import DailyTokenUsage, RequestBucket, StreamSlot

# The names of the limits, as on the wire (``details.limit``).
REQUESTS_PER_MINUTE = "maxRequestsPerMinute"
TOKENS_PER_DAY = "maxTokensPerDay"
CONCURRENT_STREAMS = "maxConcurrentStreams"

# A refused stream cannot know when a slot frees up: this is a polling hint.
STREAM_RETRY_HINT_MS = 1000
# With maxRequestsPerMinute = 0 no token ever comes: a polling hint too.
NO_RATE_RETRY_HINT_MS = 60_000


@dataclass(frozen=True)
class QuotaLimits:
    max_requests_per_minute: int
    burst_multiplier: float
    max_tokens_per_day: int
    max_concurrent_streams: int

    @property
    def bucket_capacity(self) -> float:
        return self.max_requests_per_minute * self.burst_multiplier

    @property
    def refill_per_second(self) -> float:
        return self.max_requests_per_minute / 60.0

    def retry_after_ms(self, tokens: float) -> int:
        """Time until the bucket holds one whole token again."""
        if self.refill_per_second <= 0 or self.bucket_capacity < 1:
            return NO_RATE_RETRY_HINT_MS
        return max(1, math.ceil((1.0 - tokens) / self.refill_per_second * 1000))


@dataclass(frozen=True)
class Refusal:
    limit: str
    limit_value: int | float
    current: int
    retry_after_ms: int


@dataclass(frozen=True)
class BucketState:
    request_tokens_available: float
    active_streams: int


T = TypeVar("T")
LOCK_RETRY_SECONDS = 10.0


def retry_when_locked(work: Callable[[], T]) -> T:
    """Run a unit of database work again while SQLite reports a lock.

    A file database waits on ``busy_timeout``, but SQLite's shared-cache mode (the
    in-memory test database) fails at once with "database table is locked". The
    unit is a whole transaction, so running it again is safe.
    """
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    delay = 0.002
    while True:
        try:
            return work()
        except OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (1 + random.random()))
        delay = min(delay * 2, 0.05)


def slot_key(connection_id: str, request_id: str) -> str:
    return f"{connection_id}:{request_id}"


def _bucket_current(limits: QuotaLimits, tokens: float) -> int:
    """Requests the bucket is holding back: what a refusal reports as ``current``."""
    return max(0, math.ceil(limits.bucket_capacity - tokens - 1e-9))


class Limiter(Protocol):
    def acquire(
        self, node_id: str, limits: QuotaLimits, *, stream: bool, key: str, connection_id: str, lease_ms: int
    ) -> Refusal | None: ...

    def renew(self, node_id: str, key: str, lease_ms: int) -> None: ...

    def release(self, node_id: str, key: str) -> None: ...

    def release_connection(self, node_id: str, connection_id: str) -> int: ...

    def state(self, node_id: str, limits: QuotaLimits) -> BucketState: ...


# --- database backend ------------------------------------------------------------------
class DatabaseLimiter:
    def acquire(
        self, node_id: str, limits: QuotaLimits, *, stream: bool, key: str, connection_id: str, lease_ms: int
    ) -> Refusal | None:
        return retry_when_locked(
            lambda: self._acquire(
                node_id, limits, stream=stream, key=key, connection_id=connection_id, lease_ms=lease_ms
            )
        )

    def _acquire(
        self, node_id: str, limits: QuotaLimits, *, stream: bool, key: str, connection_id: str, lease_ms: int
    ) -> Refusal | None:
        with transaction.atomic():
            now = time.time()
            # The locked bucket row is the node's mutex for the stream slots too. One
            # query when the row exists (every request after a node's first).
            bucket = RequestBucket.objects.select_for_update().filter(node_id=node_id).first()
            if bucket is None:
                RequestBucket.objects.get_or_create(
                    node_id=node_id, defaults={"tokens": limits.bucket_capacity, "refilled_at": now}
                )
                bucket = RequestBucket.objects.select_for_update().get(node_id=node_id)
            tokens = self._refilled(bucket, limits, now)
            if stream:
                now_dt = timezone.now()
                StreamSlot.objects.filter(node_id=node_id, lease_expires_at__lte=now_dt).delete()
                active = StreamSlot.objects.filter(node_id=node_id).exclude(slot_key=key).count()
                if active >= limits.max_concurrent_streams:
                    return Refusal(
                        CONCURRENT_STREAMS, limits.max_concurrent_streams, active, STREAM_RETRY_HINT_MS
                    )
            if tokens < 1.0:
                RequestBucket.objects.filter(node_id=node_id).update(tokens=tokens, refilled_at=now)
                return Refusal(
                    REQUESTS_PER_MINUTE,
                    limits.max_requests_per_minute,
                    _bucket_current(limits, tokens),
                    limits.retry_after_ms(tokens),
                )
            RequestBucket.objects.filter(node_id=node_id).update(tokens=tokens - 1.0, refilled_at=now)
            if stream:
                # One upsert: the slot is new unless the same request id is sent again.
                StreamSlot.objects.bulk_create(
                    [
                        StreamSlot(
                            node_id=node_id,
                            slot_key=key,
                            connection_id=connection_id,
                            lease_expires_at=now_dt + dt.timedelta(milliseconds=lease_ms),
                        )
                    ],
                    update_conflicts=True,
                    unique_fields=["node_id", "slot_key"],
                    update_fields=["connection_id", "lease_expires_at"],
                )
        return None

    @staticmethod
    def _refilled(bucket: RequestBucket, limits: QuotaLimits, now: float) -> float:
        elapsed = max(0.0, now - bucket.refilled_at)
        return min(limits.bucket_capacity, bucket.tokens + elapsed * limits.refill_per_second)

    def renew(self, node_id: str, key: str, lease_ms: int) -> None:
        retry_when_locked(
            lambda: StreamSlot.objects.filter(node_id=node_id, slot_key=key).update(
                lease_expires_at=timezone.now() + dt.timedelta(milliseconds=lease_ms)
            )
        )

    def release(self, node_id: str, key: str) -> None:
        retry_when_locked(lambda: StreamSlot.objects.filter(node_id=node_id, slot_key=key).delete())

    def release_connection(self, node_id: str, connection_id: str) -> int:
        deleted, _ = retry_when_locked(
            lambda: StreamSlot.objects.filter(node_id=node_id, connection_id=connection_id).delete()
        )
        return deleted

    def state(self, node_id: str, limits: QuotaLimits) -> BucketState:
        bucket = RequestBucket.objects.filter(node_id=node_id).first()
        tokens = limits.bucket_capacity if bucket is None else self._refilled(bucket, limits, time.time())
        active = StreamSlot.objects.filter(node_id=node_id, lease_expires_at__gt=timezone.now()).count()
        return BucketState(request_tokens_available=tokens, active_streams=active)


# --- Redis backend -----------------------------------------------------------------------
# KEYS: bucket hash, stream-slot sorted set (member = slot key, score = lease end, ms).
# ARGV: capacity, refill per ms, want stream (0/1), max streams, slot key, lease ms.
# Returns {admitted (0/1), limit name, active streams, tokens (string)}.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local want_stream = ARGV[3] == '1'
local max_streams = tonumber(ARGV[4])
local key = ARGV[5]
local lease = tonumber(ARGV[6])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
if now > ts then
  tokens = tokens + (now - ts) * rate
  ts = now
end
if tokens > capacity then tokens = capacity end
local ttl = 60000
if rate > 0 then ttl = math.ceil(capacity / rate) + 60000 end
local active = 0
if want_stream then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  active = redis.call('ZCARD', KEYS[2])
  if redis.call('ZSCORE', KEYS[2], key) then active = active - 1 end
  if active >= max_streams then
    return {0, 'streams', active, tostring(tokens)}
  end
end
if tokens < 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, 'rate', active, tostring(tokens)}
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], ttl)
if want_stream then
  redis.call('ZADD', KEYS[2], now + lease, key)
  redis.call('PEXPIRE', KEYS[2], lease * 2)
end
return {1, '', active, tostring(tokens)}
"""

# KEYS: stream-slot sorted set. ARGV: slot key, lease ms. Renews only a slot still held.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return 1
end
return 0
"""

# KEYS: bucket hash, stream-slot sorted set. Returns {tokens (string) or false, ts or false, active}.
_STATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local active = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
return {b[1], b[2], active, tostring(now)}
"""

_redis_clients: dict[str, object] = {}


def _redis(url: str):
    # One connection pool per URL and process (a pool, not shared state).
    client = _redis_clients.get(url)
    if client is None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        _redis_clients[url] = client
    return client


class RedisLimiter:
    def __init__(self, url: str, prefix: str = "apexbridge:quota:") -> None:
        self.client = _redis(url)
        self.prefix = prefix
        self._acquire = self.client.register_script(_ACQUIRE_LUA)
        self._renew = self.client.register_script(_RENEW_LUA)
        self._state = self.client.register_script(_STATE_LUA)

    def _keys(self, node_id: str) -> list[str]:
        # The hash tag keeps both keys of a node in one Redis Cluster slot.
        return [f"{self.prefix}{{{node_id}}}:bucket", f"{self.prefix}{{{node_id}}}:streams"]

    def acquire(
        self, node_id: str, limits: QuotaLimits, *, stream: bool, key: str, connection_id: str, lease_ms: int
    ) -> Refusal | None:
        admitted, which, active, tokens = self._acquire(
            keys=self._keys(node_id),
            args=[
                repr(float(limits.bucket_capacity)),
                repr(limits.refill_per_second / 1000.0),
                "1" if stream else "0",
                limits.max_concurrent_streams,
                key,
                lease_ms,
            ],
        )
        if int(admitted):
            return None
        tokens = float(tokens)
        if (which.decode() if isinstance(which, bytes) else which) == "streams":
            return Refusal(
                CONCURRENT_STREAMS, limits.max_concurrent_streams, int(active), STREAM_RETRY_HINT_MS
            )
        return Refusal(
            REQUESTS_PER_MINUTE,
            limits.max_requests_per_minute,
            _bucket_current(limits, tokens),
            limits.retry_after_ms(tokens),
        )

    def renew(self, node_id: str, key: str, lease_ms: int) -> None:
        self._renew(keys=[self._keys(node_id)[1]], args=[key, lease_ms])

    def release(self, node_id: str, key: str) -> None:
        self.client.zrem(self._keys(node_id)[1], key)

    def release_connection(self, node_id: str, connection_id: str) -> int:
        streams_key = self._keys(node_id)[1]
        prefix = f"{connection_id}:".encode()
        mine = [m for m in self.client.zrange(streams_key, 0, -1) if m.startswith(prefix)]
        return int(self.client.zrem(streams_key, *mine)) if mine else 0

    def state(self, node_id: str, limits: QuotaLimits) -> BucketState:
        tokens, ts, active, now = self._state(keys=self._keys(node_id))
        if tokens is None or ts is None:
            available = limits.bucket_capacity
        else:
            elapsed_ms = max(0.0, float(now) - float(ts))
            available = min(
                limits.bucket_capacity, float(tokens) + elapsed_ms * limits.refill_per_second / 1000
            )
        return BucketState(request_tokens_available=available, active_streams=int(active))


def get_limiter() -> Limiter:
    """The Redis limiter when ``settings.REDIS_URL`` is set, else the database one."""
    url = getattr(settings, "REDIS_URL", None)
    if url:
        return RedisLimiter(url, settings.APEXBRIDGE_QUOTA_REDIS_PREFIX)
    return DatabaseLimiter()


# --- the daily token total (always in the database) ----------------------------------------
def utc_today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


def ms_until_next_utc_day() -> int:
    now = dt.datetime.now(dt.UTC)
    tomorrow = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    return max(1, math.ceil((tomorrow - now).total_seconds() * 1000))


def tokens_today(node_id: str) -> int:
    row = DailyTokenUsage.objects.filter(node_id=node_id, day=utc_today()).values_list("tokens", flat=True)
    return int(row.first() or 0)


def add_tokens_today(node_id: str, tokens: int) -> None:
    if tokens > 0:
        retry_when_locked(lambda: _add_tokens_today(node_id, tokens))


def _add_tokens_today(node_id: str, tokens: int) -> None:
    day = utc_today()
    with transaction.atomic():
        updated = DailyTokenUsage.objects.filter(node_id=node_id, day=day).update(
            tokens=F("tokens") + tokens, updated_at=timezone.now()
        )
        if not updated:
            usage, created = DailyTokenUsage.objects.get_or_create(
                node_id=node_id, day=day, defaults={"tokens": tokens}
            )
            if not created:  # another process created the row meanwhile
                DailyTokenUsage.objects.filter(pk=usage.pk).update(
                    tokens=F("tokens") + tokens, updated_at=timezone.now()
                )
