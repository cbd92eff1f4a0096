"""Node liveness (PROTOCOL §2.2): heartbeat time-outs, closed sockets, revival, the
coalesced flush, sweeps run by several processes, and dead hub processes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.authtoken.models import Token

from nodes import services
from nodes.models import HubProcess, Node, NodeLog
from nodes.runtime import runtime

pytestmark = pytest.mark.django_db(transaction=True)


def after_timeout(extra_ms: int = 1000):
    return timezone.now() + timedelta(milliseconds=django_settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS + extra_ms)


async def sweep(now=None) -> list[str]:
    marked = await database_sync_to_async(services.node_sweep_heartbeat_timeouts)(now=now)
    return [node_id for node_id, _channel in marked]


def _staff_token() -> str:
    user = get_user_model().objects.create_user(username="staff", password="x-123456789", is_staff=True)
    return Token.objects.create(user=user).key


@pytest.fixture
async def status_events():
    """Collects node_status_changed events seen by a staff listener."""
    from apexbridge.asgi import application

    token = await database_sync_to_async(_staff_token)()
    communicator = WebsocketCommunicator(application, f"/ws/admin/events/?token={token}")
    connected, _ = await communicator.connect()
    assert connected

    async def collect(timeout: float = 0.3) -> list[tuple[str, str, str]]:
        seen = []
        while not await communicator.receive_nothing(timeout):
            message = await communicator.receive_json_from()
            if message["type"] == "node_status_changed":
                data = message["data"]
                seen.append((data["nodeId"], data["oldStatus"], data["newStatus"]))
        return seen

    yield collect
    await communicator.disconnect()


# --- heartbeat time-out ------------------------------------------------------------------------
async def test_sweep_marks_a_silent_node_offline(node_socket, status_events):
    node = await node_socket()
    await node.register("s-1")
    await status_events()

    # Not yet: within the timeout nothing happens.
    assert await sweep(now=after_timeout(-5000)) == []
    assert (await Node.objects.aget(pk="s-1")).status == "online"

    assert await sweep(now=after_timeout()) == ["s-1"]
    row = await Node.objects.aget(pk="s-1")
    assert row.status == "offline"
    assert row.connection_id == node.ack["data"]["connectionId"]  # the socket itself is still open
    assert await status_events() == [("s-1", "online", "offline")]
    log = await NodeLog.objects.filter(node_id="s-1", event="heartbeat_timeout").afirst()
    assert log is not None and log.level == "warn"


async def test_busy_and_heartbeating_nodes(node_socket, status_events):
    busy = await node_socket()
    await busy.register("s-busy")
    await busy.request("heartbeat", {"status": "busy"})
    fresh = await node_socket()
    await fresh.register("s-fresh")
    await runtime.flush_heartbeats()
    await status_events()
    long_ago = timezone.now() - timedelta(hours=1)
    await Node.objects.aupdate(last_heartbeat=long_ago)

    # s-fresh heartbeats and its buffer is flushed; s-busy stays silent.
    await fresh.request("heartbeat", {})
    await runtime.flush_heartbeats()
    assert await sweep() == ["s-busy"]
    assert await status_events() == [("s-busy", "busy", "offline")]
    assert (await Node.objects.aget(pk="s-fresh")).status == "online"


async def test_two_sweeps_mark_and_publish_once(node_socket, status_events):
    for node_id in ("s-2", "s-3"):
        await (await node_socket()).register(node_id)
    await status_events()
    later = after_timeout()

    # Two hub processes running the same sweep at once.
    first, second = await asyncio.gather(sweep(now=later), sweep(now=later))
    assert sorted(first + second) == ["s-2", "s-3"]
    assert await sweep(now=later) == []
    assert sorted(await status_events()) == [("s-2", "online", "offline"), ("s-3", "online", "offline")]
    assert await NodeLog.objects.filter(event="heartbeat_timeout").acount() == 2


async def test_disconnected_and_unregistered_nodes_are_not_swept(node_socket, status_events):
    gone = await node_socket()
    await gone.register("s-gone")
    await gone.close()
    await status_events()
    assert await sweep(now=after_timeout()) == []
    assert await status_events() == []


# --- closed socket ---------------------------------------------------------------------------
async def test_closed_socket_marks_the_node_offline_at_once(node_socket, status_events):
    node = await node_socket()
    await node.register("c-1")
    await status_events()
    await node.close()
    row = await Node.objects.aget(pk="c-1")
    assert row.status == "offline"
    assert row.connection_id == "" and row.channel_name == "" and row.process_id == ""
    assert await status_events() == [("c-1", "online", "offline")]
    assert await NodeLog.objects.filter(node_id="c-1", event="disconnected").aexists()


# --- coming back -----------------------------------------------------------------------------
async def test_swept_node_that_heartbeats_again_is_online_at_once(node_socket, status_events):
    node = await node_socket()
    await node.register("r-1")
    await Node.objects.filter(pk="r-1").aupdate(last_heartbeat=timezone.now() - timedelta(hours=1))

    # The process's own sweep marks it offline and tells its connection.
    await runtime.sweep()
    assert (await Node.objects.aget(pk="r-1")).status == "offline"
    assert await node.nothing_received(0.2)

    ack = await node.request("heartbeat", {})
    assert ack["data"]["success"] is True and ack["data"]["status"] == "online"
    assert (await Node.objects.aget(pk="r-1")).status == "online"  # written at once, no flush needed
    assert await status_events() == [
        ("r-1", "offline", "online"),  # the registration
        ("r-1", "online", "offline"),
        ("r-1", "offline", "online"),
    ]


async def test_flush_revives_a_node_marked_offline_elsewhere(node_socket, status_events):
    node = await node_socket()
    await node.register("r-2")
    # Another process's sweep marked it offline; this connection was not told.
    assert await sweep(now=after_timeout()) == ["r-2"]
    await status_events()

    ack = await node.request("heartbeat", {"stats": {"activeTasks": 0}})
    assert ack["data"]["success"] is True
    assert (await Node.objects.aget(pk="r-2")).status == "offline"  # only buffered so far

    assert await runtime.flush_heartbeats() == ["r-2"]
    row = await Node.objects.aget(pk="r-2")
    assert row.status == "online" and row.reported_stats == {"activeTasks": 0}
    assert await status_events() == [("r-2", "offline", "online")]
    # A second flush has nothing to revive.
    await node.request("heartbeat", {})
    assert await runtime.flush_heartbeats() == []


async def test_flush_does_not_revive_a_disconnected_node(node_socket):
    node = await node_socket()
    await node.register("r-3")
    await node.request("heartbeat", {})
    buffered = list(runtime._buffer.values())
    await node.close()
    # A late flush of what the socket said before closing.
    revived = await database_sync_to_async(services.node_flush_heartbeats)(buffered)
    assert revived == []
    assert (await Node.objects.aget(pk="r-3")).status == "offline"


async def test_reconnect_after_timeout_is_online(node_socket):
    node = await node_socket()
    await node.register("r-4")
    await sweep(now=after_timeout())
    await node.close()
    again = await node_socket()
    await again.register("r-4")
    row = await Node.objects.aget(pk="r-4")
    assert row.status == "online" and row.connection_id == again.ack["data"]["connectionId"]


# --- hub processes -----------------------------------------------------------------------------
async def _orphan(node_id: str, process_id: str, beat_age_ms: int) -> None:
    beat = timezone.now() - timedelta(milliseconds=beat_age_ms)
    await HubProcess.objects.acreate(process_id=process_id, last_beat_at=beat, started_at=beat)
    await Node.objects.acreate(
        node_id=node_id,
        name=node_id,
        status="online",
        connection_id=f"c-{node_id}",
        channel_name=f"chan-{node_id}",
        process_id=process_id,
        last_heartbeat=timezone.now(),
    )


async def test_process_reap_marks_nodes_of_a_dead_process_offline(status_events):
    timeout = django_settings.APEXBRIDGE_PROCESS_TIMEOUT_MS
    await _orphan("p-dead", "hub-dead", timeout + 5000)
    await _orphan("p-alive", "hub-alive", 0)

    reaped = await database_sync_to_async(services.process_reap)(current_process_id=runtime.process_id)

    assert reaped == ["hub-dead"]
    dead = await Node.objects.aget(pk="p-dead")
    assert dead.status == "offline" and dead.connection_id == ""
    assert (await HubProcess.objects.aget(pk="hub-dead")).stopped_at is not None
    alive = await Node.objects.aget(pk="p-alive")
    assert alive.status == "online" and alive.connection_id == "c-p-alive"
    assert (await HubProcess.objects.aget(pk="hub-alive")).stopped_at is None
    assert await status_events() == [("p-dead", "online", "offline")]
    # Reaping again changes nothing and publishes nothing.
    assert await database_sync_to_async(services.process_reap)(current_process_id=runtime.process_id) == []
    assert await status_events() == []


async def test_at_start_up_of_a_single_process_hub_every_other_process_is_dead(node_socket):
    await _orphan("p-old", "hub-previous-run", 0)
    mine = await node_socket()
    await mine.register("p-mine")
    await database_sync_to_async(services.process_reap)(
        current_process_id=runtime.process_id, everyone_else_is_dead=True
    )
    assert (await Node.objects.aget(pk="p-old")).status == "offline"
    assert (await Node.objects.aget(pk="p-mine")).status == "online"


async def test_a_cleanly_stopped_process_leaves_no_online_nodes():
    await _orphan("p-stopped", "hub-stopped", 0)
    await database_sync_to_async(services.process_stopped)(process_id="hub-stopped")
    await database_sync_to_async(services.process_reap)(current_process_id=runtime.process_id)
    row = await Node.objects.aget(pk="p-stopped")
    assert row.status == "offline" and row.connection_id == ""


async def test_sweep_beats_for_this_process(node_socket):
    await runtime.sweep()
    process = await HubProcess.objects.aget(pk=runtime.process_id)
    assert process.stopped_at is None
    assert timezone.now() - process.last_beat_at < timedelta(minutes=1)


# --- admin heartbeat-check -------------------------------------------------------------------------
async def test_check_heartbeat_reevaluates_one_node(node_socket):
    node = await node_socket()
    await node.register("hc-1")
    row = await database_sync_to_async(services.node_check_heartbeat)(node_id="hc-1")
    assert row.status == "online"
    await Node.objects.filter(pk="hc-1").aupdate(last_heartbeat=timezone.now() - timedelta(hours=1))
    row = await database_sync_to_async(services.node_check_heartbeat)(node_id="hc-1")
    assert row.status == "offline"
    assert await database_sync_to_async(services.node_check_heartbeat)(node_id="nope") is None
