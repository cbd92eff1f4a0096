"""The database unreachable (PROTOCOL is silent; docs/DECISIONS.md "Database outage"):
nodes get ``service_unavailable`` in the reply of what they sent, the API a 503 in its
envelope, heartbeats are still acknowledged, and one log line says what is missing.
The real outage (a PostgreSQL server stopped and started) is in
tests/e2e/test_faults_e2e.py."""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from nodes import auth, registration_services, services
from nodes.auth import node_key_create
from nodes.protocol import CloseCode
from tests.conftest import NodeSocket, close_communicator, wait_closed
from tests.conftest import database_refused as refused

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("database_recovers_after"),
]


REGISTER = {"nodeId": "n1", "name": "n1", "type": "worker", "capabilities": []}


async def test_a_registration_without_database_is_refused_as_service_unavailable(node_socket, monkeypatch):
    node = await node_socket()
    monkeypatch.setattr(registration_services, "node_register_many", refused)
    # When a node registers while the database is down
    reply = await node.request("node_register", REGISTER)
    # Then its own reply says so, and it may try again (not counted as bad input)
    assert reply["type"] == "node_registered"
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "service_unavailable"
    assert "database is unavailable" in reply["data"]["error"]["message"]
    monkeypatch.undo()
    assert (await node.request("node_register", REGISTER))["data"]["success"] is True


async def test_a_lock_conflict_is_refused_as_service_unavailable_without_blaming_an_outage(
    node_socket, monkeypatch
):
    from django.db import OperationalError

    from nodes.service_health import database_health

    class Deadlock(Exception):
        sqlstate = "40P01"  # PostgreSQL's deadlock_detected, after the batch's own retries

    def conflict(*args, **kwargs):
        raise OperationalError("deadlock detected") from Deadlock()

    node = await node_socket()
    monkeypatch.setattr(registration_services, "node_register_many", conflict)
    reply = await node.request("node_register", REGISTER)
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "service_unavailable"
    assert "conflicting change" in reply["data"]["error"]["message"]
    assert database_health.available
    monkeypatch.undo()
    assert (await node.request("node_register", REGISTER))["data"]["success"] is True


async def test_heartbeats_are_acknowledged_while_the_database_is_down(node_socket, monkeypatch):
    node = await node_socket()
    await node.register("n1")
    monkeypatch.setattr(services, "node_flush_heartbeats", refused)
    for _ in range(3):
        ack = await node.request("heartbeat", {"nodeId": "n1"})
        assert ack["data"]["success"] is True


async def test_many_refusals_do_not_close_the_socket(node_socket, monkeypatch, settings):
    settings.APEXBRIDGE_MAX_PROTOCOL_ERRORS = 3
    node = await node_socket()
    monkeypatch.setattr(registration_services, "node_register_many", refused)
    for _ in range(6):
        reply = await node.request("node_register", REGISTER)
        assert reply["data"]["error"]["code"] == "service_unavailable"
    assert (await node.request("ping"))["type"] == "pong"


async def test_a_node_key_handshake_without_database_is_told_to_try_again_later(monkeypatch):
    _key, plain = await database_sync_to_async(node_key_create)(name="worker key")
    monkeypatch.setattr(auth, "authenticate_keys", refused)
    # When a node with its own key connects while the database is down, the key
    # cannot be checked: the socket is closed with 4013, not refused as a wrong key
    from apexbridge.asgi import application

    communicator = WebsocketCommunicator(application, f"/abp-distributed-server/ABP_Key={plain}")
    connected, _ = await communicator.connect()
    assert connected
    assert await wait_closed(NodeSocket(communicator)) == CloseCode.TRY_AGAIN_LATER
    await close_communicator(communicator)


async def test_a_shared_key_handshake_needs_no_database(node_socket, monkeypatch):
    monkeypatch.setattr(auth, "authenticate_keys", refused)
    # The shared key is checked without the database: the node is accepted, and
    # learns about the outage from its registration's reply (it may retry).
    node = await node_socket()
    assert node.ack["type"] == "connection_ack"
    monkeypatch.setattr(registration_services, "node_register_many", refused)
    reply = await node.request("node_register", REGISTER)
    assert reply["data"]["error"]["code"] == "service_unavailable"


@pytest.mark.parametrize("presented", ["not-a-key", "abk__nothing", "x" * 600])
async def test_what_cannot_be_a_key_is_refused_even_without_database(monkeypatch, presented):
    monkeypatch.setattr(auth, "authenticate_keys", refused)
    # Neither the shared key nor a per-node key's form: refused at once (HTTP 403),
    # not told to come back later as if the key might be right
    from apexbridge.asgi import application

    communicator = WebsocketCommunicator(application, f"/abp-distributed-server/ABP_Key={presented}")
    connected, _ = await communicator.connect()
    assert not connected
    await close_communicator(communicator)
