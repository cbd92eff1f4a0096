"""The coalesced heartbeat flush (PROTOCOL §2.2: no database write per heartbeat):
one bulk UPDATE per batch of nodes, only for the connection that heartbeated, and
stats written only when they changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import async_to_sync

from nodes import services
from nodes.models import Node
from nodes.runtime import HubRuntime

pytestmark = pytest.mark.django_db(transaction=True)

OLD = datetime(2026, 1, 1, tzinfo=UTC)


def make_nodes(count: int) -> None:
    Node.objects.bulk_create(
        Node(
            node_id=f"hb-{i}",
            name=f"hb-{i}",
            status="online",
            connection_id=f"c-{i}",
            last_heartbeat=OLD,
            last_seen=OLD,
        )
        for i in range(count)
    )


def test_a_flush_of_more_than_one_batch_touches_every_node_on_its_own_connection():
    # Given more nodes than one bulk UPDATE takes
    count = services.TOUCH_BATCH + 37
    make_nodes(count)
    at = datetime.now(UTC).replace(microsecond=123000)
    records = [
        services.HeartbeatRecord(f"hb-{i}", f"c-{i}", at + timedelta(seconds=i % 3)) for i in range(count)
    ]
    # One record comes from a connection the node no longer has (taken over since)
    records[5] = services.HeartbeatRecord("hb-5", "c-old", at)
    # When they are flushed
    services.node_flush_heartbeats(records)
    # Then every node carries its own heartbeat time, except the taken-over one
    nodes = {n.node_id: n for n in Node.objects.all()}
    for i in range(count):
        expected = OLD if i == 5 else at + timedelta(seconds=i % 3)
        assert nodes[f"hb-{i}"].last_heartbeat == expected, i
        assert nodes[f"hb-{i}"].last_seen == expected, i


def test_a_flush_brings_back_online_the_nodes_marked_offline_while_still_connected():
    # Given nodes the sweep marked offline although their sockets stayed open, in
    # more than one batch, and one whose connection has since gone
    count = services.TOUCH_BATCH + 3
    make_nodes(count)
    silent = [0, 7, services.TOUCH_BATCH + 1]
    Node.objects.filter(node_id__in=[f"hb-{i}" for i in silent]).update(status="offline")
    Node.objects.filter(node_id="hb-7").update(connection_id="c-newer")
    at = datetime.now(UTC)
    records = [services.HeartbeatRecord(f"hb-{i}", f"c-{i}", at) for i in range(count)]
    # When their heartbeats are flushed
    revived = services.node_flush_heartbeats(records)
    # Then those still on the connection that heartbeated are online again
    assert sorted(revived) == ["hb-0", f"hb-{services.TOUCH_BATCH + 1}"]
    assert Node.objects.get(pk="hb-7").status == "offline"
    assert Node.objects.filter(status="online").count() == count - 1


@pytest.mark.parametrize("microsecond", [0, 1, 999999])
def test_heartbeat_times_are_stored_as_django_stores_them(microsecond):
    from django.db import connection

    at = datetime(2026, 11, 28, 12, 0, 5, microsecond, tzinfo=UTC)
    if connection.vendor == "sqlite":
        assert services._sqlite_datetime(at) == connection.ops.adapt_datetimefield_value(at)
    make_nodes(1)
    services.node_flush_heartbeats([services.HeartbeatRecord("hb-0", "c-0", at)])
    # Django's own lookups compare with the stored text: equal, and ordered
    assert Node.objects.filter(last_heartbeat=at).count() == 1
    assert Node.objects.filter(last_heartbeat__lt=at + timedelta(microseconds=1)).count() == 1
    assert Node.objects.filter(last_heartbeat__gt=at - timedelta(microseconds=1)).count() == 1


def test_stats_are_written_when_they_change_and_not_when_they_repeat(monkeypatch):
    make_nodes(1)
    runtime = HubRuntime()
    written: list[list[services.HeartbeatRecord]] = []
    real = services.node_flush_heartbeats

    def spy(records):
        written.append(records)
        return real(records)

    monkeypatch.setattr(services, "node_flush_heartbeats", spy)
    flush = async_to_sync(runtime.flush_heartbeats)

    runtime.record_heartbeat("hb-0", "c-0", {"activeTasks": 1}, {"cpu": 0.5})
    flush()
    runtime.record_heartbeat("hb-0", "c-0", {"activeTasks": 1}, {"cpu": 0.5})
    flush()
    runtime.record_heartbeat("hb-0", "c-0", {"activeTasks": 2}, {"cpu": 0.5})
    flush()

    assert [(r[0].stats, r[0].resources) for r in written] == [
        ({"activeTasks": 1}, {"cpu": 0.5}),
        (None, None),  # repeated: only the time is written
        ({"activeTasks": 2}, None),
    ]
    node = Node.objects.get(pk="hb-0")
    assert node.reported_stats == {"activeTasks": 2}
    assert node.reported_resources == {"cpu": 0.5}
    assert node.last_heartbeat > OLD


def test_a_new_connection_writes_its_stats_even_if_equal(monkeypatch):
    make_nodes(1)
    runtime = HubRuntime()
    runtime.record_heartbeat("hb-0", "c-0", {"activeTasks": 1})
    async_to_sync(runtime.flush_heartbeats)()
    # The node reconnects (takeover) and reports the same figures
    Node.objects.filter(pk="hb-0").update(connection_id="c-new", reported_stats={})
    runtime.record_heartbeat("hb-0", "c-new", {"activeTasks": 1})
    async_to_sync(runtime.flush_heartbeats)()
    assert Node.objects.get(pk="hb-0").reported_stats == {"activeTasks": 1}


def test_heartbeat_times_follow_a_database_time_zone_other_than_utc(monkeypatch):
    from zoneinfo import ZoneInfo

    from django.db import connections

    connection = connections["default"]  # the wrapper itself, not the proxy
    if connection.vendor != "sqlite":
        pytest.skip("the text form is SQLite's; PostgreSQL stores timestamptz")
    monkeypatch.setitem(connection.__dict__, "timezone", ZoneInfo("Europe/Berlin"))  # DATABASES TIME_ZONE
    at = datetime(2026, 11, 28, 12, 0, 5, 250, tzinfo=UTC)
    assert services._sqlite_datetime(at) == connection.ops.adapt_datetimefield_value(at)
    assert services._sqlite_datetime(at).startswith("2026-11-28 13:00:05")
