"""Registry messages on the node socket (PROTOCOL §2.1–2.3): node_register, heartbeat,
node_unregister and takeover."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from nodes.models import Node, NodeLog
from nodes.runtime import runtime
from tests.conftest import wait_closed

pytestmark = pytest.mark.django_db(transaction=True)

OLD = timezone.now() - timedelta(hours=1)


# --- node_register -----------------------------------------------------------------------
async def test_register_stores_the_node_and_replies_with_hub_info(node_socket, settings):
    settings.APEXBRIDGE_HEARTBEAT_INTERVAL_MS = 11000
    settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS = 33000
    node = await node_socket()
    reply = await node.request(
        "node_register",
        {
            "nodeId": "w-1",
            "name": "Worker one",
            "type": "companion",
            "version": "1.2.3",
            "capabilities": ["echo", "sha256", "echo"],
            "tools": ["echo"],
            "personality": {"tone": "dry"},
            "endpoint": "http://10.0.0.5:9000",
            "config": {
                "maxConcurrentTasks": 3,
                "resources": {"cpu": 4, "memory": 8192, "disk": 100000},
                "metadata": {"rack": "r1"},
                "tags": ["gpu", "eu"],
            },
        },
    )
    data = reply["data"]
    assert reply["type"] == "node_registered"
    assert data["success"] is True and data["nodeId"] == "w-1"
    assert data["hubInfo"] == {
        "version": settings.HUB_VERSION,
        "llmAvailable": False,
        "heartbeatInterval": 11000,
        "heartbeatTimeout": 33000,
    }
    row = await Node.objects.aget(pk="w-1")
    assert row.name == "Worker one" and row.type == "companion" and row.version == "1.2.3"
    assert row.protocol == "abp"
    assert row.status == "online"
    assert row.capabilities == ["echo", "sha256"]
    assert row.tools == ["echo"]
    assert row.personality == {"tone": "dry"}
    assert row.endpoint == "http://10.0.0.5:9000"
    assert row.max_concurrent_tasks == 3
    assert row.resources == {"cpu": 4, "memory": 8192, "disk": 100000}
    assert row.metadata == {"rack": "r1"}
    assert row.tags == ["gpu", "eu"]
    assert row.registered_at is not None and row.last_heartbeat is not None and row.last_seen is not None
    assert row.connection_id == node.ack["data"]["connectionId"]


async def test_register_without_node_id_gets_a_generated_id(node_socket):
    node = await node_socket()
    reply = await node.request("node_register", {"name": "anon", "capabilities": []})
    node_id = reply["data"]["nodeId"]
    assert reply["data"]["success"] is True
    assert node_id and node_id.startswith("node-")
    row = await Node.objects.aget(pk=node_id)
    assert row.type == "worker" and row.max_concurrent_tasks == 1
    # Later messages act as that node.
    ack = await node.request("heartbeat", {"nodeId": node_id})
    assert ack["data"]["success"] is True and ack["data"]["nodeId"] == node_id


async def test_two_anonymous_nodes_get_different_ids(node_socket):
    first = await (await node_socket()).request("node_register", {"name": "a", "capabilities": []})
    second = await (await node_socket()).request("node_register", {"name": "b", "capabilities": []})
    assert first["data"]["nodeId"] != second["data"]["nodeId"]
    assert await Node.objects.acount() == 2


async def test_config_tasks_max_concurrent_spelling(node_socket):
    node = await node_socket()
    await node.register("legacy", config={"tasks": {"maxConcurrent": 4}})
    assert (await Node.objects.aget(pk="legacy")).max_concurrent_tasks == 4


@pytest.mark.parametrize(
    "data, field",
    [
        ({"nodeId": "x", "capabilities": []}, "name"),
        ({"nodeId": "x", "name": ""}, "name"),
        ({"nodeId": "x", "name": "n" * 129, "capabilities": []}, "name"),
        ({"nodeId": "x", "name": "x"}, "capabilities"),
        ({"nodeId": "x", "name": "x", "capabilities": "echo"}, "capabilities"),
        ({"nodeId": "x", "name": "x", "capabilities": [1]}, "capabilities"),
        ({"nodeId": "has space", "name": "x", "capabilities": []}, "nodeId"),
        ({"nodeId": "n" * 65, "name": "x", "capabilities": []}, "nodeId"),
        ({"nodeId": "a/b", "name": "x", "capabilities": []}, "nodeId"),
        ({"nodeId": "x", "name": "x", "type": "robot", "capabilities": []}, "type"),
        ({"nodeId": "x", "name": "x", "capabilities": [], "tools": "echo"}, "tools"),
        (
            {"nodeId": "x", "name": "x", "capabilities": [], "config": {"maxConcurrentTasks": 0}},
            "maxConcurrentTasks",
        ),
        ({"nodeId": "x", "name": "x", "capabilities": [], "config": {"tags": "gpu"}}, "tags"),
    ],
)
async def test_register_validation_errors_name_the_field(node_socket, data, field):
    node = await node_socket()
    reply = await node.request("node_register", data)
    assert reply["type"] == "node_registered"
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "invalid_payload"
    assert field in reply["data"]["error"]["message"]
    assert await Node.objects.acount() == 0
    # Still connected and still unregistered.
    assert (await node.request("ping"))["type"] == "pong"
    assert (await node.request("heartbeat", {}))["data"]["code"] == "not_registered"


async def test_node_limit_reached(node_socket, settings):
    settings.APEXBRIDGE_MAX_NODES = 2
    await (await node_socket()).register("a")
    await (await node_socket()).register("b")
    third = await node_socket()
    reply = await third.request("node_register", {"nodeId": "c", "name": "c", "capabilities": []})
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "node_limit_reached"
    assert not await Node.objects.filter(pk="c").aexists()
    # An already registered id may still reconnect (takeover) at the limit.
    again = await third.register("a")
    assert again["data"]["success"] is True
    assert await Node.objects.acount() == 2


async def test_register_again_on_the_same_connection_updates_it(node_socket):
    node = await node_socket()
    await node.register("same", capabilities=["a"])
    reply = await node.request("node_register", {"name": "renamed", "capabilities": ["b"]})
    assert reply["data"]["success"] is True and reply["data"]["nodeId"] == "same"
    row = await Node.objects.aget(pk="same")
    assert row.name == "renamed" and row.capabilities == ["b"]
    # A second id on a registered connection is refused and changes nothing.
    reply = await node.request("node_register", {"nodeId": "other", "name": "o", "capabilities": []})
    assert reply["data"]["success"] is False and reply["data"]["error"]["code"] == "node_mismatch"
    assert not await Node.objects.filter(pk="other").aexists()


# --- takeover ----------------------------------------------------------------------------
async def test_takeover_closes_the_older_socket_with_4000_and_keeps_stats(node_socket):
    old = await node_socket()
    await old.register("t-1", capabilities=["echo"])
    await Node.objects.filter(pk="t-1").aupdate(
        total_tasks=7, completed_tasks=5, failed_tasks=2, total_response_time_ms=500
    )
    registered_at = (await Node.objects.aget(pk="t-1")).registered_at

    new = await node_socket()
    reply = await new.register("t-1", capabilities=["echo"])
    assert reply["data"]["success"] is True

    assert await wait_closed(old) == 4000
    row = await Node.objects.aget(pk="t-1")
    assert row.connection_id == new.ack["data"]["connectionId"]
    assert row.status == "online"
    assert (row.total_tasks, row.completed_tasks, row.failed_tasks) == (7, 5, 2)
    assert row.registered_at == registered_at

    # The old socket going away does not take the new one offline.
    await old.close()
    row = await Node.objects.aget(pk="t-1")
    assert row.status == "online" and row.connection_id == new.ack["data"]["connectionId"]
    ack = await new.request("heartbeat", {"nodeId": "t-1"})
    assert ack["data"]["success"] is True


async def test_a_heartbeat_is_acknowledged_while_the_database_thread_is_busy(node_socket):
    # Given a registered node and the process's one database thread busy with
    # something slow (a big flush, a sweep)
    node = await node_socket()
    await node.register("busy-db")
    release = threading.Event()
    busy = asyncio.ensure_future(database_sync_to_async(release.wait)(10))
    await asyncio.sleep(0.05)
    try:
        # When the node heartbeats, the ack comes without waiting for that work
        ack = await node.request("heartbeat", {"nodeId": "busy-db"}, timeout=1)
        assert ack["type"] == "heartbeat_ack" and ack["data"]["success"] is True
    finally:
        release.set()
        await busy


async def test_heartbeats_of_the_new_socket_survive_the_old_socket_closing(node_socket):
    old = await node_socket()
    await old.register("t-2")
    new = await node_socket()
    await new.register("t-2")
    assert await wait_closed(old) == 4000
    await Node.objects.filter(pk="t-2").aupdate(last_heartbeat=OLD)

    # Given a heartbeat of the new connection waiting in the buffer,
    await new.request("heartbeat", {"nodeId": "t-2", "stats": {"activeTasks": 1}})
    # when the replaced socket finally goes away,
    await old.close()
    await runtime.flush_heartbeats()
    # then the new connection's heartbeat is still written.
    row = await Node.objects.aget(pk="t-2")
    assert row.last_heartbeat > OLD
    assert row.reported_stats == {"activeTasks": 1}


# --- heartbeat ---------------------------------------------------------------------------
async def test_heartbeat_ack(node_socket):
    node = await node_socket()
    await node.register("h-1")
    for data in ({"nodeId": "h-1"}, {}, {"status": "online"}):
        ack = await node.request("heartbeat", data)
        assert ack["type"] == "heartbeat_ack"
        assert ack["data"]["nodeId"] == "h-1"
        assert ack["data"]["success"] is True
        assert ack["data"]["status"] == "online"
        assert isinstance(ack["data"]["timestamp"], int)


async def test_heartbeat_is_buffered_until_a_flush(node_socket):
    node = await node_socket()
    await node.register("h-2")
    await Node.objects.filter(pk="h-2").aupdate(last_heartbeat=OLD, last_seen=OLD)

    await node.request(
        "heartbeat",
        {
            "nodeId": "h-2",
            "stats": {"activeTasks": 0, "completedTasks": 12, "failedTasks": 1},
            "resources": {"cpu": 0.35, "memory": 0.62, "disk": 0.4},
        },
    )
    row = await Node.objects.aget(pk="h-2")
    assert row.last_heartbeat == OLD  # no database write per heartbeat
    assert row.reported_stats == {}

    await runtime.flush_heartbeats()
    row = await Node.objects.aget(pk="h-2")
    assert row.last_heartbeat > OLD and row.last_seen > OLD
    assert row.reported_stats == {"activeTasks": 0, "completedTasks": 12, "failedTasks": 1}
    assert row.reported_resources == {"cpu": 0.35, "memory": 0.62, "disk": 0.4}


async def test_many_heartbeats_coalesce_and_keep_the_last_figures(node_socket):
    node = await node_socket()
    await node.register("h-3")
    for done in range(5):
        await node.request("heartbeat", {"stats": {"completedTasks": done}})
    await node.request("heartbeat", {"resources": {"cpu": 0.9}})
    await runtime.flush_heartbeats()
    row = await Node.objects.aget(pk="h-3")
    assert row.reported_stats == {"completedTasks": 4}
    assert row.reported_resources == {"cpu": 0.9}


async def test_heartbeat_busy_is_written_at_once(node_socket):
    node = await node_socket()
    await node.register("h-4")
    ack = await node.request("heartbeat", {"nodeId": "h-4", "status": "busy"})
    assert ack["data"]["status"] == "busy"
    assert (await Node.objects.aget(pk="h-4")).status == "busy"
    # Without a status the node stays busy; "online" brings it back.
    assert (await node.request("heartbeat", {}))["data"]["status"] == "busy"
    assert (await node.request("heartbeat", {"status": "online"}))["data"]["status"] == "online"
    assert (await Node.objects.aget(pk="h-4")).status == "online"


async def test_heartbeat_with_another_node_id_changes_nothing(node_socket):
    node = await node_socket()
    await node.register("h-5")
    other = await node_socket()
    await other.register("h-6")
    await Node.objects.filter(pk__in=["h-5", "h-6"]).aupdate(last_heartbeat=OLD)

    ack = await node.request("heartbeat", {"nodeId": "h-6", "status": "busy"})
    assert ack["type"] == "heartbeat_ack"
    assert ack["data"]["success"] is False
    assert ack["data"]["error"]["code"] == "node_mismatch"
    assert ack["data"]["nodeId"] == "h-6"

    await runtime.flush_heartbeats()
    for node_id in ("h-5", "h-6"):
        row = await Node.objects.aget(pk=node_id)
        assert row.status == "online" and row.last_heartbeat == OLD


@pytest.mark.parametrize(
    "data, field",
    [
        ({"status": "sleeping"}, "status"),
        ({"stats": "lots"}, "stats"),
        ({"resources": [1, 2]}, "resources"),
    ],
)
async def test_heartbeat_bad_fields(node_socket, data, field):
    node = await node_socket()
    await node.register("h-7")
    ack = await node.request("heartbeat", data)
    assert ack["type"] == "heartbeat_ack" and ack["data"]["success"] is False
    assert ack["data"]["error"]["code"] == "invalid_payload"
    assert field in ack["data"]["error"]["message"]
    assert (await Node.objects.aget(pk="h-7")).status == "online"
    assert (await node.request("heartbeat", {}))["data"]["success"] is True


# --- node_unregister ---------------------------------------------------------------------
async def test_unregister_removes_the_node_and_keeps_the_connection(node_socket):
    node = await node_socket()
    await node.register("u-1")
    reply = await node.request("node_unregister", {"nodeId": "u-1", "reason": "shutdown"})
    assert reply["type"] == "node_unregistered"
    assert reply["data"]["nodeId"] == "u-1" and reply["data"]["success"] is True
    assert not await Node.objects.filter(pk="u-1").aexists()
    log = await NodeLog.objects.filter(node_id="u-1", event="node_unregistered").afirst()
    assert log is not None and "shutdown" in log.message

    # The connection is no longer a node, but it is open and may register again.
    assert (await node.request("heartbeat", {}))["data"]["code"] == "not_registered"
    assert (await node.request("ping"))["type"] == "pong"
    await node.register("u-1")
    assert (await Node.objects.aget(pk="u-1")).status == "online"


async def test_unregister_of_another_node_is_refused(node_socket):
    node = await node_socket()
    await node.register("u-2")
    other = await node_socket()
    await other.register("u-3")
    reply = await node.request("node_unregister", {"nodeId": "u-3"})
    assert reply["type"] == "node_unregistered"
    assert reply["data"]["success"] is False and reply["data"]["error"]["code"] == "node_mismatch"
    assert await Node.objects.filter(pk="u-3", status="online").aexists()
    assert await Node.objects.filter(pk="u-2", status="online").aexists()


async def test_unregistered_node_closing_its_socket_changes_nothing(node_socket):
    node = await node_socket()
    await node.register("u-4")
    await node.request("node_unregister", {})
    await node.close()
    assert not await Node.objects.filter(pk="u-4").aexists()
