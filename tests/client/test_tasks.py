"""Running tasks: results, errors, concurrency, cancel, de-duplication (PROTOCOL §3.2)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest

from nodes.client import ToolError
from nodes.client.demo_tools import register_demo_tools
from tests.client.helpers import assign, until


@pytest.fixture
async def node(hub, make_node):
    node = make_node(hub, node_id="task-node", max_concurrent=2)
    register_demo_tools(node)
    await node.wait_registered(5)
    return node


async def result_of(hub, task_id: str, count: int = 1) -> dict:
    frames = await hub.wait_for("task_result", lambda data: data["taskId"] == task_id, count=count)
    return frames[-1].data


async def test_echo_task_returns_its_args_with_execution_time(hub, node):
    await hub.send("task_assign", assign("t-echo", "echo", {"x": 1, "nested": ["a", None]}, attempt=2))
    data = await result_of(hub, "t-echo")
    assert data["success"] is True
    assert data["result"] == {"x": 1, "nested": ["a", None]}
    assert data["nodeId"] == "task-node"
    assert data["attempt"] == 2
    assert isinstance(data["executionTime"], int) and data["executionTime"] >= 0
    assert "error" not in data


async def test_demo_tools(hub, node):
    await hub.send("task_assign", assign("t-sha", "sha256", {"text": "héllo"}))
    await hub.send("task_assign", assign("t-sleep", "sleep", {"seconds": 0.05}))
    await hub.send("task_assign", assign("t-long", "sleep", {"seconds": 61}))
    await hub.send("task_assign", assign("t-neg", "sleep", {"seconds": -1}))
    await hub.send("task_assign", assign("t-sha-bad", "sha256", {"text": 5}))

    assert (await result_of(hub, "t-sha"))["result"] == {
        "sha256": hashlib.sha256("héllo".encode()).hexdigest()
    }
    assert (await result_of(hub, "t-sleep"))["result"] == {"slept": 0.05}
    for task_id in ("t-long", "t-neg", "t-sha-bad"):
        data = await result_of(hub, task_id)
        assert data["success"] is False
        assert data["error"]["code"] == "invalid_args"
        assert data["error"]["retryable"] is False
    assert "60" in (await result_of(hub, "t-long"))["error"]["message"]


async def test_unknown_tool_is_a_clear_failure(hub, node):
    await hub.send("task_assign", assign("t-unknown", "format_disk"))
    data = await result_of(hub, "t-unknown")
    assert data["success"] is False
    assert data["error"]["code"] == "unknown_tool"
    assert "format_disk" in data["error"]["message"]
    assert data["error"]["retryable"] is False


async def test_tool_errors_are_reported(hub, node):
    @node.tool("picky")
    def picky(level: int) -> None:
        if level > 1:
            raise ToolError("busy upstream", code="upstream_busy", retryable=True, details={"level": level})
        raise RuntimeError("boom")

    await hub.send("task_assign", assign("t-err-1", "picky", {"level": 2}))
    await hub.send("task_assign", assign("t-err-2", "picky", {"level": 1}))
    await hub.send("task_assign", assign("t-err-3", "picky", {"colour": "red"}))

    first = (await result_of(hub, "t-err-1"))["error"]
    assert first == {
        "code": "upstream_busy",
        "message": "busy upstream",
        "retryable": True,
        "details": {"level": 2},
    }
    second = (await result_of(hub, "t-err-2"))["error"]
    assert second["code"] == "tool_error" and "RuntimeError: boom" in second["message"]
    third = (await result_of(hub, "t-err-3"))["error"]
    assert third["code"] == "invalid_args" and "picky" in third["message"]


async def test_task_timeout_is_a_retryable_failure(hub, node):
    await hub.send("task_assign", assign("t-slow", "sleep", {"seconds": 30}, timeout=100))
    data = await result_of(hub, "t-slow")
    assert data["success"] is False
    assert data["error"]["code"] == "timeout"
    assert data["error"]["retryable"] is True


async def test_sync_tools_run_in_threads_side_by_side(hub, node):
    # Two blocking tools that can only finish when both run at the same time.
    barrier = threading.Barrier(2, timeout=5)

    @node.tool("meet")
    def meet() -> str:
        barrier.wait()
        return threading.current_thread().name

    await hub.send("task_assign", assign("t-a", "meet"))
    await hub.send("task_assign", assign("t-b", "meet"))
    a, b = await result_of(hub, "t-a"), await result_of(hub, "t-b")
    assert a["success"] and b["success"]
    assert a["result"] != threading.main_thread().name


async def test_no_more_tasks_run_at_once_than_max_concurrent(hub, node):
    running, most = 0, 0
    release = asyncio.Event()

    @node.tool("hold")
    async def hold(n: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await release.wait()
        finally:
            running -= 1
        return n

    for n in range(5):
        await hub.send("task_assign", assign(f"t-hold-{n}", "hold", {"n": n}))
    await until(lambda: running == 2)
    await asyncio.sleep(0.1)
    assert running == 2 and node.runner.active == 5  # three wait for a slot
    # The heartbeat says the node is busy
    assert node._heartbeat_data()["status"] == "busy"

    release.set()
    results = await hub.wait_for("task_result", count=5)
    assert sorted(frame.data["result"] for frame in results) == [0, 1, 2, 3, 4]
    assert most == 2


async def test_cancel_stops_the_running_coroutine(hub, node):
    started, stopped = asyncio.Event(), asyncio.Event()

    @node.tool("forever")
    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    await hub.send("task_assign", assign("t-forever", "forever"))
    await asyncio.wait_for(started.wait(), 5)
    await hub.send("task_cancel", {"taskId": "t-forever", "reason": "cancelled by staff"})

    data = await result_of(hub, "t-forever")
    assert stopped.is_set()
    assert data["success"] is False
    assert data["error"]["code"] == "cancelled"
    assert "cancelled by staff" in data["error"]["message"]
    assert node.runner.active == 0


async def test_cancelled_task_delivered_again_runs_again(hub, node):
    calls = 0

    @node.tool("count")
    async def count(wait: float) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(wait)
        return calls

    await hub.send("task_assign", assign("t-again", "count", {"wait": 3600}))
    await until(lambda: calls == 1)
    await hub.send("task_cancel", {"taskId": "t-again", "reason": "timed out"})
    await result_of(hub, "t-again")
    await hub.send("task_assign", assign("t-again", "count", {"wait": 0}, attempt=2))
    data = await result_of(hub, "t-again", count=2)
    assert data["success"] is True and data["result"] == 2


async def test_redelivered_finished_task_is_not_run_twice(hub, node):
    calls = 0

    @node.tool("charge")
    def charge(amount: int) -> dict:
        nonlocal calls
        calls += 1
        return {"charged": amount, "at": time.time()}

    await hub.send("task_assign", assign("t-pay", "charge", {"amount": 5}, attempt=1))
    first = await result_of(hub, "t-pay")
    # When the hub delivers the same task again (at-least-once delivery)
    await hub.send("task_assign", assign("t-pay", "charge", {"amount": 5}, attempt=2))
    second = await result_of(hub, "t-pay", count=2)
    # Then the node answers with the result it already has
    assert calls == 1
    assert second["result"] == first["result"]
    assert second["attempt"] == 2


async def test_redelivery_of_a_running_task_does_not_start_it_twice(hub, node):
    calls = 0
    release = asyncio.Event()

    @node.tool("once")
    async def once() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    await hub.send("task_assign", assign("t-once", "once", attempt=1))
    await until(lambda: calls == 1)
    await hub.send("task_assign", assign("t-once", "once", attempt=2))
    await asyncio.sleep(0.1)
    release.set()
    data = await result_of(hub, "t-once")
    assert calls == 1 and data["result"] == 1 and data["attempt"] == 2
    await asyncio.sleep(0.1)
    assert len(hub.of_type("task_result")) == 1
