"""Shared fixtures.

Backends: the suite runs on whatever ``DATABASE_URL`` / ``REDIS_URL`` say (SQLite and
the in-memory layer when unset). ``APEXBRIDGE_REQUIRE_SERVICES=1`` turns a skipped
PostgreSQL/Redis/browser test into a failure (CI sets it).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest
from channels.testing import WebsocketCommunicator

REQUIRE_SERVICES = os.environ.get("APEXBRIDGE_REQUIRE_SERVICES") == "1"


def pytest_configure(config):
    # The SQLite test database is a file under var/ (see settings.DATABASES TEST NAME).
    from django.conf import settings

    Path(settings.BASE_DIR, "var").mkdir(exist_ok=True)


TEST_SHARED_KEY = "test-shared-key-0123456789"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def skip_or_fail(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (APEXBRIDGE_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _fresh_redis_quota_state(settings):
    """With REDIS_URL (pass 2 of make test) quota buckets live in Redis, outside the
    test database: empty them so one test's spending never limits the next."""
    if settings.REDIS_URL:
        import redis

        client = redis.Redis.from_url(settings.REDIS_URL)
        keys = list(client.scan_iter(f"{settings.APEXBRIDGE_QUOTA_REDIS_PREFIX}*"))
        if keys:
            client.delete(*keys)
    yield


@pytest.fixture(autouse=True)
def _empty_heartbeat_buffer():
    """The process's heartbeat buffer outlives a test: start and end each one empty."""
    from nodes.runtime import runtime

    runtime._buffer.clear()
    runtime.vcp_connections.clear()
    yield
    runtime._buffer.clear()
    runtime.vcp_connections.clear()


async def wait_closed(node: NodeSocket, timeout: float = 3) -> int:
    """The close code the hub sent to this socket (other frames are skipped)."""
    while True:
        output = await node.communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            return output.get("code", 1000)


@pytest.fixture(autouse=True)
def _no_kept_node_rows():
    """The dispatch pass's kept node rows outlive a test's database: start each empty."""
    from nodes.node_rows import node_rows

    node_rows.forget()


@pytest.fixture(autouse=True)
def _hub_settings(settings):
    settings.APEXBRIDGE_VCP_KEY = TEST_SHARED_KEY
    # Consumer tests drive the sweeps by hand; e2e tests run real processes with loops.
    settings.APEXBRIDGE_BACKGROUND_LOOPS = False
    settings.APEXBRIDGE_LLM_MODEL = None
    settings.APEXBRIDGE_LLM_MODELS = []
    return settings


class NodeSocket:
    """A test node on a ``WebsocketCommunicator``: send/receive frames as dicts."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator
        self.ack: dict | None = None

    async def send(self, message_type: str, data: dict | None = None) -> None:
        await self.communicator.send_to(text_data=json.dumps({"type": message_type, "data": data or {}}))

    async def send_raw(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def receive(self, timeout: float = 3) -> dict:
        return json.loads(await self.communicator.receive_from(timeout=timeout))

    async def receive_type(self, message_type: str, timeout: float = 3) -> dict:
        """Receive until a frame of this type arrives (other frames are skipped)."""
        while True:
            message = await self.receive(timeout)
            if message["type"] == message_type:
                return message

    async def request(self, message_type: str, data: dict | None = None, timeout: float = 3) -> dict:
        await self.send(message_type, data)
        return await self.receive(timeout)

    async def register(self, node_id: str = "n1", **fields) -> dict:
        data = {"nodeId": node_id, "name": fields.pop("name", node_id), "type": "worker", "capabilities": []}
        data.update(fields)
        reply = await self.request("node_register", data)
        assert reply["type"] == "node_registered", reply
        return reply

    async def nothing_received(self, timeout: float = 0.2) -> bool:
        return await self.communicator.receive_nothing(timeout=timeout)

    async def close(self) -> None:
        # A consumer still finishing slow disconnect work (an LLM call being cancelled
        # on a loaded machine) gets longer than the default second.
        await close_communicator(self.communicator, timeout=10)


async def close_communicator(communicator: WebsocketCommunicator, timeout: float = 1) -> None:
    """Disconnect a test socket in a fixture's teardown. Past the time-out the
    communicator cancels the consumer, which must not fail the next test's set-up."""
    try:
        await communicator.disconnect(timeout=timeout)
    except (asyncio.CancelledError, TimeoutError):
        pass


async def open_node_socket(
    path: str = f"/abp-distributed-server/VCP_Key={TEST_SHARED_KEY}", headers=None
) -> tuple[NodeSocket, bool, object]:
    from apexbridge.asgi import application

    communicator = WebsocketCommunicator(application, path, headers=headers or [])
    connected, code = await communicator.connect()
    node = NodeSocket(communicator)
    if connected:
        node.ack = await node.receive()
    else:
        # Let the refused consumer finish now, as daphne's disconnect would: left
        # running, it holds a channel-layer receive until the event loop is torn down.
        await communicator.disconnect()
    return node, connected, code


@pytest.fixture
async def node_socket():
    """Factory for connected test nodes; all are disconnected at the end."""
    opened: list[NodeSocket] = []

    async def make(path: str | None = None, headers=None) -> NodeSocket:
        kwargs = {"headers": headers}
        if path is not None:
            kwargs["path"] = path
        node, connected, code = await open_node_socket(**kwargs)
        assert connected, f"handshake refused: {code}"
        opened.append(node)
        return node

    yield make
    for node in opened:
        await node.close()


@pytest.fixture
def make_node(db):
    """Factory for node rows as a connected, registered node would leave them;
    ``fields`` override any column (``status="offline", connection_id=""``…)."""
    from django.utils import timezone

    from nodes.models import Node

    def make(node_id: str, **fields) -> Node:
        now = timezone.now()
        defaults = {
            "name": node_id,
            "status": "online",
            "last_heartbeat": now,
            "last_seen": now,
            "connected_at": now,
            "connection_id": f"c-{node_id}",
            "channel_name": f"test.channel.{node_id}",
            "capabilities": ["echo"],
        }
        defaults.update(fields)
        return Node.objects.create(node_id=node_id, **defaults)

    return make


# --- a database that refuses connections (tests/nodes/test_database_outage.py, tests/api) ---
def database_refused(*args, **kwargs):
    """Stands in for a service or selector while PostgreSQL refuses connections."""
    from django.db import OperationalError

    raise OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')


@pytest.fixture
def database_recovers_after():
    """The process-wide database health is back to healthy after the test."""
    from nodes.service_health import database_health

    yield
    database_health.recovered()
