"""The node client against a real hub: a hub process plus ``manage.py runnode`` processes.

Each test starts its own hub (fresh database) and node processes on loopback, and stops
them all at the end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import PYTHON, ROOT, SHARED_KEY, HubServer, wait_for

pytestmark = pytest.mark.e2e


class RunNode:
    """One ``python manage.py runnode`` process serving the demo tools."""

    def __init__(self, hub: HubServer, node_id: str, workdir: Path, *extra: str) -> None:
        self.node_id = node_id
        self.hub = hub
        self.log_path = workdir / f"{node_id}.log"
        self.args = [
            PYTHON, str(ROOT / "manage.py"), "runnode",
            "--hub", hub.ws_base, "--name", node_id, "--node-id", node_id,
            "--state-file", str(workdir / f"{node_id}.json"), "--shutdown-grace", "10", *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self) -> RunNode:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APEXBRIDGE_")}
        env.update({"APEXBRIDGE_NODE_KEY": SHARED_KEY, "PYTHONUNBUFFERED": "1"})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30) -> int:
        return await asyncio.to_thread(self.process.wait, timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def run_nodes(tmp_path):
    started: list[RunNode] = []

    def start(hub: HubServer, node_id: str, *extra: str) -> RunNode:
        node = RunNode(hub, node_id, tmp_path, *extra).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


async def node_status(hub: HubServer, node_id: str) -> str | None:
    """The node's status in the admin API, or None when the hub does not know it."""
    status, body = await hub.aapi("GET", f"/api/admin/nodes/{node_id}")
    if status == 404:
        return None
    assert status == 200, body
    return body["node"]["status"] if body["node"]["connected"] else "disconnected"


async def wait_online(hub: HubServer, *node_ids: str, timeout: float = 30) -> None:
    for node_id in node_ids:
        await wait_for(
            lambda node_id=node_id: _is_online(hub, node_id), timeout=timeout, what=f"{node_id} online"
        )


async def _is_online(hub: HubServer, node_id: str) -> bool:
    return await node_status(hub, node_id) in ("online", "busy")


async def test_nodes_register_and_come_back_after_a_hub_restart(hub, run_nodes):
    first, second = run_nodes(hub, "e2e-a"), run_nodes(hub, "e2e-b", "--capability", "demo")
    await wait_online(hub, "e2e-a", "e2e-b")
    status, body = await hub.aapi("GET", "/api/admin/nodes/e2e-b")
    assert sorted(body["node"]["tools"]) == ["echo", "sha256", "sleep"]
    assert body["node"]["capabilities"] == ["demo"]

    # When the hub stops and starts again (same port, same database)
    await asyncio.to_thread(hub.restart)

    # Then both nodes reconnect and register again by themselves
    await wait_online(hub, "e2e-a", "e2e-b", timeout=60)
    for node in (first, second):
        assert node.log.count("Registered as") >= 2
        assert "Reconnecting in" in node.log
        assert node.process.poll() is None
        assert SHARED_KEY not in node.log


async def test_sigterm_unregisters_the_node(hub, run_nodes):
    node = run_nodes(hub, "e2e-term")
    await wait_online(hub, "e2e-term")

    node.signal(signal.SIGTERM)

    assert await node.wait() == 0
    assert await node_status(hub, "e2e-term") is None  # gone from the registry
    assert "Unregistered e2e-term" in node.log


async def submit(hub: HubServer, body: dict) -> dict:
    status, reply = await hub.aapi("POST", "/api/tasks", body)
    if status in (404, 405):
        pytest.skip("the task API (POST /api/tasks) is not in this hub yet")
    assert status in (200, 201), reply
    return reply["task"]


async def task_state(hub: HubServer, task_id: str, wait: int = 0) -> dict:
    status, reply = await hub.aapi("GET", f"/api/tasks/{task_id}?wait={wait}")
    assert status == 200, reply
    return reply["task"]


async def test_tasks_spread_over_nodes_and_survive_a_killed_node(hub, run_nodes):
    nodes = {node_id: run_nodes(hub, node_id) for node_id in ("e2e-left", "e2e-right")}
    await wait_online(hub, *nodes)

    # Tasks are shared between the two nodes (one slot each)
    tasks = [await submit(hub, {"toolName": "sleep", "toolArgs": {"seconds": 0.5}}) for _ in range(4)]
    finished = [await task_state(hub, task["taskId"], wait=30) for task in tasks]
    assert [task["status"] for task in finished] == ["succeeded"] * 4
    assert {task["assignedNodeId"] for task in finished} == set(nodes)
    assert finished[0]["result"] == {"slept": 0.5}

    # Given a long task running on one node
    task = await submit(hub, {"toolName": "sleep", "toolArgs": {"seconds": 3}, "maxRetries": 3})

    async def assigned():
        state = await task_state(hub, task["taskId"])
        return state if state["status"] == "assigned" else None

    victim_id = (await wait_for(assigned, timeout=20, what="task assigned"))["assignedNodeId"]
    survivor_id = next(node_id for node_id in nodes if node_id != victim_id)

    # When that node is killed mid-task
    nodes[victim_id].signal(signal.SIGKILL)

    # Then the task completes on the other node
    done = await task_state(hub, task["taskId"], wait=60)
    assert done["status"] == "succeeded", done
    assert done["assignedNodeId"] == survivor_id
    assert done["result"] == {"slept": 3}
    assert done["attempts"] >= 2
