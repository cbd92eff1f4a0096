"""VCP compatibility and the other node messages (PROTOCOL §2.5): register_tools,
unregister_tools, report_ip, update_static_placeholders, node_log, ping."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from nodes import services
from nodes.models import Node, NodeLog
from nodes.runtime import runtime
from tests.conftest import TEST_SHARED_KEY, wait_closed

pytestmark = pytest.mark.django_db(transaction=True)

VCP_PATH = f"/vcp-distributed-server/VCP_Key={TEST_SHARED_KEY}"
SECRET = "sk-plugin-secret-value-42"
MANIFESTS = [
    {
        "name": "SciCalculator",
        "displayName": "Scientific calculator",
        "description": "Evaluates maths",
        "pluginType": "synchronous",
        "version": "1.0",
        "basePath": "/home/vcp/plugins/SciCalculator",
        "pluginSpecificEnvConfig": {"OPENAI_API_KEY": SECRET},
        "entryPoint": {"command": "python calc.py"},
        "capabilities": {"invocationCommands": [{"command": "calc", "description": "calc"}]},
    },
    {
        "name": "FluxGen",
        "description": "Images",
        "basePath": "C:\\vcp\\FluxGen",
        "pluginSpecificEnvConfig": {"TOKEN": SECRET},
    },
]


# --- register_tools: VCP auto-registration -------------------------------------------------
async def test_register_tools_registers_a_vcp_node(node_socket, caplog):
    caplog.set_level(logging.DEBUG)
    node = await node_socket(VCP_PATH)
    assert node.ack["data"]["deprecated"] is True

    reply = await node.request("register_tools", {"serverName": "Home PC", "tools": MANIFESTS})

    assert reply["type"] == "register_ack"
    assert reply["data"]["tools"] == ["SciCalculator", "FluxGen"]
    assert reply["data"]["count"] == 2
    row = await Node.objects.aget(pk="vcp-Home-PC")
    assert row.name == "Home PC"
    assert row.type == "worker"
    assert row.protocol == "vcp"
    assert row.status == "online"
    assert row.tools == ["SciCalculator", "FluxGen"]
    assert row.capabilities == ["SciCalculator", "FluxGen"]
    assert row.tool_manifests[0] == {
        "name": "SciCalculator",
        "displayName": "Scientific calculator",
        "description": "Evaluates maths",
        "pluginType": "synchronous",
        "invocationCommands": [{"command": "calc", "description": "calc"}],
    }
    assert row.tool_manifests[1] == {"name": "FluxGen", "description": "Images"}

    # The plugin's local environment is never stored, in any column of any table, nor logged.
    stored = await database_sync_to_async(lambda: json.dumps(list(Node.objects.values()), default=str))()
    stored += await database_sync_to_async(lambda: json.dumps(list(NodeLog.objects.values()), default=str))()
    for forbidden in (SECRET, "pluginSpecificEnvConfig", "basePath", "/home/vcp", "entryPoint"):
        assert forbidden not in stored
    assert all(SECRET not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "server_name, node_id",
    [
        ("simple", "vcp-simple"),
        ("my server/ü#1", "vcp-my-server---1"),
        ("a.b:c_d-e", "vcp-a.b:c_d-e"),
        ("x" * 128, "vcp-" + "x" * 60),
    ],
)
async def test_vcp_node_id_is_sanitised(node_socket, server_name, node_id):
    node = await node_socket(VCP_PATH)
    reply = await node.request("register_tools", {"serverName": server_name, "tools": ["t"]})
    assert reply["data"]["nodeId"] == node_id
    row = await Node.objects.aget(pk=node_id)
    assert row.name == server_name


async def test_a_vcp_server_with_thousands_of_tools(node_socket):
    node = await node_socket(VCP_PATH)
    names = [f"tool_{i}" for i in range(3000)]
    reply = await node.request("register_tools", {"serverName": "big", "tools": names})
    assert reply["type"] == "register_ack" and reply["data"]["count"] == 3000
    row = await Node.objects.aget(pk="vcp-big")
    assert row.tools == names and row.capabilities == names


async def test_register_tools_with_plain_names_on_any_path(node_socket):
    node = await node_socket()
    reply = await node.request("register_tools", {"serverName": "plain", "tools": ["a", "b", "a"]})
    assert reply["data"]["tools"] == ["a", "b"] and reply["data"]["count"] == 2
    row = await Node.objects.aget(pk="vcp-plain")
    assert row.tools == ["a", "b"] and row.protocol == "vcp"


async def test_register_tools_on_a_registered_node_replaces_its_tools(node_socket):
    node = await node_socket()
    await node.register("abp-1", capabilities=["echo"], tools=["echo", "sha256"])
    reply = await node.request("register_tools", {"tools": ["sleep"]})
    assert reply["data"]["tools"] == ["sleep"] and reply["data"]["count"] == 1
    row = await Node.objects.aget(pk="abp-1")
    assert row.tools == ["sleep"]
    assert row.capabilities == ["echo"]  # an ABP node's capabilities are its own
    assert row.protocol == "abp"
    assert await Node.objects.acount() == 1


async def test_second_register_tools_of_a_vcp_node_replaces_tools_and_capabilities(node_socket):
    node = await node_socket(VCP_PATH)
    await node.request("register_tools", {"serverName": "box", "tools": MANIFESTS})
    reply = await node.request("register_tools", {"serverName": "box", "tools": ["Only"]})
    assert reply["data"]["tools"] == ["Only"]
    row = await Node.objects.aget(pk="vcp-box")
    assert row.tools == ["Only"] and row.capabilities == ["Only"]
    assert row.tool_manifests == [{"name": "Only"}]


@pytest.mark.parametrize(
    "data, field",
    [
        ({"tools": ["a"]}, "serverName"),
        ({"serverName": "", "tools": ["a"]}, "serverName"),
        ({"serverName": "s"}, "tools"),
        ({"serverName": "s", "tools": "a"}, "tools"),
        ({"serverName": "s", "tools": [{"description": "no name"}]}, "tools"),
        ({"serverName": 5, "tools": ["a"]}, "serverName"),
    ],
)
async def test_register_tools_bad_fields(node_socket, data, field):
    node = await node_socket(VCP_PATH)
    reply = await node.request("register_tools", data)
    assert reply["type"] == "register_ack"
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "invalid_payload"
    assert field in reply["data"]["error"]["message"]
    assert await Node.objects.acount() == 0


async def test_vcp_node_stays_online_while_connected_without_heartbeats(node_socket):
    node = await node_socket(VCP_PATH)
    await node.request("register_tools", {"serverName": "quiet", "tools": ["t"]})
    abp = await node_socket()
    await abp.register("abp-quiet")  # an ABP node that never heartbeats, for contrast
    long_ago = timezone.now() - timedelta(hours=1)
    await Node.objects.aupdate(last_heartbeat=long_ago)

    # The open VCP socket counts as liveness: every flush refreshes the node.
    await runtime.flush_heartbeats()
    marked = await database_sync_to_async(services.node_sweep_heartbeat_timeouts)()
    assert [node_id for node_id, _ in marked] == ["abp-quiet"]
    row = await Node.objects.aget(pk="vcp-quiet")
    assert row.status == "online" and row.last_heartbeat > long_ago

    await node.close()
    row = await Node.objects.aget(pk="vcp-quiet")
    assert row.status == "offline" and row.connection_id == ""


async def test_vcp_takeover_keeps_the_new_connection_alive(node_socket):
    old = await node_socket(VCP_PATH)
    await old.request("register_tools", {"serverName": "flaky", "tools": ["t"]})
    new = await node_socket(VCP_PATH)
    await new.request("register_tools", {"serverName": "flaky", "tools": ["t"]})
    assert await wait_closed(old) == 4000
    await old.close()

    old_beat = timezone.now() - timedelta(hours=1)
    await Node.objects.filter(pk="vcp-flaky").aupdate(last_heartbeat=old_beat)
    await runtime.flush_heartbeats()
    row = await Node.objects.aget(pk="vcp-flaky")
    assert row.last_heartbeat > old_beat
    assert row.status == "online" and row.connection_id == new.ack["data"]["connectionId"]


# --- unregister_tools ----------------------------------------------------------------------
async def test_unregister_tools_removes_them(node_socket):
    node = await node_socket(VCP_PATH)
    await node.request("register_tools", {"serverName": "box", "tools": MANIFESTS + [{"name": "Third"}]})
    reply = await node.request("unregister_tools", {"tools": ["FluxGen", "NotThere"]})
    assert reply["type"] == "unregister_ack"
    assert reply["data"]["tools"] == ["SciCalculator", "Third"]
    row = await Node.objects.aget(pk="vcp-box")
    assert row.tools == ["SciCalculator", "Third"]
    assert row.capabilities == ["SciCalculator", "Third"]
    assert [m["name"] for m in row.tool_manifests] == ["SciCalculator", "Third"]


async def test_unregister_tools_before_registration(node_socket):
    node = await node_socket(VCP_PATH)
    reply = await node.request("unregister_tools", {"tools": ["a"]})
    assert reply["type"] == "error" and reply["data"]["code"] == "not_registered"


# --- report_ip -----------------------------------------------------------------------------
async def test_report_ip_is_stored(node_socket):
    node = await node_socket(VCP_PATH)
    await node.request("register_tools", {"serverName": "box", "tools": ["t"]})
    await node.send(
        "report_ip", {"serverName": "box", "localIPs": ["192.168.1.5"], "publicIP": "203.0.113.9"}
    )
    assert (await node.request("ping"))["type"] == "pong"  # report_ip has no reply
    row = await Node.objects.aget(pk="vcp-box")
    assert row.ips == {"localIPs": ["192.168.1.5"], "publicIP": "203.0.113.9"}


async def test_report_ip_before_registration_is_applied_on_registration(node_socket):
    node = await node_socket(VCP_PATH)
    await node.send(
        "report_ip", {"serverName": "early", "localIPs": ["10.0.0.2"], "publicIP": "198.51.100.1"}
    )
    assert await node.nothing_received()
    await node.request("register_tools", {"serverName": "early", "tools": ["t"]})
    row = await Node.objects.aget(pk="vcp-early")
    assert row.ips == {"localIPs": ["10.0.0.2"], "publicIP": "198.51.100.1"}


async def test_report_ip_bad_fields(node_socket):
    node = await node_socket(VCP_PATH)
    await node.request("register_tools", {"serverName": "box", "tools": ["t"]})
    reply = await node.request("report_ip", {"localIPs": "10.0.0.1"})
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_payload"
    assert "localIPs" in reply["data"]["message"]
    assert (await Node.objects.aget(pk="vcp-box")).ips == {}


# --- update_static_placeholders, ping, node_log -------------------------------------------------
async def test_update_static_placeholders_is_accepted_and_ignored(node_socket):
    node = await node_socket(VCP_PATH)
    await node.send("update_static_placeholders", {"placeholders": {"{{VCPWeather}}": "sunny"}})
    assert await node.nothing_received()
    await node.request("register_tools", {"serverName": "box", "tools": ["t"]})
    await node.send("update_static_placeholders", {"placeholders": {"a": "b"}})
    assert await node.nothing_received()
    row = await Node.objects.aget(pk="vcp-box")
    assert "sunny" not in json.dumps(
        await database_sync_to_async(lambda: list(Node.objects.values()))(), default=str
    )
    assert row.status == "online"


async def test_ping_pong_before_and_after_registration(node_socket):
    node = await node_socket()
    for _ in range(2):
        reply = await node.request("ping", {})
        assert reply["type"] == "pong"
        assert isinstance(reply["data"]["timestamp"], int)
        await node.register("pinger")


async def test_node_log_is_stored(node_socket):
    node = await node_socket()
    await node.register("logger-1")
    await node.send("node_log", {"level": "warn", "message": "disk almost full", "context": {"free": 3}})
    await node.send("node_log", {"level": "warning", "message": "second"})
    await node.send("node_log", {"message": "third"})
    assert (await node.request("ping"))["type"] == "pong"
    logs = [log async for log in NodeLog.objects.filter(node_id="logger-1", event="node_log").order_by("id")]
    assert [(log.level, log.message) for log in logs] == [
        ("warn", "disk almost full"),
        ("warn", "second"),
        ("info", "third"),
    ]
    assert logs[0].context == {"free": 3}


async def test_node_log_bad_fields_and_before_registration(node_socket):
    node = await node_socket()
    reply = await node.request("node_log", {"message": "hi"})
    assert reply["type"] == "error" and reply["data"]["code"] == "not_registered"
    await node.register("logger-2")
    reply = await node.request("node_log", {"level": "loud", "message": "hi"})
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_payload"
    assert "level" in reply["data"]["message"]
    reply = await node.request("node_log", {"nodeId": "someone", "message": "hi"})
    assert reply["data"]["code"] == "node_mismatch"
    assert not await NodeLog.objects.filter(event="node_log").aexists()
