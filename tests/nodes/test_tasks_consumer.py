"""Tasks over the node connection (PROTOCOL §3.2–3.4, §2.5): task_assign, task_result,
task_result_ack and its refusals, task_cancel, time-outs, retries, the queue, and
VCP's execute_tool / tool_result. Background loops are off: sweeps run by hand."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from django.utils import timezone

from nodes import services, task_result_services, task_services
from nodes.models import Node, Task
from nodes.runtime import runtime
from tests.conftest import TEST_SHARED_KEY

pytestmark = pytest.mark.django_db(transaction=True)

VCP_PATH = f"/vcp-distributed-server/VCP_Key={TEST_SHARED_KEY}"


@pytest.fixture(autouse=True)
def fast_tasks(settings):
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS = 0
    runtime._buffer.clear()
    runtime.vcp_connections.clear()
    yield settings
    runtime._buffer.clear()
    runtime.vcp_connections.clear()


async def submit(tool_name: str = "echo", **fields) -> Task:
    fields.setdefault("tool_args", {"x": 1})
    result = await database_sync_to_async(task_services.task_submit)(tool_name=tool_name, **fields)
    return result.task


async def load(task_id: str) -> Task:
    return await Task.objects.aget(pk=task_id)


async def eventually(check, timeout: float = 3.0):
    """Poll an async check until it holds: the consumer dispatches after it replies."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(0.02)


async def has_reason(task_id: str, expected: str) -> bool:
    """The task's waitingReason becomes ``expected`` (reported on failure)."""

    async def check():
        return (await load(task_id)).waiting_reason == expected

    if await eventually(check):
        return True
    print("waitingReason:", (await load(task_id)).waiting_reason)
    return False


async def sweep_timeouts() -> None:
    await task_services_send(task_services.task_sweep_timeouts)


async def task_services_send(step) -> None:
    from nodes.runtime import send_all

    await send_all(await database_sync_to_async(step)())


async def result(node, task_id: str, node_id: str, **fields) -> dict:
    data = {"taskId": task_id, "nodeId": node_id, "success": True, "result": {"ok": True}}
    data.update(fields)
    return await node.request("task_result", data)


# --- assign / result / ack ------------------------------------------------------------------------
async def test_task_is_assigned_at_once_and_completed(node_socket):
    node = await node_socket()
    await node.register("n1", capabilities=["echo"])
    task = await submit(capability="echo", priority=7, timeout_ms=5000)
    assign = await node.receive()
    assert assign == {
        "type": "task_assign",
        "data": {
            "taskId": task.task_id,
            "nodeId": "n1",
            "toolName": "echo",
            "toolArgs": {"x": 1},
            "capability": "echo",
            "timeout": 5000,
            "priority": 7,
            "attempt": 1,
        },
    }
    running = await load(task.task_id)
    assert running.status == "assigned" and running.assigned_node_id == "n1" and running.attempts == 1
    ack = await result(node, task.task_id, "n1", result={"x": 1}, executionTime=12)
    assert ack["type"] == "task_result_ack"
    assert (
        ack["data"]["success"] is True
        and ack["data"]["taskId"] == task.task_id
        and ack["data"]["nodeId"] == "n1"
    )
    done = await load(task.task_id)
    assert done.status == "succeeded" and done.result == {"x": 1} and done.execution_time_ms == 12
    assert done.finished_at is not None
    stats = await Node.objects.aget(pk="n1")
    assert (stats.total_tasks, stats.completed_tasks, stats.failed_tasks) == (1, 1, 0)


async def test_failed_result_is_final_unless_retryable(node_socket):
    node = await node_socket()
    await node.register("n1")
    task = await submit()
    await node.receive_type("task_assign")
    error = {"code": "tool_error", "message": "boom", "retryable": False}
    ack = await result(node, task.task_id, "n1", success=False, error=error)
    assert ack["data"]["success"] is True
    failed = await load(task.task_id)
    assert failed.status == "failed" and failed.error["message"] == "boom" and failed.attempts == 1
    assert (await Node.objects.aget(pk="n1")).failed_tasks == 1


async def test_retryable_failure_is_retried(node_socket):
    node = await node_socket()
    await node.register("n1")
    task = await submit(max_retries=1)
    await node.receive_type("task_assign")
    error = {"code": "busy", "message": "try later", "retryable": True}
    await result(node, task.task_id, "n1", success=False, error=error)
    again = await node.receive_type("task_assign")
    assert again["data"]["attempt"] == 2
    await result(node, task.task_id, "n1", success=False, error=error)
    failed = await load(task.task_id)
    assert failed.status == "failed" and failed.attempts == 2 and failed.error["code"] == "busy"


async def test_the_next_task_goes_out_when_a_result_frees_the_slot(node_socket):
    node = await node_socket()
    await node.register("n1")
    first = await submit()
    second = await submit()
    assert (await node.receive_type("task_assign"))["data"]["taskId"] == first.task_id
    assert await node.nothing_received()
    assert await has_reason(second.task_id, "node 'n1' is at its limit of 1 task(s)")
    await result(node, first.task_id, "n1")
    assert (await node.receive_type("task_assign"))["data"]["taskId"] == second.task_id


# --- refusals -------------------------------------------------------------------------------------
async def test_unknown_task_is_refused(node_socket):
    node = await node_socket()
    await node.register("n1")
    ack = await result(node, "t-nope", "n1")
    assert ack["type"] == "task_result_ack"
    assert ack["data"]["success"] is False and ack["data"]["error"]["code"] == "unknown_task"
    assert ack["data"]["taskId"] == "t-nope"


async def test_result_from_another_node_is_refused_and_changes_nothing(node_socket):
    n1 = await node_socket()
    await n1.register("n1", capabilities=["a"])
    n2 = await node_socket()
    await n2.register("n2", capabilities=["b"])
    task = await submit(capability="a")
    await n1.receive_type("task_assign")
    ack = await result(n2, task.task_id, "n2")
    assert ack["data"]["success"] is False and ack["data"]["error"]["code"] == "node_mismatch"
    assert (await load(task.task_id)).status == "assigned"
    # Claiming to be the other node on this connection is refused too.
    ack = await result(n2, task.task_id, "n1")
    assert ack["data"]["error"]["code"] == "node_mismatch"
    assert (await load(task.task_id)).status == "assigned"


async def test_duplicate_and_wrong_attempt_results_are_stale(node_socket):
    node = await node_socket()
    await node.register("n1")
    task = await submit()
    await node.receive_type("task_assign")
    ack = await result(node, task.task_id, "n1", attempt=2)
    assert ack["data"]["error"]["code"] == "stale_result"
    assert (await result(node, task.task_id, "n1", attempt=1, result=1))["data"]["success"] is True
    duplicate = await result(node, task.task_id, "n1", result=2)
    assert duplicate["data"]["success"] is False and duplicate["data"]["error"]["code"] == "stale_result"
    assert (await load(task.task_id)).result == 1


async def test_results_from_many_nodes_at_once_are_written_in_batches_and_each_is_answered(
    node_socket, monkeypatch
):
    batches: list[int] = []
    real = task_result_services.task_complete_many

    def counted(*, results):
        batches.append(len(results))
        return real(results=results)

    monkeypatch.setattr(task_result_services, "task_complete_many", counted)
    nodes = []
    for i in range(6):
        node = await node_socket()
        await node.register(f"n{i}", capabilities=[f"c{i}"])
        nodes.append(node)
    tasks = [await submit(capability=f"c{i}") for i in range(6)]
    for node in nodes:
        assert (await node.receive())["type"] == "task_assign"
    # All six results arrive together; n5 answers for n4's task (not its own).
    for i, node in enumerate(nodes):
        task_id = tasks[4 if i == 5 else i].task_id
        await node.send("task_result", {"taskId": task_id, "nodeId": f"n{i}", "success": True, "result": i})
    replies = [await node.receive_type("task_result_ack") for node in nodes]

    assert [r["data"]["success"] for r in replies] == [True] * 5 + [False]
    assert replies[5]["data"]["error"]["code"] == "node_mismatch"
    assert [(await load(task.task_id)).result for task in tasks] == [0, 1, 2, 3, 4, None]
    assert sum(batches) == 6 and len(batches) < 6  # results that waited shared a batch


async def test_bad_task_result_payload_is_invalid(node_socket):
    node = await node_socket()
    await node.register("n1")
    reply = await node.request("task_result", {"taskId": "t-1", "nodeId": "n1"})
    assert reply["type"] == "task_result_ack"
    assert (
        reply["data"]["error"]["code"] == "invalid_payload" and "success" in reply["data"]["error"]["message"]
    )
    reply = await node.request("task_result", {"taskId": 5, "success": True})
    assert reply["data"]["error"]["code"] == "invalid_payload"


async def test_task_result_before_registration_is_refused(node_socket):
    node = await node_socket()
    reply = await node.request("task_result", {"taskId": "t-1", "success": True})
    assert reply["type"] == "error" and reply["data"]["code"] == "not_registered"


# --- time-outs and retries ------------------------------------------------------------------------
async def test_timeout_without_retries_ends_timed_out_and_cancels(node_socket):
    node = await node_socket()
    await node.register("n1")
    task = await submit(timeout_ms=50, max_retries=0)
    await node.receive_type("task_assign")
    await asyncio.sleep(0.1)
    await sweep_timeouts()
    cancel = await node.receive_type("task_cancel")
    assert cancel["data"] == {"taskId": task.task_id, "reason": "timeout"}
    ended = await load(task.task_id)
    assert ended.status == "timed_out" and ended.error["code"] == "timeout" and ended.finished_at
    late = await result(node, task.task_id, "n1")
    assert late["data"]["success"] is False and late["data"]["error"]["code"] == "stale_result"
    assert (await load(task.task_id)).status == "timed_out"


async def test_timeout_with_retries_moves_to_another_node(node_socket):
    n1 = await node_socket()
    await n1.register("n1")
    task = await submit(timeout_ms=50, max_retries=2)
    assert (await n1.receive_type("task_assign"))["data"]["attempt"] == 1
    n2 = await node_socket()
    await n2.register("n2")
    await asyncio.sleep(0.1)
    await runtime.sweep()
    await n1.receive_type("task_cancel")
    retry = await n2.receive_type("task_assign")
    assert retry["data"]["attempt"] == 2 and retry["data"]["nodeId"] == "n2"
    # n1's late answer is stale; n2's counts.
    assert (await result(n1, task.task_id, "n1"))["data"]["error"]["code"] == "stale_result"
    assert (await result(n2, task.task_id, "n2"))["data"]["success"] is True
    done = await load(task.task_id)
    assert done.status == "succeeded" and done.tried_node_ids == ["n1", "n2"]


async def test_retry_waits_for_the_backoff(node_socket, settings):
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS = 60000
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MAX_MS = 45000
    node = await node_socket()
    await node.register("n1")
    task = await submit(timeout_ms=30, max_retries=1)
    await node.receive_type("task_assign")
    await asyncio.sleep(0.06)
    await runtime.sweep()
    waiting = await load(task.task_id)
    assert waiting.status == "queued" and waiting.waiting_reason.startswith("retry back-off until ")
    assert timedelta(seconds=44) < waiting.not_before - timezone.now() <= timedelta(seconds=45)
    assert await node.receive_type("task_cancel")
    assert await node.nothing_received()


async def test_disconnect_requeues_to_the_other_node(node_socket):
    n1 = await node_socket()
    await n1.register("n1")
    task = await submit()
    await n1.receive_type("task_assign")
    n2 = await node_socket()
    await n2.register("n2")
    await n1.close()
    retry = await n2.receive_type("task_assign")
    assert retry["data"]["taskId"] == task.task_id and retry["data"]["attempt"] == 2
    assert (await Node.objects.aget(pk="n1")).failed_tasks == 1


async def test_disconnect_without_retries_fails_with_node_lost(node_socket):
    n1 = await node_socket()
    await n1.register("n1")
    task = await submit(max_retries=0)
    await n1.receive_type("task_assign")
    await n1.close()
    lost = await load(task.task_id)
    assert lost.status == "failed" and lost.error["code"] == "node_lost"


async def test_unregister_requeues_and_tells_the_node_to_stop(node_socket):
    n1 = await node_socket()
    await n1.register("n1")
    task = await submit()
    await n1.receive_type("task_assign")
    await n1.send("node_unregister", {"nodeId": "n1"})
    await n1.receive_type("node_unregistered")
    cancel = await n1.receive_type("task_cancel")
    assert cancel["data"] == {"taskId": task.task_id, "reason": "node_unregistered"}
    assert await has_reason(task.task_id, "no node is connected")
    queued = await load(task.task_id)
    assert queued.status == "queued" and queued.attempts == 1


async def test_heartbeat_timeout_requeues(node_socket, settings):
    settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS = 1000
    n1 = await node_socket()
    await n1.register("n1")
    task = await submit()
    await n1.receive_type("task_assign")
    await Node.objects.filter(pk="n1").aupdate(last_heartbeat=timezone.now() - timedelta(seconds=5))
    await runtime.sweep()
    requeued = await load(task.task_id)
    assert requeued.status == "queued" and requeued.error["code"] == "node_lost"
    assert (await n1.receive_type("task_cancel"))["data"]["reason"] == "node_offline"


async def test_sweep_requeues_tasks_of_a_connection_that_is_gone(node_socket):
    n1 = await node_socket()
    await n1.register("n1")
    task = await submit()
    await n1.receive_type("task_assign")
    # As if the hub process holding this attempt's socket died without saying so.
    await Task.objects.filter(pk=task.task_id).aupdate(assigned_connection_id="c-dead")
    await runtime.sweep()
    again = await n1.receive_type("task_assign")
    assert again["data"]["attempt"] == 2
    assert (await load(task.task_id)).assigned_connection_id == (
        await Node.objects.aget(pk="n1")
    ).connection_id


async def test_takeover_requeues_attempts_of_the_old_connection(node_socket):
    old = await node_socket()
    await old.register("n1")
    task = await submit()
    await old.receive_type("task_assign")
    new = await node_socket()
    await new.register("n1")
    again = await new.receive_type("task_assign")
    assert again["data"]["taskId"] == task.task_id and again["data"]["attempt"] == 2
    assert (await old.communicator.receive_output(3))["code"] == 4000  # replaced
    assert (await load(task.task_id)).status == "assigned"


# --- the queue ----------------------------------------------------------------------------------
async def test_waiting_task_is_delivered_when_a_capable_node_registers(node_socket):
    task = await submit(capability="gpu")
    node = await node_socket()
    await node.register("cpu-node", capabilities=["cpu"])
    expected = "no connected node has capability 'gpu'"
    assert await has_reason(task.task_id, expected)
    gpu = await node_socket()
    await gpu.register("gpu-node", capabilities=["gpu"])
    assert (await gpu.receive_type("task_assign"))["data"]["taskId"] == task.task_id
    assert await node.nothing_received()


async def test_priority_then_age_order(node_socket):
    low = await submit(priority=1)
    normal_old = await submit(priority=5)
    high = await submit(priority=10)
    normal_new = await submit(priority=5)
    node = await node_socket()
    await node.register("n1")
    order = []
    for _ in range(4):
        assign = await node.receive_type("task_assign")
        order.append(assign["data"]["taskId"])
        await result(node, assign["data"]["taskId"], "n1")
    assert order == [high.task_id, normal_old.task_id, normal_new.task_id, low.task_id]


async def test_load_is_spread_over_nodes(node_socket):
    n1 = await node_socket()
    await n1.register("n1", config={"maxConcurrentTasks": 3})
    n2 = await node_socket()
    await n2.register("n2", config={"maxConcurrentTasks": 3})
    for _ in range(4):
        await submit()
    for node in (n1, n2):
        await node.receive_type("task_assign")
        await node.receive_type("task_assign")
        assert await node.nothing_received()


async def test_busy_node_is_used_only_when_no_online_node_is_free(node_socket):
    n1 = await node_socket()
    await n1.register("n1", config={"maxConcurrentTasks": 5})
    await n1.request("heartbeat", {"nodeId": "n1", "status": "busy"})
    n2 = await node_socket()
    await n2.register("n2", config={"maxConcurrentTasks": 1})
    await submit()
    await submit()
    assert (await n2.receive_type("task_assign"))["data"]["nodeId"] == "n2"
    assert (await n1.receive_type("task_assign"))["data"]["nodeId"] == "n1"


async def test_draining_node_gets_nothing_until_resumed(node_socket):
    node = await node_socket()
    await node.register("n1")
    await database_sync_to_async(services.node_set_draining)(node_id="n1", draining=True)
    task = await submit()
    assert await node.nothing_received()
    assert await has_reason(task.task_id, "every suitable node is draining")
    await database_sync_to_async(services.node_set_draining)(node_id="n1", draining=False)
    await runtime.dispatch()
    assert (await node.receive_type("task_assign"))["data"]["taskId"] == task.task_id


async def test_pinned_task_waits_for_its_node(node_socket):
    other = await node_socket()
    await other.register("other")
    task = await submit(node_id="pinned")
    assert await other.nothing_received()
    pinned = await node_socket()
    await pinned.register("pinned")
    assert (await pinned.receive_type("task_assign"))["data"]["taskId"] == task.task_id


async def test_declared_tools_route_tasks(node_socket):
    hasher = await node_socket()
    await hasher.register("hasher", tools=["sha256"])
    echo = await node_socket()
    await echo.register("echoer", tools=["echo"])
    task = await submit("sha256", tool_args={"text": "a"})
    assert (await hasher.receive_type("task_assign"))["data"]["taskId"] == task.task_id
    assert await echo.nothing_received()


# --- cancel and dependencies --------------------------------------------------------------------
async def test_cancel_running_task_tells_the_node(node_socket):
    node = await node_socket()
    await node.register("n1")
    task = await submit()
    await node.receive_type("task_assign")
    await database_sync_to_async(task_services.task_cancel)(task_id=task.task_id, reason="no longer needed")
    cancel = await node.receive_type("task_cancel")
    assert cancel["data"] == {"taskId": task.task_id, "reason": "no longer needed"}
    assert (await load(task.task_id)).status == "cancelled"
    late = await result(node, task.task_id, "n1")
    assert late["data"]["error"]["code"] == "stale_result"


async def test_dependent_task_runs_after_its_dependency(node_socket):
    node = await node_socket()
    await node.register("n1", config={"maxConcurrentTasks": 5})
    first = await submit()
    second = await submit(depends_on=[first.task_id])
    assert (await node.receive_type("task_assign"))["data"]["taskId"] == first.task_id
    assert await node.nothing_received()
    assert (await load(second.task_id)).waiting_reason.startswith("waiting for dependencies")
    await result(node, first.task_id, "n1")
    assert (await node.receive_type("task_assign"))["data"]["taskId"] == second.task_id


async def test_dependents_of_a_failed_task_are_cancelled(node_socket):
    node = await node_socket()
    await node.register("n1")
    first = await submit()
    second = await submit(depends_on=[first.task_id])
    third = await submit(depends_on=[second.task_id])
    await node.receive_type("task_assign")
    await result(node, first.task_id, "n1", success=False, error={"code": "x", "message": "no"})
    for dependent in (second, third):
        await eventually(lambda t=dependent: Task.objects.filter(pk=t.task_id, status="cancelled").aexists())
        ended = await load(dependent.task_id)
        assert ended.status == "cancelled" and ended.error["code"] == "dependency_failed"
    assert await node.nothing_received()


# --- VCP ----------------------------------------------------------------------------------------
async def vcp_node(node_socket, tools=("SciCalculator",)):
    node = await node_socket(path=VCP_PATH)
    await node.send("register_tools", {"serverName": "calc", "tools": [{"name": t} for t in tools]})
    assert (await node.receive_type("register_ack"))["data"]["success"] is True
    return node


async def test_vcp_node_gets_execute_tool_and_completes_with_tool_result(node_socket):
    node = await vcp_node(node_socket)
    task = await submit("SciCalculator", tool_args={"expression": "1+1"})
    execute = await node.receive_type("execute_tool")
    assert execute["data"] == {
        "requestId": task.task_id,
        "toolName": "SciCalculator",
        "toolArgs": {"expression": "1+1"},
    }
    await node.send("tool_result", {"requestId": task.task_id, "status": "success", "result": {"value": 2}})
    await asyncio.sleep(0.1)
    done = await load(task.task_id)
    assert done.status == "succeeded" and done.result == {"value": 2} and done.assigned_node_id == "vcp-calc"


async def test_vcp_tool_result_error_string_fails_the_task(node_socket):
    node = await vcp_node(node_socket)
    task = await submit("SciCalculator")
    await node.receive_type("execute_tool")
    await node.send(
        "tool_result", {"requestId": task.task_id, "status": "error", "error": "division by zero"}
    )
    await asyncio.sleep(0.1)
    failed = await load(task.task_id)
    assert failed.status == "failed" and failed.error == {"code": "tool_error", "message": "division by zero"}


async def test_vcp_tool_result_refusals(node_socket):
    node = await vcp_node(node_socket)
    reply = await node.request("tool_result", {"requestId": "t-unknown", "status": "success"})
    assert reply["type"] == "error" and reply["data"]["code"] == "unknown_task"
    reply = await node.request("tool_result", {"requestId": "t-1", "status": "maybe"})
    assert reply["type"] == "error" and reply["data"]["code"] == "invalid_payload"
    task = await submit("SciCalculator", max_retries=0)
    await node.receive_type("execute_tool")
    await node.send("tool_result", {"requestId": task.task_id, "status": "success", "result": 1})
    reply = await node.request("tool_result", {"requestId": task.task_id, "status": "success", "result": 2})
    assert reply["data"]["code"] == "stale_result"
    assert (await load(task.task_id)).result == 1


async def test_vcp_tools_are_matched(node_socket):
    node = await vcp_node(node_socket, tools=("FluxGen",))
    task = await submit("SciCalculator")
    assert await node.nothing_received()
    assert await has_reason(task.task_id, "no connected node offers tool 'SciCalculator'")
