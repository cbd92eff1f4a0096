"""Connecting, registering, heartbeats, reconnecting and the outbox (PROTOCOL §1–2)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from nodes.client import Node, RegistrationError
from tests.client.fake_hub import KEY, FakeHub
from tests.client.helpers import assign, until


async def test_registers_on_the_recommended_path_with_its_tools_and_limits(hub, make_node):
    node = make_node(hub, name="reg-node", capabilities=["gpu", "text"], max_concurrent=3, tags=["lab"])

    @node.tool("add")
    def add(a: int, b: int) -> int:
        return a + b

    [frame] = await hub.wait_for("node_register")

    assert hub.current.path == f"/abp-distributed-server/VCP_Key={KEY}"
    data = frame.data
    assert data["name"] == "reg-node"
    assert data["type"] == "worker"
    assert data["capabilities"] == ["gpu", "text"]
    assert data["tools"] == ["add"]
    assert data["config"]["maxConcurrentTasks"] == 3
    assert data["config"]["tags"] == ["lab"]
    assert isinstance(data["version"], str)
    assert "nodeId" not in data  # first start, no id yet: the hub generates one
    assert await node.wait_registered(5)
    assert node.node_id == "hub-generated-1"


async def test_node_id_given_by_the_hub_is_kept_for_the_next_start(hub, make_node, tmp_path):
    state_file = tmp_path / "state.json"
    first = make_node(hub, state_file=state_file)
    await first.wait_registered(5)
    first.request_stop()
    assert await asyncio.wait_for(first.task, 10) == "shutdown"

    second = make_node(hub, state_file=state_file)
    await second.wait_registered(5)

    registrations = hub.of_type("node_register")
    assert registrations[1].data["nodeId"] == "hub-generated-1"
    assert json.loads(state_file.read_text())["nodeId"] == "hub-generated-1"


async def test_explicit_node_id_is_registered(hub, make_node):
    make_node(hub, node_id="worker-7")
    [frame] = await hub.wait_for("node_register")
    assert frame.data["nodeId"] == "worker-7"


async def test_heartbeats_at_the_interval_from_connection_ack(make_node):
    # Given a hub announcing a 100 ms interval (the client's own default is 30 s)
    hub = await FakeHub(heartbeat_interval_ms=100).start()
    try:
        node = make_node(hub, node_id="hb-node")
        # Then heartbeats arrive at the hub's pace, carrying the node's stats
        frames = await hub.wait_for("heartbeat", count=3, timeout=10)
        assert frames[0].data == {
            "nodeId": "hb-node",
            "status": "online",
            "stats": {"activeTasks": 0, "completedTasks": 0, "failedTasks": 0},
        }
        # And the stats follow the work done
        await hub.send("task_assign", assign("t-hb", "nope"))
        await hub.wait_for("heartbeat", lambda data: data["stats"]["failedTasks"] == 1)
        assert node.connected
    finally:
        await hub.stop()


async def test_reconnects_and_registers_again_after_the_hub_drops_it(hub, make_node, caplog):
    caplog.set_level(logging.INFO, logger="apexbridge.node")
    node = make_node(hub, node_id="re-node")
    node.add_tool("echo", lambda args: args, raw_args=True)
    await hub.wait_for("node_register")

    # When the hub drops the connection, twice
    for expected in (2, 3):
        await hub.drop_connections()
        # Then the node comes back and registers again, tools included
        frames = await hub.wait_for("node_register", count=expected)
        assert frames[-1].data["nodeId"] == "re-node"
        assert frames[-1].data["tools"] == ["echo"]
    assert "Reconnecting in" in caplog.text

    # And it works on the new connection
    await until(lambda: node.connected)
    await hub.send("task_assign", assign("t-after", "echo", {"ok": True}))
    [result] = await hub.wait_for("task_result")
    assert result.connection == 2 and result.data["result"] == {"ok": True}


async def test_reconnects_when_the_hub_comes_back_on_the_same_port(make_node):
    hub = await FakeHub().start()
    node = make_node(hub, node_id="back-node")
    await node.wait_registered(5)
    port = hub.port
    await hub.stop()
    await until(lambda: not node.connected)
    await asyncio.sleep(0.3)  # a few failed attempts while the hub is away

    new_hub = await FakeHub().start(port=port)
    try:
        [frame] = await new_hub.wait_for("node_register", timeout=10)
        assert frame.data["nodeId"] == "back-node"
    finally:
        await new_hub.stop()


def test_backoff_grows_is_capped_and_jittered(tmp_path):
    node = Node("b", key="k", backoff_initial=1, backoff_max=30, state_file=tmp_path / "s.json")
    for failures, ceiling in [(0, 1), (1, 2), (3, 8), (10, 30), (50, 30)]:
        delays = [node.backoff_delay(failures) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter: not every node retries at the same instant


async def test_results_made_while_disconnected_are_sent_after_reconnect(make_node, caplog):
    caplog.set_level(logging.INFO, logger="apexbridge.node")
    hub = await FakeHub().start()
    node = make_node(hub, node_id="outbox-node", max_concurrent=2, outbox_limit=1)
    release = asyncio.Event()

    @node.tool("wait")
    async def wait(label: str) -> dict:
        await release.wait()
        return {"label": label}

    await node.wait_registered(5)
    await hub.send("task_assign", assign("t-1", "wait", {"label": "first"}))
    await hub.send("task_assign", assign("t-2", "wait", {"label": "second"}))
    await until(lambda: node.runner.active == 2)

    # Given the hub goes away while both tasks run, and they finish meanwhile
    port = hub.port
    await hub.stop()
    await until(lambda: not node.connected)
    release.set()
    await until(lambda: node.runner.active == 0)

    # When the hub is back
    new_hub = await FakeHub().start(port=port)
    try:
        # Then the queued result is delivered on the new connection; the outbox held
        # one frame, so the older result was dropped, and the log says which
        [result] = await new_hub.wait_for("task_result")
        assert result.data["taskId"] == "t-2"
        assert result.data["nodeId"] == "outbox-node"
        assert result.data["result"] == {"label": "second"}
        assert "dropped task_result for task t-1" in caplog.text
        await asyncio.sleep(0.2)
        assert len(new_hub.of_type("task_result")) == 1
    finally:
        await new_hub.stop()


async def test_refused_registration_fails_clearly(make_node):
    hub = await FakeHub(register_error={"code": "forbidden", "message": "key may not register gpu"}).start()
    try:
        node = make_node(hub, capabilities=["gpu"])
        with pytest.raises(RegistrationError) as raised:
            await asyncio.wait_for(node.task, 10)
        assert raised.value.code == "forbidden"
        assert "key may not register gpu" in str(raised.value)
        assert len(hub.connections) == 1  # no retry loop against a hub that said no
    finally:
        await hub.stop()


async def test_wrong_key_fails_clearly(hub, make_node):
    node = make_node(hub, key="not-the-right-key")
    with pytest.raises(RegistrationError) as raised:
        await asyncio.wait_for(node.task, 10)
    assert "HTTP 403" in str(raised.value)
    assert hub.refused_handshakes == 1


async def test_key_never_appears_in_logs(make_node, caplog):
    # Given full debug logging, websockets' own handshake lines included
    caplog.set_level(logging.DEBUG)
    secret = "s3cret-node-key-that-must-not-leak"
    hub = await FakeHub(key=secret).start()
    try:
        node = make_node(hub, key=secret, node_id="quiet-node")
        await node.wait_registered(5)
        await hub.drop_connections()
        await hub.wait_for("node_register", count=2)
        await until(lambda: node.connected)
        await hub.send("task_assign", assign("t-k", "missing"))
        await hub.wait_for("task_result")
    finally:
        await hub.stop()
    # Then the key is nowhere in the client's log, though the connect lines are there
    client_log = "\n".join(
        caplog.handler.format(record) for record in caplog.records if not record.name.startswith("tests.")
    )
    assert "Connecting to ws://127.0.0.1" in client_log
    assert "VCP_Key=***" in client_log
    assert "GET /abp-distributed-server/VCP_Key=*** HTTP/1.1" in client_log  # websockets' debug line
    assert secret not in client_log


async def test_unacknowledged_result_is_sent_again_after_reconnect(make_node):
    # Given a hub that received a result but dropped the connection before acknowledging it
    hub = await FakeHub(ack_results=False).start()
    try:
        node = make_node(hub, node_id="ack-node")
        node.add_tool("echo", lambda args: args, raw_args=True)
        await node.wait_registered(5)
        await hub.send("task_assign", assign("t-unacked", "echo", {"n": 1}))
        await hub.wait_for("task_result")
        hub.ack_results = True
        await hub.drop_connections()
        # Then the result goes out again on the next connection
        frames = await hub.wait_for("task_result", count=2)
        assert frames[1].connection == 1
        assert frames[1].data["taskId"] == "t-unacked" and frames[1].data["result"] == {"n": 1}
    finally:
        await hub.stop()


UNAVAILABLE = {"code": "service_unavailable", "message": "The hub's database is unavailable"}


async def test_registration_refused_as_service_unavailable_is_retried(make_node):
    # Given a hub whose database is down
    hub = await FakeHub(register_error=UNAVAILABLE).start()
    try:
        node = make_node(hub, node_id="patient-node")
        # Then the node does not give up: it reconnects with back-off
        await hub.wait_connections(3)
        assert not node.task.done()
        # And registers once the hub can take it
        hub.register_error = None
        assert await node.wait_registered(5)
    finally:
        await hub.stop()


async def test_result_refused_as_service_unavailable_is_sent_again(make_node, monkeypatch):
    monkeypatch.setattr("nodes.client.node.RESULT_RETRY_S", 0.2)
    # Given a hub that cannot store results for now
    hub = await FakeHub(result_error=UNAVAILABLE).start()
    try:
        node = make_node(hub, node_id="keeping-node")
        node.add_tool("echo", lambda args: args, raw_args=True)
        await node.wait_registered(5)
        await hub.send("task_assign", assign("t-kept", "echo", {"n": 2}))
        await hub.wait_for("task_result", count=2)
        # When it can again, the next copy is acknowledged and no more are sent
        hub.result_error = None
        frames = await hub.wait_for("task_result", count=3)
        assert {f.data["taskId"] for f in frames} == {"t-kept"}
        assert frames[-1].data["result"] == {"n": 2}
        await asyncio.sleep(0.6)
        assert len(hub.of_type("task_result")) == 3
    finally:
        await hub.stop()
