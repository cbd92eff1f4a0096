"""``python -m nodes.client`` and ``manage.py runnode`` as real processes: signals,
restart, exit codes and what they log."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.client.fake_hub import KEY, FakeHub
from tests.client.helpers import assign

ROOT = Path(__file__).resolve().parents[2]


class NodeProcess:
    def __init__(self, *args: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.env = env
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> NodeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APEXBRIDGE_")}
        env.update(self.env or {})
        with open(self.log_path, "wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, *self.args, cwd=ROOT, env=env, stdout=log, stderr=log
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float = 20) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def close(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def processes():
    started: list[NodeProcess] = []
    yield started
    for process in started:
        await process.close()


def node_args(hub: FakeHub, tmp_path: Path, *extra: str) -> list[str]:
    return ["--hub", hub.url, "--key", KEY, "--state-file", str(tmp_path / "state.json"), *extra]


async def test_sigterm_finishes_the_task_unregisters_and_exits_0(hub, tmp_path, processes):
    node = await NodeProcess(
        "-m", "nodes.client", *node_args(hub, tmp_path, "--name", "sig-node"), log_path=tmp_path / "node.log"
    ).start()
    processes.append(node)
    [register] = await hub.wait_for("node_register", timeout=20)
    assert register.data["tools"] == ["echo", "sha256", "sleep"]  # the demo tools

    # Given a task in progress
    await hub.send("task_assign", assign("t-term", "sleep", {"seconds": 0.5}))
    await asyncio.sleep(0.1)
    # When the process gets SIGTERM
    node.process.send_signal(signal.SIGTERM)

    # Then it finishes the task, reports it, unregisters, and exits 0
    assert await node.wait() == 0
    ordered = [f.type for f in hub.frames if f.type in ("task_result", "node_unregister")]
    assert ordered == ["task_result", "node_unregister"]
    assert hub.of_type("task_result")[0].data["result"] == {"slept": 0.5}
    assert hub.of_type("node_unregister")[0].data["reason"] == "shutdown"
    log = node.log
    assert "Registered as hub-generated-1 (sig-node, worker)" in log
    assert "Task t-term started: sleep" in log and "Task t-term finished: ok" in log
    assert "Unregistered hub-generated-1" in log
    assert KEY not in log


async def test_restart_control_re_executes_and_registers_again(hub, tmp_path, processes):
    node = await NodeProcess(
        "-m", "nodes.client", *node_args(hub, tmp_path, "--name", "phoenix"), log_path=tmp_path / "node.log"
    ).start()
    processes.append(node)
    await hub.wait_for("node_register", timeout=20)

    await hub.send("node_control", {"action": "restart", "reason": "upgrade"})

    # The same process (os.execv keeps the pid) comes back under the same node id
    frames = await hub.wait_for("node_register", count=2, timeout=20)
    assert frames[1].data["nodeId"] == "hub-generated-1"
    assert frames[1].data["config"]["metadata"]["pid"] == node.process.pid
    assert not hub.of_type("node_unregister")
    assert node.process.returncode is None

    node.process.send_signal(signal.SIGINT)
    assert await node.wait() == 0
    assert "Restarting:" in node.log and KEY not in node.log


async def test_runnode_serves_the_demo_tools(hub, tmp_path, processes):
    node = await NodeProcess(
        "manage.py",
        "runnode",
        *node_args(hub, tmp_path, "--name", "django-node", "--capability", "demo", "--max-concurrent", "2"),
        log_path=tmp_path / "runnode.log",
    ).start()
    processes.append(node)
    [register] = await hub.wait_for("node_register", timeout=30)
    assert register.data["capabilities"] == ["demo"]
    assert register.data["config"]["maxConcurrentTasks"] == 2

    await hub.send("task_assign", assign("t-sha", "sha256", {"text": "abc"}))
    [result] = await hub.wait_for("task_result")
    assert result.data["result"]["sha256"].startswith("ba7816bf")

    node.process.send_signal(signal.SIGTERM)
    assert await node.wait() == 0
    assert hub.of_type("node_unregister")
    assert KEY not in node.log


async def test_key_from_the_environment_and_a_refused_key_exits_2(hub, tmp_path, processes):
    wrong = "wrong-key-but-still-secret-123"
    node = await NodeProcess(
        "-m",
        "nodes.client",
        "--hub",
        hub.url,
        "--state-file",
        str(tmp_path / "s.json"),
        log_path=tmp_path / "node.log",
        env={"APEXBRIDGE_NODE_KEY": wrong},
    ).start()
    processes.append(node)
    assert await node.wait() == 2
    assert "refused" in node.log and "HTTP 403" in node.log
    assert wrong not in node.log
    assert hub.refused_handshakes == 1


async def test_missing_key_is_a_usage_error(tmp_path, processes):
    node = await NodeProcess(
        "-m", "nodes.client", "--hub", "ws://127.0.0.1:9", log_path=tmp_path / "n.log"
    ).start()
    processes.append(node)
    assert await node.wait() == 64
    assert "No node key" in node.log
