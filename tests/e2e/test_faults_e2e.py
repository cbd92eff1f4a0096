"""Faults around a real hub process (issue 8): a hanging or broken LLM upstream, and
the Redis channel layer restarted under a connected node.

The shared PostgreSQL and Redis servers are never stopped (other runs use them): the
tests start a private ``redis-server`` or PostgreSQL cluster (initdb in a temporary
directory, as the ``postgres`` user) on a free port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail
from tests.e2e.harness import (
    AdminEvents,
    WsNode,
    base_env,
    free_port,
    keep_heartbeating,
    manage,
    port_open,
    wait_for,
)
from tests.llm_server import LoopbackLLMServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def llm_server():
    server = LoopbackLLMServer().start()
    yield server
    server.stop()


async def _echo_task_round_trip(hub, node: WsNode, node_id: str) -> None:
    status, body = await hub.aapi(
        "POST", "/api/tasks", {"toolName": "echo", "toolArgs": {"n": 1}, "nodeId": node_id}
    )
    assert status == 201, body
    task_id = body["task"]["taskId"]
    # The assign of this task (a repeated assign of an earlier, finished task after a
    # Redis restart is at-least-once delivery, not this round trip's business)
    assign = await node.recv_type("task_assign", timeout=15)
    while assign["data"]["taskId"] != task_id:
        assign = await node.recv_type("task_assign", timeout=15)
    await node.send("task_result", {"taskId": task_id, "success": True, "result": {"n": 1}})
    ack = await node.recv_type("task_result_ack")
    while ack["data"].get("taskId") not in (None, task_id):
        ack = await node.recv_type("task_result_ack")
    assert ack["data"]["success"] is True, ack
    status, body = await hub.aapi("GET", f"/api/tasks/{task_id}")
    assert body["task"]["status"] == "succeeded"


@pytest.mark.parametrize("model, code", [("hang", "upstream_timeout"), ("garbage", "upstream_error")])
async def test_a_bad_llm_upstream_fails_clearly_and_the_hub_keeps_serving(make_hub, llm_server, model, code):
    # Given a hub whose upstream hangs or answers garbage, with a short LLM time-out
    hub = make_hub(
        env={
            "APEXBRIDGE_LLM_MODEL": "openai/test-model",
            "APEXBRIDGE_LLM_API_BASE": llm_server.api_base,
            "APEXBRIDGE_LLM_API_KEY": "sk-fault-secret",
            "APEXBRIDGE_LLM_TIMEOUT_MS": "1500",
        }
    )
    hub.staff_token()  # made now: it takes a manage.py process, longer than a heartbeat timeout
    node = await WsNode(hub.node_url()).connect()
    beating = None
    try:
        await node.register("fault-1", tools=["echo"])
        # When the node asks the model
        await node.send(
            "llm_request",
            {"requestId": "r-1", "model": f"openai/{model}", "messages": [{"role": "user", "content": "hi"}]},
        )
        # Then heartbeats and tasks are served meanwhile
        started = time.monotonic()
        beating = asyncio.create_task(keep_heartbeating([node]))
        assert (await node.recv_type("heartbeat_ack", timeout=3))["data"]["success"] is True
        await _echo_task_round_trip(hub, node, "fault-1")
        # And the node gets one clear failure
        reply = await node.recv_type("llm_response", timeout=20)
        assert reply["data"]["success"] is False
        assert reply["data"]["error"]["code"] == code, reply
        assert time.monotonic() - started < 15
        assert "sk-fault-secret" not in hub.log_text()
    finally:
        if beating is not None:
            beating.cancel()
        await node.close()


class PrivateRedis:
    """A throw-away redis-server (never the machine's shared one)."""

    def __init__(self, workdir) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", self.port):
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed")
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    redis.kill()


async def test_redis_restart_keeps_sockets_open_and_loses_no_task(make_hub, private_redis):
    # Given a hub on a private Redis channel layer, a registered node and a staff
    # member watching the admin events socket
    hub = make_hub(env={"REDIS_URL": private_redis.url})
    node = await WsNode(hub.node_url()).connect()
    token = hub.staff_token()
    try:
        async with AdminEvents(f"{hub.ws_base}/ws/admin/events/?token={token}") as admin:
            await node.register("redis-1", tools=["echo"])
            await _echo_task_round_trip(hub, node, "redis-1")

            beating = asyncio.create_task(keep_heartbeating([node]))
            # When Redis dies
            private_redis.kill()
            # Then heartbeats are still acked on the same socket, tasks can still be
            # submitted (they wait in the database), and the log says what is missing
            await asyncio.sleep(0.5)
            for _ in range(3):
                assert (await node.recv_type("heartbeat_ack", timeout=5))["data"]["success"] is True
            status, body = await hub.aapi(
                "POST",
                "/api/tasks",
                {"toolName": "echo", "toolArgs": {"during": "outage"}, "nodeId": "redis-1"},
            )
            assert status == 201, body
            during_outage = body["task"]["taskId"]
            # (it could not be handed to the node: it waits in the queue, saying why:
            # either its notice failed, or dispatch already knew the layer was down)
            status, body = await hub.aapi("GET", f"/api/tasks/{during_outage}")
            assert body["task"]["status"] == "queued", body
            reason = body["task"]["waitingReason"] or ""
            assert "could not notify node redis-1" in reason or "channel layer unavailable" in reason, body
            await wait_for(
                lambda: "channel layer unavailable" in hub.log_text(),
                timeout=10,
                what="the outage in the log",
            )

            # When Redis comes back on the same port
            private_redis.start()

            # Then the task submitted during the outage reaches the node over the very
            # same socket, as its first attempt (the undelivered one did not count)
            assign = await node.recv_type("task_assign", timeout=15)
            assert assign["data"]["taskId"] == during_outage
            assert assign["data"]["attempt"] == 1
            await node.send("task_result", {"taskId": during_outage, "success": True, "result": {"ok": 1}})
            assert (await node.recv_type("task_result_ack"))["data"]["success"] is True
            status, body = await hub.aapi("GET", f"/api/tasks/{during_outage}")
            assert body["task"]["status"] == "succeeded"
            # And new tasks and admin events flow again
            await _echo_task_round_trip(hub, node, "redis-1")
            await wait_for(
                lambda: admin.of("task_succeeded"), timeout=15, what="an admin event after the restart"
            )
            await wait_for(
                lambda: "channel layer available again" in hub.log_text(),
                timeout=15,
                what="recovery in the log",
            )
            assert "Traceback" not in hub.log_text()
            beating.cancel()
    finally:
        await node.close()
    assert hub.process.poll() is None  # the hub process survived


PG_BIN = Path("/usr/lib/postgresql")


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (never the machine's shared one)."""

    def __init__(self, workdir: Path, bindir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.bindir = bindir
        self.data = workdir / "data"

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.workdir / "log"), "-w", "start"
        )

    def stop(self) -> None:
        """As abrupt as a crash: connections are cut, nothing is flushed politely."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


@pytest.fixture
def private_postgres():
    versions = sorted(PG_BIN.glob("*/bin/initdb")) if PG_BIN.exists() else []
    if not versions or (os.geteuid() == 0 and shutil.which("runuser") is None):
        skip_or_fail("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # Not under pytest's temporary root: that is private to root, and the server runs
    # as the postgres user.
    workdir = Path(tempfile.mkdtemp(prefix="apexbridge-pg-"))
    postgres = PrivatePostgres(workdir, versions[-1].parent)
    postgres.init()
    postgres.start()
    manage(base_env(DATABASE_URL=postgres.url), "migrate", "--noinput")
    yield postgres
    try:
        postgres.stop()
    except subprocess.CalledProcessError:
        pass  # already stopped
    shutil.rmtree(workdir, ignore_errors=True)


async def test_postgresql_briefly_unavailable(make_hub, private_postgres):
    # Given a hub on a private PostgreSQL, a heartbeating node with a task in hand
    hub = make_hub(database_url=private_postgres.url)
    token = hub.staff_token()
    node = await WsNode(hub.node_url()).connect()
    beating = None
    try:
        await node.register("pg-1", tools=["echo"])
        beating = asyncio.create_task(keep_heartbeating([node]))
        status, body = await hub.aapi(
            "POST", "/api/tasks", {"toolName": "echo", "toolArgs": {}, "nodeId": "pg-1"}
        )
        assert status == 201, body
        task_id = (await node.recv_type("task_assign", timeout=10))["data"]["taskId"]

        # When PostgreSQL goes away for longer than the heartbeat time-out (3 s here)
        private_postgres.stop()
        outage_started = time.monotonic()

        # Then heartbeats are still acknowledged
        node.inbox = [m for m in node.inbox if m["type"] != "heartbeat_ack"]
        for _ in range(3):
            assert (await node.recv_type("heartbeat_ack", timeout=5))["data"]["success"] is True
        # And a result is refused clearly, so the node keeps it and sends it again
        await node.send("task_result", {"taskId": task_id, "success": True, "result": {"ok": 1}})
        ack = (await node.recv_type("task_result_ack", timeout=10))["data"]
        assert ack["success"] is False
        assert ack["error"]["code"] == "service_unavailable", ack
        # And the API answers 503 in its JSON envelope
        status, body = await hub.aapi("GET", "/api/admin/nodes", token=token)
        assert status == 503, body
        assert body["error"]["code"] == "service_unavailable"
        # And the log says what is missing, once, without a traceback per call
        assert hub.log_text().count("database unavailable") == 1
        await asyncio.sleep(max(0.0, 4.5 - (time.monotonic() - outage_started)))

        # When PostgreSQL is back
        private_postgres.start()
        await wait_for(
            lambda: "database available again" in hub.log_text(), timeout=20, what="recovery in the log"
        )

        # Then the result sent again is accepted and the task ends succeeded
        await node.send("task_result", {"taskId": task_id, "success": True, "result": {"ok": 1}})
        assert (await node.recv_type("task_result_ack", timeout=10))["data"]["success"] is True
        status, body = await hub.aapi("GET", f"/api/tasks/{task_id}", token=token)
        assert (status, body["task"]["status"]) == (200, "succeeded")
        # And the node that kept heartbeating was never judged silent
        await asyncio.sleep(2)
        status, body = await hub.aapi("GET", "/api/admin/nodes/pg-1", token=token)
        assert body["node"]["status"] == "online", body
        assert "missed its heartbeat timeout" not in hub.log_text()
        assert "Traceback" not in hub.log_text()
    finally:
        if beating is not None:
            beating.cancel()
        await node.close()
    assert hub.process.poll() is None
