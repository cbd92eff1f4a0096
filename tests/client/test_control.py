"""``node_control`` (PROTOCOL §2.4) and graceful stops of a node run as a library."""

from __future__ import annotations

import asyncio

from tests.client.helpers import assign, until


async def start(hub, make_node, **options):
    node = make_node(hub, node_id="ctl-node", max_concurrent=2, **options)
    release = asyncio.Event()

    @node.tool("work")
    async def work(label: str) -> dict:
        await release.wait()
        return {"done": label}

    await node.wait_registered(5)
    return node, release


async def test_drain_finishes_current_work_and_refuses_new_until_resumed(hub, make_node):
    node, release = await start(hub, make_node)
    await hub.send("task_assign", assign("t-running", "work", {"label": "a"}))
    await until(lambda: node.runner.active == 1)

    # When staff drain the node
    await hub.send("node_control", {"action": "drain", "reason": "maintenance"})
    await until(lambda: node.draining)
    # Then a task that still arrives is handed back (retryable), the running one goes on
    await hub.send("task_assign", assign("t-new", "work", {"label": "b"}))
    [refused] = await hub.wait_for("task_result", lambda d: d["taskId"] == "t-new")
    assert refused.data["success"] is False
    assert refused.data["error"]["code"] == "node_draining"
    assert refused.data["error"]["retryable"] is True
    release.set()
    [done] = await hub.wait_for("task_result", lambda d: d["taskId"] == "t-running")
    assert done.data["success"] is True
    assert node.connected  # draining is not leaving

    # When resumed, it takes tasks again
    await hub.send("node_control", {"action": "resume"})
    await until(lambda: not node.draining)
    await hub.send("task_assign", assign("t-later", "work", {"label": "c"}))
    [later] = await hub.wait_for("task_result", lambda d: d["taskId"] == "t-later")
    assert later.data["success"] is True


async def test_unknown_control_action_is_ignored(hub, make_node):
    node, release = await start(hub, make_node)
    await hub.send("node_control", {"action": "dance"})
    release.set()
    await hub.send("task_assign", assign("t-x", "work", {"label": "x"}))
    [result] = await hub.wait_for("task_result")
    assert result.data["success"] is True and node.connected


async def test_shutdown_control_finishes_the_task_then_unregisters(hub, make_node):
    node, release = await start(hub, make_node)
    await hub.send("task_assign", assign("t-last", "work", {"label": "last"}))
    await until(lambda: node.runner.active == 1)

    await hub.send("node_control", {"action": "shutdown", "reason": "decommissioned"})
    await asyncio.sleep(0.1)
    assert not hub.of_type("node_unregister")  # still working on t-last
    release.set()

    assert await asyncio.wait_for(node.task, 10) == "shutdown"
    types = [frame.type for frame in hub.frames if frame.type in ("task_result", "node_unregister")]
    assert types == ["task_result", "node_unregister"]
    assert hub.of_type("task_result")[0].data["success"] is True
    assert hub.of_type("node_unregister")[0].data == {"nodeId": "ctl-node", "reason": "shutdown"}
    assert len(hub.connections) == 1  # no reconnect after a shutdown


async def test_tasks_past_the_grace_period_are_handed_back(hub, make_node):
    node, _release = await start(hub, make_node, shutdown_grace=0.2)
    await hub.send("task_assign", assign("t-stuck", "work", {"label": "never"}))
    await until(lambda: node.runner.active == 1)

    node.request_stop()
    assert await asyncio.wait_for(node.task, 10) == "shutdown"

    [result] = hub.of_type("task_result")
    assert result.data["success"] is False
    assert result.data["error"]["code"] == "node_shutdown"
    assert result.data["error"]["retryable"] is True  # the hub can run it elsewhere
    assert hub.of_type("node_unregister")


async def test_restart_control_ends_run_without_unregistering(hub, make_node):
    node, release = await start(hub, make_node)
    release.set()
    await hub.send("node_control", {"action": "restart", "reason": "upgrade"})
    assert await asyncio.wait_for(node.task, 10) == "restart"
    assert not hub.of_type("node_unregister")


async def test_replaced_connection_is_not_fought_over(hub, make_node):
    # Another process registering the same id closes this connection with 4000.
    node, _release = await start(hub, make_node)
    await hub.drop_connections(code=4000, reason="replaced")
    assert await asyncio.wait_for(node.task, 10) == "removed"
    assert len(hub.connections) == 1


async def test_stop_while_the_hub_does_not_answer_does_not_hang(make_node, tmp_path):
    # Given a "hub" that accepts TCP connections and never says anything
    accepted = asyncio.Event()

    async def silent(reader, writer):
        accepted.set()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        hub = type("Silent", (), {"url": f"ws://127.0.0.1:{port}"})()
        node = make_node(hub, connect_timeout=120)
        await asyncio.wait_for(accepted.wait(), 10)
        # When the node is asked to stop while its handshake hangs
        node.request_stop()
        # Then it stops without waiting out the connect timeout
        assert await asyncio.wait_for(node.task, 10) == "shutdown"
    finally:
        server.close()
        await server.wait_closed()
