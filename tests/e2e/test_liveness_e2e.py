"""Node liveness against a real hub process, on SQLite and on
PostgreSQL + Redis: heartbeats, time-out, reconnect, takeover, refused keys.

The hub runs with FAST_ENV: heartbeat timeout 3 s, sweep 0.5 s, flush 0.3 s.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.e2e.harness import FAST_ENV, HubServer, WsNode, wait_for

pytestmark = pytest.mark.e2e

TIMEOUT_S = int(FAST_ENV["APEXBRIDGE_HEARTBEAT_TIMEOUT_MS"]) / 1000
SWEEP_S = int(FAST_ENV["APEXBRIDGE_HEARTBEAT_SWEEP_MS"]) / 1000
# Detection must happen within timeout + sweep; the margin covers process scheduling.
DETECTION_BOUND_S = TIMEOUT_S + SWEEP_S + 3


def query(hub: HubServer, sql: str, *params) -> list[tuple]:
    """Read the hub's own database (SQLite file or PostgreSQL)."""
    url = hub.env["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=10) as conn:
            return conn.execute(sql, params).fetchall()
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql.replace("?", "%s"), params).fetchall()


def node_row(hub: HubServer, node_id: str) -> dict | None:
    rows = query(
        hub, "SELECT status, connection_id, last_heartbeat FROM nodes_node WHERE node_id = ?", node_id
    )
    if not rows:
        return None
    status, connection_id, last_heartbeat = rows[0]
    return {"status": status, "connection_id": connection_id, "last_heartbeat": last_heartbeat}


async def status_of(hub: HubServer, node_id: str) -> str | None:
    row = await asyncio.to_thread(node_row, hub, node_id)
    return row and row["status"]


async def heartbeat_for(node: WsNode, node_id: str, seconds: float, interval: float = 0.5) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        await node.send("heartbeat", {"nodeId": node_id})
        ack = await node.recv_type("heartbeat_ack")
        assert ack["data"]["success"] is True
        await asyncio.sleep(interval)


async def test_silent_node_goes_offline_and_comes_back(hub_any):
    node = await WsNode(hub_any.node_url()).connect()
    try:
        assert node.ack["data"]["heartbeatTimeout"] == int(FAST_ENV["APEXBRIDGE_HEARTBEAT_TIMEOUT_MS"])
        await node.register("live-1", capabilities=["echo"])

        # Given a node that heartbeats for longer than the timeout, it stays online.
        await heartbeat_for(node, "live-1", TIMEOUT_S + 1)
        assert await status_of(hub_any, "live-1") == "online"

        # When it stops heartbeating (socket still open), it is seen offline in time.
        await wait_for(
            lambda: _is(status_of(hub_any, "live-1"), "offline"),
            timeout=DETECTION_BOUND_S,
            what="live-1 offline after missing heartbeats",
        )
        token = await asyncio.to_thread(hub_any.staff_token)
        status, body = await hub_any.aapi("GET", "/api/admin/nodes/live-1", token=token)
        assert status == 200, body
        assert body["node"]["status"] == "offline"

        # Then a heartbeat on the same connection brings it back online.
        await node.send("heartbeat", {"nodeId": "live-1"})
        ack = await node.recv_type("heartbeat_ack")
        assert ack["data"]["success"] is True and ack["data"]["status"] == "online"
        await wait_for(lambda: _is(status_of(hub_any, "live-1"), "online"), timeout=5, what="live-1 online")
    finally:
        await node.close()


async def _is(awaitable, expected: str) -> bool:
    return await awaitable == expected


async def test_closed_socket_is_offline_and_reconnect_is_online(hub_any):
    node = await WsNode(hub_any.node_url()).connect()
    await node.register("live-2")
    await node.close()
    await wait_for(lambda: _is(status_of(hub_any, "live-2"), "offline"), timeout=5, what="offline on close")
    row = await asyncio.to_thread(node_row, hub_any, "live-2")
    assert row["connection_id"] == ""

    again = await WsNode(hub_any.node_url(prefix="distributed-server")).connect()
    try:
        await again.register("live-2")
        assert await status_of(hub_any, "live-2") == "online"
        await heartbeat_for(again, "live-2", TIMEOUT_S + SWEEP_S + 1)
        assert await status_of(hub_any, "live-2") == "online"
    finally:
        await again.close()


async def test_takeover_closes_the_older_socket_with_4000(hub_any):
    old = await WsNode(hub_any.node_url()).connect()
    new = await WsNode(hub_any.node_url()).connect()
    try:
        await old.register("live-3")
        await new.register("live-3")
        await asyncio.wait_for(old.ws.wait_closed(), 10)
        assert old.ws.close_code == 4000
        row = await asyncio.to_thread(node_row, hub_any, "live-3")
        assert row["status"] == "online"
        assert row["connection_id"] == new.ack["data"]["connectionId"]
        # The new socket keeps the node alive past the timeout.
        await heartbeat_for(new, "live-3", TIMEOUT_S + SWEEP_S + 1)
        assert await status_of(hub_any, "live-3") == "online"
    finally:
        await new.close()
        await old.close()


async def test_wrong_key_is_refused_with_403_and_not_logged(hub_any):
    wrong = "wrong-key-do-not-log-7f3a9c"
    for url in (
        hub_any.node_url(key=wrong),
        hub_any.node_url(key=wrong, prefix="vcp-distributed-server"),
        f"{hub_any.ws_base}/abp-distributed-server",
    ):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url, open_timeout=10)
        assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            f"{hub_any.ws_base}/abp-distributed-server",
            additional_headers={"Authorization": f"Bearer {wrong}"},
            open_timeout=10,
        )
    assert refused.value.response.status_code == 403

    assert query(hub_any, "SELECT COUNT(*) FROM nodes_node")[0][0] == 0
    log = hub_any.log_text()
    assert "refused node handshake" in log
    assert wrong not in log

    # The right key in a header works on the same server.
    node = await WsNode(f"{hub_any.ws_base}/abp-distributed-server").connect(
        additional_headers={"Authorization": f"Bearer {hub_any.env['APEXBRIDGE_VCP_KEY']}"}
    )
    try:
        await node.register("live-4")
    finally:
        await node.close()
    accepted = await WsNode(hub_any.node_url()).connect()
    await accepted.close()
    # The server's logs show the paths, never the keys in them (daphne's access log;
    # uvicorn's error log names refused handshakes; granian logs no paths).
    log = hub_any.log_text()
    shown = {"daphne": "VCP_Key=***", "uvicorn": "VCP_Key%3D***"}.get(hub_any.server)
    if shown:
        assert shown in log
    assert hub_any.env["APEXBRIDGE_VCP_KEY"] not in log


async def test_bad_frames_do_not_hurt_the_connection(hub_any):
    node = await WsNode(hub_any.node_url()).connect()
    try:
        await node.register("live-5")
        await node.ws.send("{not json")
        assert (await node.recv_type("error"))["data"]["code"] == "invalid_json"
        await node.ws.send(b"\x00\x01binary")
        assert (await node.recv_type("error"))["data"]["code"] == "invalid_message"
        await node.ws.send(json.dumps({"type": "heartbeat", "data": {"nodeId": "someone-else"}}))
        ack = await node.recv_type("heartbeat_ack")
        assert ack["data"]["error"]["code"] == "node_mismatch"
        await node.send("ping")
        assert (await node.recv_type("pong"))["type"] == "pong"
        assert await status_of(hub_any, "live-5") == "online"
    finally:
        await node.close()
