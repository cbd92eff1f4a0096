"""A consumer's channel-layer read (nodes/service_health.py): a read that swallows its
cancellation, as redis-py's blocking read can (redis/redis-py#2028), must not keep a
closing socket's consumer alive."""

from __future__ import annotations

import asyncio

from nodes import service_health
from nodes.service_health import ResilientChannelReceiveMixin


class Consumer(ResilientChannelReceiveMixin):
    channel_layer = None


def read_that_swallows_the_first_cancel(state: dict):
    async def read() -> dict:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state["swallowed"] = True  # carries on, like a read whose cancel was lost
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            state["ended"] = True
            raise
        return {"type": "never"}

    return read


async def test_a_closing_consumer_does_not_wait_for_a_read_that_swallowed_its_cancel(monkeypatch):
    monkeypatch.setattr(service_health, "RECANCEL_INTERVAL_S", 0.05)
    state: dict = {}
    consumer = Consumer()
    consumer.channel_receive = read_that_swallows_the_first_cancel(state)  # as Channels sets it
    reading = asyncio.ensure_future(consumer.channel_receive())
    await asyncio.sleep(0.05)

    reading.cancel()  # the socket closed: Channels cancels the consumer's read
    done, _ = await asyncio.wait({reading}, timeout=1)
    assert reading in done and reading.cancelled()  # at once, not after daphne's 10 s

    for _ in range(100):  # and the read itself is cancelled again until it has ended
        if state.get("ended"):
            break
        await asyncio.sleep(0.01)
    assert state == {"swallowed": True, "ended": True}


async def test_a_message_read_is_returned_and_a_failed_read_is_retried(monkeypatch):
    monkeypatch.setattr(service_health, "RETRY_FIRST_S", 0.01)
    reads = iter([ConnectionError("Redis went away"), {"type": "node.send"}])

    async def read() -> dict:
        outcome = next(reads)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def layer_answers() -> None:
        return None

    consumer = Consumer()
    consumer.channel_receive = read
    consumer.rejoin_channel_groups = layer_answers
    try:
        assert await asyncio.wait_for(consumer.channel_receive(), 2) == {"type": "node.send"}
    finally:
        service_health.layer_health.recovered()


def lock_conflict() -> Exception:
    from django.db import OperationalError

    class Deadlock(Exception):
        sqlstate = "40P01"  # PostgreSQL's deadlock_detected

    try:
        raise OperationalError("deadlock detected") from Deadlock()
    except OperationalError as error:
        return error


def test_a_lock_conflict_that_outlasted_its_retries_does_not_mark_the_database_down(caplog):
    """A deadlock is refused work, not an outage: no "database unavailable" warning,
    and no grace period for liveness afterwards."""
    health = service_health.ServiceHealth("database", "…")
    health.failed(lock_conflict())
    assert health.available
    assert "unavailable" not in caplog.text and "lock conflict" in caplog.text
    health.failed(OSError("connection refused"))
    assert not health.available


def test_the_api_answers_a_lock_conflict_with_a_retryable_503_that_does_not_blame_an_outage():
    from apexbridge.exceptions import _service_unavailable

    down_since = service_health.database_health.down_since
    response = _service_unavailable(lock_conflict())
    assert response.status_code == 503
    assert response.data["error"]["code"] == "service_unavailable"
    assert "conflicting change" in response.data["error"]["message"]
    assert service_health.database_health.down_since == down_since
