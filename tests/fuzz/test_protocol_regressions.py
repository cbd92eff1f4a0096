"""Regressions found by the protocol fuzzer (tests/fuzz/test_protocol_fuzz.py).

Each of these frames once made the hub answer ``internal_error`` (the database
refused the value) or answer with the wrong code; now each is refused as §1.1
says, the connection stays healthy and nothing stored changes.
"""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async

from nodes import task_services
from nodes.models import Node, NodeLog, Task
from tests.conftest import wait_closed

pytestmark = pytest.mark.django_db(transaction=True)


def snapshot() -> str:
    return json.dumps([list(m.objects.order_by("pk").values()) for m in (Node, NodeLog, Task)], default=str)


async def state() -> str:
    return await database_sync_to_async(snapshot)()


# JSON text a real client can send whose values no column takes: NaN / Infinity
# (Python's json reads them), numbers that overflow to infinity, \u0000 and lone
# surrogates (rejected by PostgreSQL text/jsonb, and SQLite's JSON_VALID for NaN).
BAD_VALUES = ["NaN", "Infinity", "-Infinity", "1e400", '"a\\u0000b"', '"\\ud800"', '"x\\uDFFFy"']


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize(
    "template, reply_type",
    [
        ('{"type":"node_log","data":{"message":"m","context":{"v":%s}}}', "error"),
        ('{"type":"heartbeat","data":{"resources":{"cpu":%s}}}', "heartbeat_ack"),
        ('{"type":"report_ip","data":{"publicIP":"1.2.3.4","extra":[%s]}}', "error"),
        (
            '{"type":"node_register","data":{"nodeId":"rg-1","name":"n","capabilities":[],'
            '"personality":{"v":%s}}}',
            "node_registered",
        ),
        ('{"type":"register_tools","data":{"tools":["echo"],"serverName":"s","x":%s}}', "register_ack"),
    ],
)
async def test_unstorable_values_are_invalid_payload(node_socket, value, template, reply_type):
    node = await node_socket()
    await node.register("rg-1")
    before = await state()

    await node.send_raw(template % value)
    reply = await node.receive()

    assert reply["type"] == reply_type
    error = reply["data"] if reply_type == "error" else reply["data"]["error"]
    assert error["code"] == "invalid_payload"
    assert reply_type == "error" or reply["data"]["success"] is False
    assert await state() == before
    assert (await node.request("heartbeat", {}))["data"]["success"] is True


async def test_escaped_pairs_and_escaped_backslashes_are_still_accepted(node_socket):
    node = await node_socket()
    await node.register("rg-2")
    await node.send_raw('{"type":"node_log","data":{"message":"ok \\ud83d\\ude00 \\\\ud800 \\\\u0000"}}')
    assert (await node.request("ping"))["type"] == "pong"  # no error frame before the pong
    log = await NodeLog.objects.filter(node_id="rg-2", event="node_log").afirst()
    assert log.message == "ok \U0001f600 \\ud800 \\u0000"


@pytest.mark.parametrize("field", ["executionTime", "attempt"])
async def test_task_result_numbers_beyond_the_columns_are_invalid_payload(node_socket, field):
    node = await node_socket()
    await node.register("rg-3")
    await database_sync_to_async(task_services.task_submit)(tool_name="echo", node_id="rg-3")
    task_id = (await node.receive_type("task_assign"))["data"]["taskId"]
    before = await state()

    reply = await node.request("task_result", {"taskId": task_id, "success": True, field: 10**30})

    assert reply["type"] == "task_result_ack"
    assert reply["data"]["success"] is False and reply["data"]["error"]["code"] == "invalid_payload"
    assert field in reply["data"]["error"]["message"]
    assert await state() == before
    # The real result is still accepted afterwards.
    ok = await node.request("task_result", {"taskId": task_id, "success": True, "result": 1})
    assert ok["data"]["success"] is True


async def test_unknown_type_with_bad_data_is_unknown_type(node_socket):
    node = await node_socket()
    await node.send_raw('{"type":"launch","data":[1]}')
    assert (await node.receive())["data"]["code"] == "unknown_type"
    await node.send_raw('{"type":"launch","data":{"x":NaN}}')
    assert (await node.receive())["data"]["code"] == "unknown_type"


async def test_unregistered_node_with_bad_data_is_not_registered(node_socket):
    node = await node_socket()
    await node.send_raw('{"type":"heartbeat","data":"busy"}')
    assert (await node.receive())["data"]["code"] == "not_registered"
    await node.send_raw('{"type":"task_result","data":{"executionTime":NaN}}')
    assert (await node.receive())["data"]["code"] == "not_registered"


@pytest.mark.django_db
def test_unknown_api_path_with_a_newline_answers_the_json_envelope(client):
    # Found by the long API fuzz run: a node id with %0A fell through to Django's HTML 404.
    response = client.get("/api/admin/nodes/%F3%AE%80%BC%0Ag")
    assert response.status_code in (401, 403, 404)
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["success"] is False


@pytest.mark.django_db
def test_a_huge_offset_is_a_400_not_a_server_error(admin_client):
    # Found by the long API fuzz run: an offset past 64 bits made the database fail (500).
    response = admin_client.get("/api/admin/nodes?offset=23126395850500062838784")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_payload"
    assert response.json()["success"] is False


@pytest.mark.parametrize("length, closed", [(300_000, False), (400_000, True)])
async def test_a_big_frame_holding_a_raw_lone_surrogate_is_measured_not_crashed_on(
    node_socket, settings, length, closed
):
    # (Found by the 100,000-frame run: only an in-process client can send a str that
    # is not valid UTF-8; measuring such a frame's size raised UnicodeEncodeError.)
    settings.APEXBRIDGE_MAX_FRAME_BYTES = 1_000_000
    node = await node_socket()
    await node.send_raw("\ud800" + "x" * length + "\ud800" * (length // 2))
    if closed:  # 3 bytes per surrogate: over the limit
        assert await wait_closed(node) == 4009
    else:
        reply = await node.receive()
        assert (reply["type"], reply["data"]["code"]) == ("error", "invalid_json")
        assert (await node.request("ping"))["type"] == "pong"
