"""The node handshake (PROTOCOL §1, §1.2): paths, key forms, connection_ack, refusals."""

from __future__ import annotations

import logging
import time

import pytest
from channels.db import database_sync_to_async

from nodes.auth import node_key_create, node_key_revoke
from nodes.models import Node, NodeLog
from tests.conftest import TEST_SHARED_KEY, open_node_socket

pytestmark = pytest.mark.django_db(transaction=True)


async def refused(path: str, headers=None) -> bool:
    node, connected, _code = await open_node_socket(path=path, headers=headers)
    if connected:
        await node.close()
    return not connected


@pytest.mark.parametrize(
    "path, deprecated",
    [
        (f"/abp-distributed-server/VCP_Key={TEST_SHARED_KEY}", False),
        (f"/distributed-server/VCP_Key={TEST_SHARED_KEY}", False),
        (f"/vcp-distributed-server/VCP_Key={TEST_SHARED_KEY}", True),
        (f"/abp-distributed-server/ABP_Key={TEST_SHARED_KEY}", False),
        (f"/distributed-server/ABP_Key={TEST_SHARED_KEY}/", False),
        (f"/vcp-distributed-server/VCP_Key={TEST_SHARED_KEY}/", True),
    ],
)
async def test_connection_ack_on_every_path(node_socket, settings, path, deprecated):
    settings.APEXBRIDGE_HEARTBEAT_INTERVAL_MS = 12000
    settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS = 34000
    before = int(time.time() * 1000)
    node = await node_socket(path)
    after = int(time.time() * 1000)

    assert node.ack["type"] == "connection_ack"
    ack = node.ack["data"]
    assert ack["connectionId"].startswith("c-")
    assert ack["serverId"] == ack["connectionId"]
    assert ack["hubVersion"] == settings.HUB_VERSION
    assert before - 1000 <= ack["serverTime"] <= after + 1000
    assert ack["heartbeatInterval"] == 12000
    assert ack["heartbeatTimeout"] == 34000
    assert ack["deprecated"] is deprecated
    assert ack["message"] == "Connected to Apex Bridge"
    # The connection is usable right away.
    assert (await node.request("ping"))["type"] == "pong"


async def test_every_connection_gets_its_own_id(node_socket):
    first = await node_socket()
    second = await node_socket()
    assert first.ack["data"]["connectionId"] != second.ack["data"]["connectionId"]


@pytest.mark.parametrize(
    "path", ["/abp-distributed-server", "/abp-distributed-server/", "/distributed-server"]
)
async def test_bearer_key_with_bare_prefix_path(node_socket, path):
    node = await node_socket(path, headers=[(b"authorization", f"Bearer {TEST_SHARED_KEY}".encode())])
    assert node.ack["data"]["deprecated"] is False
    reply = await node.register("bearer-1")
    assert reply["data"]["success"] is True


@pytest.mark.parametrize(
    "path, headers",
    [
        ("/abp-distributed-server/", None),
        ("/abp-distributed-server/VCP_Key=", None),
        ("/abp-distributed-server/VCP_Key=not-the-key", None),
        ("/vcp-distributed-server/ABP_Key=not-the-key/", None),
        ("/abp-distributed-server", [(b"authorization", b"Bearer not-the-key")]),
        ("/abp-distributed-server", [(b"authorization", b"Basic " + TEST_SHARED_KEY.encode())]),
        (f"/abp-distributed-server/VCP_Key={TEST_SHARED_KEY}x", None),
        (f"/abp-distributed-server/VCP_Key={TEST_SHARED_KEY[:-1]}", None),
    ],
)
async def test_refused_before_accept_and_nothing_created(caplog, path, headers):
    caplog.set_level(logging.DEBUG)
    assert await refused(path, headers)
    assert await Node.objects.acount() == 0
    assert await NodeLog.objects.acount() == 0
    refusals = [r for r in caplog.records if "refused node handshake" in r.getMessage()]
    assert len(refusals) == 1
    for record in caplog.records:
        text = record.getMessage()
        assert "not-the-key" not in text
        assert TEST_SHARED_KEY[:-1] not in text


async def test_no_shared_key_configured_accepts_no_shared_key(settings):
    settings.APEXBRIDGE_VCP_KEY = None
    assert await refused(f"/abp-distributed-server/VCP_Key={TEST_SHARED_KEY}")
    assert await refused("/abp-distributed-server/VCP_Key=")


async def test_unknown_path_is_not_a_node_endpoint():
    with pytest.raises(ValueError):
        await open_node_socket(path=f"/other-server/VCP_Key={TEST_SHARED_KEY}")


# --- per-node keys ------------------------------------------------------------------------
async def test_per_node_key_in_path_and_header(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="worker key")
    node = await node_socket(f"/abp-distributed-server/ABP_Key={plain}")
    assert (await node.register("pk-1"))["data"]["success"] is True
    other = await node_socket("/distributed-server", headers=[(b"authorization", f"Bearer {plain}".encode())])
    assert (await other.register("pk-2"))["data"]["success"] is True
    row = await Node.objects.aget(pk="pk-1")
    assert row.key_id == _key.pk


async def test_revoked_key_is_refused(caplog):
    key, plain = await database_sync_to_async(node_key_create)(name="old key")
    assert await database_sync_to_async(node_key_revoke)(key=key)
    caplog.set_level(logging.DEBUG)
    assert await refused(f"/abp-distributed-server/VCP_Key={plain}")
    assert await Node.objects.acount() == 0
    secret = plain.split("_", 2)[2]
    assert all(secret not in r.getMessage() for r in caplog.records)


async def test_wrong_secret_with_a_real_prefix_is_refused():
    _key, plain = await database_sync_to_async(node_key_create)(name="k")
    forged = plain[:-4] + ("AAAA" if not plain.endswith("AAAA") else "BBBB")
    assert await refused(f"/abp-distributed-server/VCP_Key={forged}")


async def test_key_bound_to_a_node_id_may_only_register_that_id(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="bound", node_id="bound-1")
    node = await node_socket(f"/abp-distributed-server/VCP_Key={plain}")

    reply = await node.request("node_register", {"nodeId": "someone-else", "name": "x", "capabilities": []})
    assert reply["type"] == "node_registered"
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "forbidden"
    assert "bound-1" in reply["data"]["error"]["message"]
    assert not await Node.objects.filter(pk="someone-else").aexists()

    # Without a nodeId the bound id is used; the connection survived the refusal.
    reply = await node.request("node_register", {"name": "x", "capabilities": []})
    assert reply["data"]["success"] is True
    assert reply["data"]["nodeId"] == "bound-1"


async def test_key_with_capabilities_may_only_register_those(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="caps", capabilities=["echo", "sha256"])
    node = await node_socket(f"/abp-distributed-server/VCP_Key={plain}")

    reply = await node.request(
        "node_register", {"nodeId": "cap-1", "name": "x", "capabilities": ["echo", "shell"]}
    )
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "forbidden"
    assert "shell" in reply["data"]["error"]["message"]
    assert not await Node.objects.filter(pk="cap-1").aexists()

    reply = await node.request("node_register", {"nodeId": "cap-1", "name": "x", "capabilities": ["echo"]})
    assert reply["data"]["success"] is True


async def test_capability_key_restricts_vcp_auto_registration(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="caps", capabilities=["echo"])
    node = await node_socket(f"/vcp-distributed-server/VCP_Key={plain}")
    reply = await node.request("register_tools", {"serverName": "box", "tools": ["echo", "rm_rf"]})
    assert reply["type"] == "register_ack"
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "forbidden"
    assert await Node.objects.acount() == 0
