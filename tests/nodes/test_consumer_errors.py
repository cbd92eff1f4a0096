"""Bad input on the node socket (PROTOCOL §1.1): the right reply, the connection
survives the non-fatal cases, nothing in the database changes, and the fatal ones
close the socket with 4009 / 4008."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async

from nodes.models import Node, NodeLog

pytestmark = pytest.mark.django_db(transaction=True)


def snapshot() -> str:
    nodes = list(Node.objects.order_by("pk").values())
    logs = list(NodeLog.objects.order_by("pk").values())
    return json.dumps([nodes, logs], default=str)


async def db_state() -> str:
    return await database_sync_to_async(snapshot)()


async def still_healthy(node, node_id: str | None) -> None:
    """The connection answers and, if registered, still acts as its node."""
    assert (await node.request("ping"))["type"] == "pong"
    if node_id is not None:
        ack = await node.request("heartbeat", {"nodeId": node_id})
        assert ack["data"]["success"] is True


async def wait_closed(node, timeout: float = 3) -> int:
    while True:
        output = await node.communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            return output.get("code", 1000)


ENVELOPE_ERRORS = [
    ("{not json", "invalid_json"),
    ("   ", "invalid_json"),
    ('{"type": "ping"', "invalid_json"),
    ("[1, 2, 3]", "invalid_message"),
    ('"node_register"', "invalid_message"),
    ("42", "invalid_message"),
    ("null", "invalid_message"),
    ('{"data": {}}', "invalid_message"),
    ('{"type": 7, "data": {}}', "invalid_message"),
    ('{"type": "", "data": {}}', "invalid_message"),
    ('{"type": ["ping"], "data": {}}', "invalid_message"),
    ('{"type": "launch_missiles", "data": {}}', "unknown_type"),
    ('{"type": "handle_ping", "data": {}}', "unknown_type"),
    ('{"type": "connect", "data": {}}', "unknown_type"),
    ('{"type": "node_close", "data": {"code": 1000}}', "unknown_type"),
    ('{"type": "node_send", "data": {"frame": "x"}}', "unknown_type"),
    ("[" * 100000 + "]" * 100000, "invalid_json"),
]


@pytest.mark.parametrize("registered", [False, True])
@pytest.mark.parametrize("text, code", ENVELOPE_ERRORS)
async def test_envelope_errors_are_answered_and_survived(node_socket, text, code, registered):
    node = await node_socket()
    if registered:
        await node.register("e-1")
    before = await db_state()

    await node.send_raw(text)
    reply = await node.receive()

    assert reply["type"] == "error"
    assert reply["data"]["code"] == code
    assert reply["data"]["message"]
    assert isinstance(reply["data"]["timestamp"], int)
    assert await db_state() == before
    await still_healthy(node, "e-1" if registered else None)


async def test_binary_frame_is_invalid_message(node_socket):
    node = await node_socket()
    await node.register("e-2")
    before = await db_state()
    await node.communicator.send_to(bytes_data=json.dumps({"type": "ping", "data": {}}).encode())
    reply = await node.receive()
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_message"
    assert await db_state() == before
    await still_healthy(node, "e-2")


@pytest.mark.parametrize(
    "message_type, reply_type",
    [
        ("node_register", "node_registered"),
        ("heartbeat", "heartbeat_ack"),
        ("node_unregister", "node_unregistered"),
        ("register_tools", "register_ack"),
    ],
)
async def test_data_that_is_not_an_object_gets_the_types_own_reply(node_socket, message_type, reply_type):
    node = await node_socket()
    await node.register("e-3")
    before = await db_state()
    await node.send_raw(json.dumps({"type": message_type, "data": ["not", "an", "object"]}))
    reply = await node.receive()
    assert reply["type"] == reply_type
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "invalid_payload"
    assert "data" in reply["data"]["error"]["message"]
    assert await db_state() == before
    await still_healthy(node, "e-3")


async def test_data_that_is_not_an_object_on_messages_without_own_reply(node_socket):
    node = await node_socket()
    await node.register("e-3b")
    await node.send_raw(json.dumps({"type": "node_log", "data": "text"}))
    reply = await node.receive()
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_payload"
    await still_healthy(node, "e-3b")


@pytest.mark.parametrize(
    "message_type, data",
    [
        ("heartbeat", {"nodeId": "e-4"}),
        ("node_unregister", {"nodeId": "e-4"}),
        ("unregister_tools", {"tools": ["a"]}),
        ("node_log", {"message": "hello"}),
        ("task_result", {"taskId": "t-1", "success": True}),
        ("tool_result", {"requestId": "t-1", "status": "success"}),
        ("llm_request", {"requestId": "r-1", "messages": []}),
        ("llm_cancel", {"requestId": "r-1"}),
        ("pong", {}),
    ],
)
async def test_messages_before_registration_are_not_registered(node_socket, message_type, data):
    node = await node_socket()
    await node.send(message_type, data)
    reply = await node.receive()
    assert reply["type"] == "error"
    assert reply["data"]["code"] == "not_registered"
    assert await Node.objects.acount() == 0
    assert await NodeLog.objects.acount() == 0
    await still_healthy(node, None)


@pytest.mark.parametrize(
    "message_type, data, reply_type",
    [
        ("heartbeat", {"nodeId": "victim", "status": "busy"}, "heartbeat_ack"),
        ("node_unregister", {"nodeId": "victim"}, "node_unregistered"),
        ("node_register", {"nodeId": "victim", "name": "x", "capabilities": []}, "node_registered"),
        ("task_result", {"taskId": "t-1", "nodeId": "victim", "success": True}, "task_result_ack"),
    ],
)
async def test_another_nodes_id_is_node_mismatch_and_changes_nothing(
    node_socket, message_type, data, reply_type
):
    victim = await node_socket()
    await victim.register("victim")
    attacker = await node_socket()
    await attacker.register("attacker")
    before = await db_state()

    reply = await attacker.request(message_type, data)

    assert reply["type"] == reply_type
    assert reply["data"]["success"] is False
    assert reply["data"]["error"]["code"] == "node_mismatch"
    assert reply["data"]["nodeId"] == "victim"
    assert await db_state() == before
    await still_healthy(attacker, "attacker")
    await still_healthy(victim, "victim")


@pytest.mark.parametrize("message_type", ["unregister_tools", "node_log"])
async def test_another_nodes_id_on_messages_without_own_reply(node_socket, message_type):
    node = await node_socket()
    await node.register("e-5")
    before = await db_state()
    reply = await node.request(message_type, {"nodeId": "other", "tools": ["x"], "message": "m"})
    assert reply["type"] == "error" and reply["data"]["code"] == "node_mismatch"
    assert await db_state() == before


async def test_unknown_fields_are_ignored(node_socket):
    node = await node_socket()
    reply = await node.request(
        "node_register",
        {"nodeId": "e-6", "name": "n", "capabilities": [], "futureField": {"x": 1}},
    )
    assert reply["data"]["success"] is True
    ack = await node.request("heartbeat", {"nodeId": "e-6", "mood": "happy"})
    assert ack["data"]["success"] is True


async def test_frame_over_the_limit_closes_with_4009(node_socket, settings):
    settings.APEXBRIDGE_MAX_FRAME_BYTES = 2048
    node = await node_socket()
    await node.register("big-1")
    # Just under the limit is fine.
    small = json.dumps({"type": "ping", "data": {"pad": "x" * 1900}})
    assert len(small.encode()) <= 2048
    assert (await node.request("ping", {"pad": "x" * 1900}))["type"] == "pong"

    await node.send("ping", {"pad": "x" * 2100})
    assert await wait_closed(node) == 4009
    # Closing the socket marks the node offline.
    await node.close()
    assert (await Node.objects.aget(pk="big-1")).status == "offline"


async def test_frame_over_the_limit_counted_in_utf8_bytes(node_socket, settings):
    settings.APEXBRIDGE_MAX_FRAME_BYTES = 2048
    node = await node_socket()
    # 1000 characters, 3000 bytes.
    await node.send("ping", {"pad": "€" * 1000})
    assert await wait_closed(node) == 4009


async def test_too_many_bad_messages_close_with_4008(node_socket, settings):
    settings.APEXBRIDGE_MAX_PROTOCOL_ERRORS = 5
    node = await node_socket()
    await node.register("noisy")
    for _ in range(5):
        await node.send_raw("garbage")
        assert (await node.receive())["data"]["code"] == "invalid_json"
    # Good messages in between do not count.
    await still_healthy(node, "noisy")
    await node.send("no_such_type")
    assert await wait_closed(node) == 4008


async def test_refusals_of_valid_requests_do_not_count_as_bad_messages(node_socket, settings):
    settings.APEXBRIDGE_MAX_PROTOCOL_ERRORS = 2
    settings.APEXBRIDGE_MAX_NODES = 1
    await (await node_socket()).register("first")
    node = await node_socket()
    for _ in range(5):
        reply = await node.request("node_register", {"nodeId": "second", "name": "s", "capabilities": []})
        assert reply["data"]["error"]["code"] == "node_limit_reached"
    await still_healthy(node, None)
