"""The database unreachable (PROTOCOL is silent; docs/DECISIONS.md "Database outage"):
nodes get ``service_unavailable`` in the reply of what they sent, the API a 503 in its
envelope, heartbeats are still acknowledged, and one log line says what is missing.
The real outage (a PostgreSQL server stopped and started) is in
tests/e2e/test_faults_e2e.py."""

from __future__ import annotations

import pytest

from nodes import services
from tests.conftest import database_refused as refused

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("database_recovers_after"),
]


REGISTER = {"nodeId": "n1", "name": "n1", "type": "worker", "capabilities": []}


async def test_a_registration_without_database_is_refused_as_service_unavailable(node_socket, monkeypatch):
    node = await node_socket()
    monkeypatch.setattr(services, "node_register", refused)
    # When a node registers while the database is down
    reply = await node.request("node_register", REGISTER)
    # Then its own reply says so, and it may try again (not counted as bad input)
    assert reply["type"] == "node_registered"
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "service_unavailable"
    assert "database is unavailable" in reply["data"]["error"]["message"]
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
    monkeypatch.setattr(services, "node_register", refused)
    for _ in range(6):
        reply = await node.request("node_register", REGISTER)
        assert reply["data"]["error"]["code"] == "service_unavailable"
    assert (await node.request("ping"))["type"] == "pong"
