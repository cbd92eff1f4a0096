"""Fixtures of the quota tests: both limiter backends."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import port_open, skip_or_fail

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


@pytest.fixture
def redis_settings(settings):
    """The Redis limiter, in a key space of its own (skipped when Redis is not running)."""
    if not port_open(REDIS_HOST, REDIS_PORT):
        skip_or_fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}")
    prefix = f"test:{uuid.uuid4().hex}:"
    settings.REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
    settings.APEXBRIDGE_QUOTA_REDIS_PREFIX = prefix
    yield settings
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)


@pytest.fixture
def db_settings(settings):
    settings.REDIS_URL = None
    return settings


@pytest.fixture(params=["db", pytest.param("redis", marks=pytest.mark.services)])
def backend(request):
    """Run a test on the database limiter and on the Redis limiter."""
    fixture = "db_settings" if request.param == "db" else "redis_settings"
    request.getfixturevalue(fixture)
    return request.param


@pytest.fixture
def node_id():
    return f"q-{uuid.uuid4().hex[:10]}"
