"""A VCPToolBox-style distributed server against a real hub (PROTOCOL §2.5): it never
sends node_register or heartbeat, only register_tools, and stays online while its
socket is open."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.e2e.harness import FAST_ENV, WsNode, wait_for
from tests.e2e.test_liveness_e2e import node_row, query, status_of

pytestmark = pytest.mark.e2e

TIMEOUT_S = int(FAST_ENV["APEXBRIDGE_HEARTBEAT_TIMEOUT_MS"]) / 1000
SWEEP_S = int(FAST_ENV["APEXBRIDGE_HEARTBEAT_SWEEP_MS"]) / 1000
SECRET = "vcp-plugin-secret-e2e-93b1"
MANIFESTS = [
    {
        "name": "Weather",
        "displayName": "Weather",
        "description": "Forecasts",
        "pluginType": "synchronous",
        "basePath": "/srv/vcp/Plugin/Weather",
        "pluginSpecificEnvConfig": {"WEATHER_API_KEY": SECRET},
        "capabilities": {"invocationCommands": [{"command": "forecast"}]},
    },
    "PlainTool",
]


async def is_status(hub, node_id: str, expected: str) -> bool:
    return await status_of(hub, node_id) == expected


async def test_vcp_node_stays_online_without_heartbeats(hub_any):
    node = await WsNode(hub_any.node_url(prefix="vcp-distributed-server")).connect()
    try:
        assert node.ack["type"] == "connection_ack" and node.ack["data"]["deprecated"] is True
        await node.send(
            "report_ip", {"serverName": "Lab Box", "localIPs": ["10.1.2.3"], "publicIP": "203.0.113.7"}
        )
        await node.send("register_tools", {"serverName": "Lab Box", "tools": MANIFESTS})
        ack = await node.recv_type("register_ack")
        assert ack["data"]["tools"] == ["Weather", "PlainTool"] and ack["data"]["count"] == 2

        # Given no heartbeat at all for well past the timeout, the node is still online.
        await asyncio.sleep(TIMEOUT_S + 2 * SWEEP_S + 1.5)
        row = await asyncio.to_thread(node_row, hub_any, "vcp-Lab-Box")
        assert row["status"] == "online" and row["connection_id"]

        stored = json.dumps(
            await asyncio.to_thread(
                query, hub_any, "SELECT protocol, tools, capabilities, tool_manifests, ips FROM nodes_node"
            ),
            default=str,
        )
        assert '"vcp"' in stored or "vcp" in stored
        assert "10.1.2.3" in stored and "forecast" in stored
        assert SECRET not in stored and "basePath" not in stored and "/srv/vcp" not in stored
        logs = json.dumps(
            await asyncio.to_thread(query, hub_any, "SELECT message, context FROM nodes_nodelog")
        )
        assert SECRET not in logs

        # It still answers pings and may replace its tools.
        await node.send("ping")
        await node.recv_type("pong")
        await node.send("register_tools", {"serverName": "Lab Box", "tools": ["Only"]})
        assert (await node.recv_type("register_ack"))["data"]["tools"] == ["Only"]
    finally:
        await node.close()

    # When the socket closes, the node is offline at once.
    await wait_for(lambda: is_status(hub_any, "vcp-Lab-Box", "offline"), timeout=5, what="VCP node offline")
    assert SECRET not in hub_any.log_text()


async def test_vcp_node_reconnect_takes_over_and_stays_online(hub_any):
    old = await WsNode(hub_any.node_url(prefix="vcp-distributed-server")).connect()
    new = await WsNode(hub_any.node_url(prefix="vcp-distributed-server")).connect()
    try:
        await old.send("register_tools", {"serverName": "flaky", "tools": ["T"]})
        await old.recv_type("register_ack")
        await new.send("register_tools", {"serverName": "flaky", "tools": ["T"]})
        await new.recv_type("register_ack")
        await asyncio.wait_for(old.ws.wait_closed(), 10)
        assert old.ws.close_code == 4000

        await asyncio.sleep(TIMEOUT_S + 2 * SWEEP_S + 1.5)
        row = await asyncio.to_thread(node_row, hub_any, "vcp-flaky")
        assert row["status"] == "online"
        assert row["connection_id"] == new.ack["data"]["connectionId"]
    finally:
        await new.close()
        await old.close()
