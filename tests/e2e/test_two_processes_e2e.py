"""Two real hub processes sharing one PostgreSQL database and one Redis: nodes on
both, one admin socket hears both, the liveness sweep acts once, tasks cross
processes, LLM quotas are shared."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.harness import AdminEvents, WsNode, keep_heartbeating, wait_for
from tests.llm_server import LoopbackLLMServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def llm_upstream():
    server = LoopbackLLMServer().start()
    yield server
    server.stop()


async def llm_call(node: WsNode, request_id: str) -> dict:
    await node.send(
        "llm_request", {"requestId": request_id, "messages": [{"role": "user", "content": request_id}]}
    )
    while True:
        reply = await node.recv_type("llm_response", timeout=15)
        if reply["data"]["requestId"] == request_id:
            return reply["data"]


async def test_two_hub_processes_share_registry_events_liveness_tasks_and_quotas(make_hub, llm_upstream):
    # Given two hub processes on one PostgreSQL database and one Redis, with the LLM
    # proxy on a loopback upstream and a quota of 2 requests per node (no refill to speak of)
    env = {
        "APEXBRIDGE_LLM_MODEL": "openai/test-model",
        "APEXBRIDGE_LLM_API_BASE": llm_upstream.api_base,
        "APEXBRIDGE_LLM_API_KEY": "sk-test",
        "APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE": "1",
        "APEXBRIDGE_QUOTA_BURST_MULTIPLIER": "2",
    }
    hub_a = make_hub("services", env=env, name="a")
    hub_b = make_hub(
        "services",
        env=env,
        database_url=hub_a.env["DATABASE_URL"],
        redis_url=hub_a.env["REDIS_URL"],
        name="b",
    )
    token = hub_a.staff_token()
    events_url = f"{hub_a.ws_base}/ws/admin/events/?token={token}"
    async with AdminEvents(events_url) as admin:
        node_a = await WsNode(hub_a.node_url()).connect()
        node_b = await WsNode(hub_b.node_url()).connect()
        silent = await WsNode(hub_b.node_url()).connect()
        beating = asyncio.create_task(keep_heartbeating([node_a, node_b]))
        try:
            # When nodes register on both processes
            await node_a.register("two-a", capabilities=["cap-a"])
            await node_b.register("two-b", capabilities=["cap-b"])
            await silent.register("two-silent", capabilities=[])

            # Then the one admin socket (on hub A) hears the registrations of both
            await wait_for(
                lambda: (
                    admin.of("node_registered")
                    and {e["data"]["node"]["nodeId"] for e in admin.of("node_registered")}
                    >= {"two-a", "two-b", "two-silent"}
                ),
                timeout=10,
                what="node_registered from both hubs",
            )
            status, body = await hub_b.aapi("GET", "/api/admin/nodes?limit=50", token=token)
            assert status == 200
            assert {"two-a", "two-b", "two-silent"} <= {n["nodeId"] for n in body["nodes"]}

            # When a task is submitted through each hub for the node on the other one
            for submit_hub, node, capability in ((hub_a, node_b, "cap-b"), (hub_b, node_a, "cap-a")):
                status, body = await submit_hub.aapi(
                    "POST",
                    "/api/tasks",
                    {"toolName": "echo", "toolArgs": {"via": submit_hub.name}, "capability": capability},
                    token=token,
                )
                assert status == 201, body
                task_id = body["task"]["taskId"]
                assign = await node.recv_type("task_assign", timeout=10)
                assert assign["data"]["taskId"] == task_id
                await node.send(
                    "task_result", {"taskId": task_id, "success": True, "result": assign["data"]["toolArgs"]}
                )
                # Then the submitting hub sees it finished, with the node's result
                status, body = await submit_hub.aapi("GET", f"/api/tasks/{task_id}?wait=10", token=token)
                assert status == 200 and body["task"]["status"] == "succeeded", body
                assert body["task"]["result"] == {"via": submit_hub.name}

            # When one node (on hub B) stops heartbeating but keeps its socket open
            offline = await wait_for(
                lambda: admin.of("node_status_changed", nodeId="two-silent", newStatus="offline"),
                timeout=15,
                what="the silent node going offline",
            )
            # Then exactly one offline event is published, though both processes sweep
            await asyncio.sleep(2.0)  # four more sweeps of each process
            assert len(admin.of("node_status_changed", nodeId="two-silent", newStatus="offline")) == 1, (
                offline
            )

            # When a node spends its LLM quota on hub A and then reconnects to hub B
            llm_node = await WsNode(hub_a.node_url()).connect()
            await llm_node.register("two-llm")
            assert (await llm_call(llm_node, f"q1-{time.time_ns()}"))["success"] is True
            assert (await llm_call(llm_node, f"q2-{time.time_ns()}"))["success"] is True
            await llm_node.close()
            llm_node = await WsNode(hub_b.node_url()).connect()
            await llm_node.register("two-llm")
            refused = await llm_call(llm_node, f"q3-{time.time_ns()}")
            await llm_node.close()
            # Then hub B refuses it: the bucket lives in Redis, shared by both processes
            assert refused["success"] is False
            assert refused["error"]["code"] == "quota_exceeded", refused
        finally:
            beating.cancel()
            for node in (node_a, node_b, silent):
                await node.close()
