"""The quota limiter (PROTOCOL §4.3) on both backends: the request bucket, the
concurrent streams, the daily token total, and admission races."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections

from quotas import services
from quotas.limiter import (
    CONCURRENT_STREAMS,
    REQUESTS_PER_MINUTE,
    TOKENS_PER_DAY,
    DatabaseLimiter,
    QuotaLimits,
    get_limiter,
    tokens_today,
    utc_today,
)
from quotas.models import DailyTokenUsage, QuotaPolicy, RequestBucket, StreamSlot

pytestmark = pytest.mark.django_db(transaction=True)


def policy(node_id: str, **limits) -> None:
    QuotaPolicy.objects.create(scope="node", target=node_id, **limits)


def acquire(node_id: str, request_id: str, *, stream: bool = False, connection_id: str = "c-1", tags=()):
    return services.quota_acquire(
        node_id=node_id,
        node_type="worker",
        node_tags=list(tags),
        stream=stream,
        connection_id=connection_id,
        request_id=request_id,
    )


def admitted_count(node_id: str, count: int, **kwargs) -> int:
    return sum(acquire(node_id, f"r{i}", **kwargs) is None for i in range(count))


# --- requests per minute: the token bucket ---------------------------------------------------
def test_quiet_node_may_burst_rpm_times_multiplier_then_is_refused(backend, node_id, caplog):
    policy(node_id, max_requests_per_minute=30, burst_multiplier=2)

    started = time.monotonic()
    assert admitted_count(node_id, 60) == 60
    with caplog.at_level(logging.WARNING, logger="quotas.services"):
        refusal = acquire(node_id, "r-61")
    elapsed_ms = (time.monotonic() - started) * 1000

    assert refusal.limit == REQUESTS_PER_MINUTE
    assert refusal.limit_value == 30
    assert refusal.current == 60
    # One token every 2 s at 30 a minute, less what refilled while the 60 were taken
    # (over 500 ms on a slow machine).
    assert 2000 - elapsed_ms - 50 < refusal.retry_after_ms <= 2000
    assert f"[Quota] node {node_id} exceeded maxRequestsPerMinute (60 > 30)" in caplog.text


def test_settings_defaults_apply_without_a_policy(backend, settings, node_id):
    settings.APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE = 4
    settings.APEXBRIDGE_QUOTA_BURST_MULTIPLIER = 1.5
    assert admitted_count(node_id, 10) == 6


def test_bucket_refills_continuously(db_settings, node_id):
    policy(node_id, max_requests_per_minute=60, burst_multiplier=1)
    assert admitted_count(node_id, 61) == 60
    # Given the bucket was emptied 5 s ago (rewinding the clock instead of sleeping)...
    RequestBucket.objects.filter(node_id=node_id).update(
        refilled_at=RequestBucket.objects.get().refilled_at - 5
    )
    # ...5 requests pass, the 6th is refused.
    assert admitted_count(node_id, 6) == 5


def test_bucket_refills_continuously_on_redis(redis_settings, node_id):
    import redis

    policy(node_id, max_requests_per_minute=60, burst_multiplier=1)
    assert admitted_count(node_id, 61) == 60
    client = redis.Redis.from_url(redis_settings.REDIS_URL)
    key = f"{redis_settings.APEXBRIDGE_QUOTA_REDIS_PREFIX}{{{node_id}}}:bucket"
    client.hincrbyfloat(key, "ts", -5000)  # the last refill was 5 s earlier
    assert admitted_count(node_id, 6) == 5


def test_nodes_have_their_own_buckets(backend, node_id):
    other = node_id + "-other"
    policy(node_id, max_requests_per_minute=2, burst_multiplier=1)
    policy(other, max_requests_per_minute=2, burst_multiplier=1)
    assert admitted_count(node_id, 3) == 2
    assert admitted_count(other, 3) == 2


def test_zero_requests_per_minute_refuses_everything(backend, node_id):
    policy(node_id, max_requests_per_minute=0)
    refusal = acquire(node_id, "r")
    assert refusal.limit == REQUESTS_PER_MINUTE and refusal.retry_after_ms > 0


# --- concurrent streams ---------------------------------------------------------------------
def test_streams_are_limited_and_released(backend, node_id):
    policy(node_id, max_concurrent_streams=2)
    assert acquire(node_id, "s1", stream=True) is None
    assert acquire(node_id, "s2", stream=True) is None
    refusal = acquire(node_id, "s3", stream=True)
    assert refusal.limit == CONCURRENT_STREAMS
    assert (refusal.limit_value, refusal.current) == (2, 2)
    assert refusal.retry_after_ms > 0
    # Plain requests do not need a stream slot.
    assert acquire(node_id, "plain") is None

    services.quota_release_stream(node_id=node_id, connection_id="c-1", request_id="s1")
    assert acquire(node_id, "s3", stream=True) is None


def test_the_same_stream_sent_again_keeps_one_slot_with_a_fresh_lease(backend, node_id):
    policy(node_id, max_concurrent_streams=2)
    assert acquire(node_id, "s1", stream=True) is None
    # The same request id again (a node resending it) holds one slot, not two
    assert acquire(node_id, "s1", stream=True) is None
    assert acquire(node_id, "s2", stream=True) is None
    assert acquire(node_id, "s3", stream=True).limit == CONCURRENT_STREAMS
    if backend == "db":
        slot = StreamSlot.objects.get(node_id=node_id, slot_key__endswith=":s1")
        assert slot.lease_expires_at > dt.datetime.now(dt.UTC)


def test_a_connections_slots_are_freed_together(backend, node_id):
    policy(node_id, max_concurrent_streams=2)
    assert acquire(node_id, "s1", stream=True, connection_id="c-old") is None
    assert acquire(node_id, "s2", stream=True, connection_id="c-old") is None
    assert acquire(node_id, "s3", stream=True, connection_id="c-new") is not None

    assert services.quota_release_connection(node_id=node_id, connection_id="c-old") == 2
    assert acquire(node_id, "s3", stream=True, connection_id="c-new") is None


def test_slot_of_a_dead_process_expires_with_its_lease(db_settings, node_id):
    policy(node_id, max_concurrent_streams=1)
    assert acquire(node_id, "s1", stream=True) is None
    assert acquire(node_id, "s2", stream=True) is not None
    # Given the process holding s1 died and never renewed its lease...
    StreamSlot.objects.filter(node_id=node_id).update(
        lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    )
    assert acquire(node_id, "s2", stream=True) is None


def test_slot_of_a_dead_process_expires_with_its_lease_on_redis(redis_settings, node_id):
    import redis

    policy(node_id, max_concurrent_streams=1)
    assert acquire(node_id, "s1", stream=True) is None
    assert acquire(node_id, "s2", stream=True) is not None
    client = redis.Redis.from_url(redis_settings.REDIS_URL)
    key = f"{redis_settings.APEXBRIDGE_QUOTA_REDIS_PREFIX}{{{node_id}}}:streams"
    client.zadd(key, {"c-1:s1": 1}, xx=True)  # its lease ended long ago
    assert acquire(node_id, "s2", stream=True) is None


# --- tokens per day ---------------------------------------------------------------------------
def test_daily_tokens_refuse_once_the_limit_is_reached(backend, node_id, caplog):
    policy(node_id, max_tokens_per_day=1000)
    services.quota_record_tokens(node_id=node_id, tokens=999)
    assert acquire(node_id, "r1") is None

    services.quota_record_tokens(node_id=node_id, tokens=1)
    with caplog.at_level(logging.WARNING, logger="quotas.services"):
        refusal = acquire(node_id, "r2")
    assert refusal.limit == TOKENS_PER_DAY
    assert (refusal.limit_value, refusal.current) == (1000, 1000)
    assert 0 < refusal.retry_after_ms <= 86_400_000  # the next UTC day
    assert f"[Quota] node {node_id} exceeded maxTokensPerDay (1000 > 1000)" in caplog.text


def test_daily_total_is_kept_in_the_database_per_utc_day(backend, node_id):
    services.quota_record_tokens(node_id=node_id, tokens=120)
    services.quota_record_tokens(node_id=node_id, tokens=30)
    # A restarted hub (new limiter, no process state) sees the same total...
    assert tokens_today(node_id) == 150
    assert DailyTokenUsage.objects.get(node_id=node_id, day=utc_today()).tokens == 150
    # ...and yesterday's total does not count today.
    DailyTokenUsage.objects.filter(node_id=node_id).update(day=utc_today() - dt.timedelta(days=1))
    assert tokens_today(node_id) == 0


# --- races ----------------------------------------------------------------------------------------
def _race(count: int, work) -> list:
    """Run ``work(i)`` in ``count`` threads released at the same moment."""
    start = threading.Barrier(count)

    def run(i: int):
        start.wait()
        try:
            return work(i)
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(run, range(count)))


def test_twenty_requests_at_once_against_five_admit_exactly_five(backend, node_id):
    policy(node_id, max_requests_per_minute=5, burst_multiplier=1)
    results = _race(20, lambda i: acquire(node_id, f"r{i}"))
    assert sum(r is None for r in results) == 5
    assert {r.limit for r in results if r is not None} == {REQUESTS_PER_MINUTE}


def test_twenty_streams_at_once_against_five_slots_admit_exactly_five(backend, node_id):
    policy(node_id, max_requests_per_minute=1000, max_concurrent_streams=5)
    results = _race(20, lambda i: acquire(node_id, f"s{i}", stream=True))
    assert sum(r is None for r in results) == 5
    assert {r.limit for r in results if r is not None} == {CONCURRENT_STREAMS}
    assert get_limiter().state(node_id, QuotaLimits(1000, 2, 1, 5)).active_streams == 5


def test_concurrent_token_counting_loses_nothing(backend, node_id):
    _race(20, lambda i: services.quota_record_tokens(node_id=node_id, tokens=10))
    assert tokens_today(node_id) == 200


def test_backend_follows_redis_url(settings):
    settings.REDIS_URL = None
    assert isinstance(get_limiter(), DatabaseLimiter)


def _expire_lease(node_id: str, settings) -> None:
    """Make every stream slot of the node look abandoned (its lease ran out)."""
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        key = f"{settings.APEXBRIDGE_QUOTA_REDIS_PREFIX}{{{node_id}}}:streams"
        for member in client.zrange(key, 0, -1):
            client.zadd(key, {member: 1}, xx=True)
    else:
        StreamSlot.objects.filter(node_id=node_id).update(
            lease_expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        )


def test_a_running_stream_keeps_its_slot_by_renewing_the_lease(backend, settings, node_id):
    policy(node_id, max_concurrent_streams=1)
    assert acquire(node_id, "long", stream=True) is None
    _expire_lease(node_id, settings)
    services.quota_renew_stream(node_id=node_id, connection_id="c-1", request_id="long")
    assert acquire(node_id, "other", stream=True).limit == CONCURRENT_STREAMS
