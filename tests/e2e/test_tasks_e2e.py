"""Task dispatch against a real hub process (PROTOCOL §3): spread, routing, queue
order, retries, time-outs, refused results, cancel, idempotency, a hub restart, a
chaos run, and two hub processes sharing PostgreSQL and Redis.

Nodes here are small ``websockets`` clients that heartbeat and answer ``task_assign``
(echoing ``toolArgs``) unless told to stay silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.error

import psycopg
import pytest
import websockets

from tests.e2e.harness import HubServer, wait_for

pytestmark = pytest.mark.e2e

FINAL = {"succeeded", "failed", "timed_out", "cancelled"}


class Worker:
    """A node that stays connected (reconnecting when its socket drops), heartbeats,
    and answers every ``task_assign`` after ``delay_s`` unless ``answer`` is False."""

    def __init__(
        self,
        hub: HubServer,
        node_id: str,
        *,
        capabilities: tuple[str, ...] = (),
        max_concurrent: int = 1,
        answer: bool = True,
        delay_s: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        self.hub = hub
        self.node_id = node_id
        self.capabilities = list(capabilities)
        self.max_concurrent = max_concurrent
        self.answer = answer
        self.delay_s = delay_s
        self.assigned: list[dict] = []
        self.cancels: list[dict] = []
        self.acks: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.registered = asyncio.Event()
        self.ws = None
        self._runner: asyncio.Task | None = None
        self._paused = False

    # --- life cycle ---------------------------------------------------------------------
    async def start(self) -> Worker:
        self._runner = asyncio.create_task(self._run())
        await asyncio.wait_for(self.registered.wait(), 20)
        return self

    async def stop(self) -> None:
        if self._runner:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()

    async def kill(self, down_s: float = 0.0) -> None:
        """Drop the socket without a goodbye; reconnect after ``down_s``."""
        self._paused = True
        self.registered.clear()
        if self.ws is not None:
            self.ws.transport.abort()
        await asyncio.sleep(down_s)
        self._paused = False

    async def _run(self) -> None:
        while True:
            if self._paused:
                await asyncio.sleep(0.05)
                continue
            try:
                async with websockets.connect(self.hub.node_url(), open_timeout=5, max_size=None) as ws:
                    self.ws = ws
                    await self._serve(ws)
            except (TimeoutError, OSError, websockets.WebSocketException):
                pass
            self.registered.clear()
            await asyncio.sleep(0.2)

    async def _serve(self, ws) -> None:
        await ws.recv()  # connection_ack
        await self._send(
            ws,
            "node_register",
            {
                "nodeId": self.node_id,
                "name": self.node_id,
                "type": "worker",
                "capabilities": self.capabilities,
                "config": {"maxConcurrentTasks": self.max_concurrent},
            },
        )
        beats = asyncio.create_task(self._heartbeat(ws))
        try:
            async for raw in ws:
                message = json.loads(raw)
                kind, data = message["type"], message["data"]
                if kind == "node_registered":
                    self.registered.set()
                elif kind == "task_assign":
                    self.assigned.append(data)
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    if self.answer:
                        asyncio.create_task(self._answer(ws, data))
                elif kind == "task_cancel":
                    self.cancels.append(data)
                elif kind == "task_result_ack":
                    self.acks.append(data)
        finally:
            beats.cancel()

    async def _heartbeat(self, ws) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self._send(ws, "heartbeat", {})

    async def _answer(self, ws, data: dict) -> None:
        await asyncio.sleep(random.uniform(*self.delay_s))
        self.in_flight -= 1
        with contextlib.suppress(websockets.ConnectionClosed):
            await self.result(data["taskId"], ws=ws, result=data["toolArgs"], attempt=data["attempt"])

    @staticmethod
    async def _send(ws, message_type: str, data: dict) -> None:
        await ws.send(json.dumps({"type": message_type, "data": data}))

    async def result(self, task_id: str, *, ws=None, **fields) -> None:
        data = {"taskId": task_id, "nodeId": self.node_id, "success": True}
        data.update(fields)
        await self._send(ws or self.ws, "task_result", data)

    def task_ids(self) -> list[str]:
        return [a["taskId"] for a in self.assigned]

    async def ack_for(self, task_id: str, timeout: float = 10) -> dict:
        return await wait_for(
            lambda: next((a for a in self.acks if a.get("taskId") == task_id), None),
            timeout=timeout,
            what=f"task_result_ack for {task_id}",
        )


@contextlib.asynccontextmanager
async def workers(*items: Worker):
    try:
        for worker in items:
            await worker.start()
        yield items
    finally:
        for worker in items:
            await worker.stop()


async def submit(hub: HubServer, wait: float = 0, **body) -> tuple[int, dict]:
    body.setdefault("toolArgs", {})
    status, reply = await hub.aapi("POST", f"/api/tasks?wait={wait}", {"toolName": "echo", **body})
    assert status in (200, 201), reply
    return status, reply["task"]


async def task_of(hub: HubServer, task_id: str, wait: float = 0) -> dict:
    status, reply = await hub.aapi("GET", f"/api/tasks/{task_id}?wait={wait}")
    assert status == 200, reply
    return reply["task"]


async def ended(hub: HubServer, task_id: str, timeout: float = 30) -> dict:
    async def check():
        task = await task_of(hub, task_id, wait=min(timeout, 10))
        return task if task["status"] in FINAL else None

    return await wait_for(check, timeout=timeout, what=f"task {task_id} to end")


# --- spread and routing ---------------------------------------------------------------------
async def test_load_spreads_over_two_nodes_and_capabilities_route(hub):
    # Given two nodes, both with capability "a", only n1 with "b"
    n1 = Worker(hub, "spread-1", capabilities=("a", "b"), max_concurrent=2, delay_s=(0.3, 0.3))
    n2 = Worker(hub, "spread-2", capabilities=("a",), max_concurrent=2, delay_s=(0.3, 0.3))
    async with workers(n1, n2):
        # When eight "a" tasks and three "b" tasks are submitted at once
        a_ids = [(await submit(hub, capability="a", toolArgs={"i": i}))[1]["taskId"] for i in range(8)]
        b_ids = [(await submit(hub, capability="b", toolArgs={"j": j}))[1]["taskId"] for j in range(3)]
        results = [await ended(hub, task_id) for task_id in a_ids + b_ids]
    # Then all succeed, "a" work is shared, "b" work only ran on n1, no node exceeded its limit
    assert all(t["status"] == "succeeded" for t in results)
    assert [t["result"] for t in results[:8]] == [{"i": i} for i in range(8)]
    assert set(b_ids) <= set(n1.task_ids()) and not set(b_ids) & set(n2.task_ids())
    assert len(set(a_ids) & set(n1.task_ids())) >= 2 and len(set(a_ids) & set(n2.task_ids())) >= 2
    assert n1.max_in_flight <= 2 and n2.max_in_flight <= 2


async def test_concurrent_submissions_answer_with_the_task_already_assigned(hub):
    # Given an idle node with room for all of them
    worker = Worker(hub, "eager-1", max_concurrent=20, delay_s=(0.5, 0.5))
    async with workers(worker):
        # When ten tasks are submitted at once (they share the hub's dispatch passes)
        replies = await asyncio.gather(*(submit(hub, toolArgs={"i": i}) for i in range(10)))
        # Then every reply already shows its task handed to the node
        assert [status for status, _ in replies] == [201] * 10
        assert {task["status"] for _, task in replies} <= {"assigned", "succeeded"}, replies
        assert {task["assignedNodeId"] for _, task in replies} == {"eager-1"}
        done = [await ended(hub, task["taskId"]) for _, task in replies]
    assert [t["result"] for t in done] == [{"i": i} for i in range(10)]


async def test_queued_tasks_go_out_by_priority_then_age(hub):
    # Given tasks queued while no node is connected
    low = (await submit(hub, priority=1))[1]
    first_normal = (await submit(hub, priority=5))[1]
    high = (await submit(hub, priority=10))[1]
    second_normal = (await submit(hub, priority=5))[1]
    assert low["status"] == "queued" and low["waitingReason"] == "no node is connected"
    # When one single-slot node connects
    async with workers(Worker(hub, "order-1")) as (node,):
        for task in (low, first_normal, high, second_normal):
            await ended(hub, task["taskId"])
    # Then it ran them highest priority first, oldest first within a priority
    assert node.task_ids() == [high["taskId"], first_normal["taskId"], second_normal["taskId"], low["taskId"]]


# --- retries and time-outs -----------------------------------------------------------------------
async def test_retry_after_a_disconnect_lands_on_the_other_node(hub):
    silent = Worker(hub, "retry-silent", answer=False)
    async with workers(silent):
        _, task = await submit(hub, maxRetries=2)
        await wait_for(lambda: silent.assigned, what="the first attempt")
        async with workers(Worker(hub, "retry-other")) as (other,):
            # When the node running the task drops off
            await silent.kill(down_s=0.5)
            done = await ended(hub, task["taskId"])
    # Then the second attempt ran on the other node and succeeded
    assert done["status"] == "succeeded" and done["attempts"] == 2 and done["assignedNodeId"] == "retry-other"
    assert other.assigned[0]["attempt"] == 2


async def test_timeout_without_retries_ends_timed_out_and_cancels_the_node(hub):
    silent = Worker(hub, "timeout-silent", answer=False)
    async with workers(silent):
        _, task = await submit(hub, timeout=500, maxRetries=0)
        done = await ended(hub, task["taskId"])
        await wait_for(lambda: silent.cancels, what="task_cancel")
        # A late answer is refused and changes nothing
        await silent.result(task["taskId"], result="late")
        ack = await silent.ack_for(task["taskId"])
    assert done["status"] == "timed_out" and done["error"]["code"] == "timeout" and done["attempts"] == 1
    assert silent.cancels[0] == {"taskId": task["taskId"], "reason": "timeout"}
    assert ack["success"] is False and ack["error"]["code"] == "stale_result"
    assert (await task_of(hub, task["taskId"]))["status"] == "timed_out"


async def test_timeout_with_retries_succeeds_on_another_node(hub):
    silent = Worker(hub, "timeout-retry-silent", answer=False)
    async with workers(silent):
        _, task = await submit(hub, timeout=500, maxRetries=2)
        await wait_for(lambda: silent.assigned, what="the first attempt")
        async with workers(Worker(hub, "timeout-retry-good")):
            done = await ended(hub, task["taskId"])
    assert done["status"] == "succeeded" and done["assignedNodeId"] == "timeout-retry-good"
    assert done["attempts"] == 2


async def test_foreign_results_are_refused(hub):
    owner = Worker(hub, "foreign-owner", capabilities=("x",), answer=False)
    stranger = Worker(hub, "foreign-stranger", answer=False)
    async with workers(owner, stranger):
        _, task = await submit(hub, capability="x")
        await wait_for(lambda: owner.assigned, what="the assignment")
        await stranger.result(task["taskId"], result="not mine")
        ack = await stranger.ack_for(task["taskId"])
        assert ack["success"] is False and ack["error"]["code"] == "node_mismatch"
        await stranger.result("t-does-not-exist")
        unknown = await stranger.ack_for("t-does-not-exist")
        assert unknown["error"]["code"] == "unknown_task"
        assert (await task_of(hub, task["taskId"]))["status"] == "assigned"
        # The owner's answer still counts
        await owner.result(task["taskId"], result="mine")
        done = await ended(hub, task["taskId"])
    assert done["status"] == "succeeded" and done["result"] == "mine"


# --- cancel and idempotency ------------------------------------------------------------------------
async def test_cancel_a_running_task(hub):
    node = Worker(hub, "cancel-node", answer=False)
    async with workers(node):
        _, task = await submit(hub)
        await wait_for(lambda: node.assigned, what="the assignment")
        status, reply = await hub.aapi("POST", f"/api/tasks/{task['taskId']}/cancel", {"reason": "enough"})
        assert status == 200 and reply["task"]["status"] == "cancelled"
        await wait_for(lambda: node.cancels, what="task_cancel")
        assert node.cancels[0] == {"taskId": task["taskId"], "reason": "enough"}
        status, reply = await hub.aapi("POST", f"/api/tasks/{task['taskId']}/cancel", {})
        assert status == 409 and reply["error"]["code"] == "task_finished"
        # The node's slot is free again
        _, second = await submit(hub)
        await wait_for(lambda: len(node.assigned) == 2, what="the next task")


async def test_idempotency_key_and_wait(hub):
    async with workers(Worker(hub, "idem-node")):
        status, first = await submit(hub, wait=20, idempotencyKey="nightly-1", toolArgs={"n": 1})
        assert status == 200 and first["status"] == "succeeded" and first["result"] == {"n": 1}
        status, again = await submit(hub, idempotencyKey="nightly-1", toolArgs={"n": 2})
    assert status == 200 and again["taskId"] == first["taskId"] and again["result"] == {"n": 1}


# --- durability ---------------------------------------------------------------------------------
async def test_task_submitted_with_no_node_is_delivered_after_a_hub_restart(hub):
    _, task = await submit(hub, toolArgs={"survives": True})
    await asyncio.to_thread(hub.restart)
    async with workers(Worker(hub, "restart-node")):
        done = await ended(hub, task["taskId"])
    assert done["status"] == "succeeded" and done["result"] == {"survives": True}


async def test_chaos_every_task_ends(hub):
    # Given three nodes that answer after a short random delay
    random.seed(1234)
    nodes = [
        Worker(hub, f"chaos-{i}", max_concurrent=4, delay_s=(0.0, 0.15)) for i in range(3)
    ]  # fmt: skip
    total = 300
    submitted: dict[int, str] = {}

    def submit_all() -> None:
        # Idempotency keys make a retried POST (the hub restarting under it) harmless.
        for i in range(total):
            while True:
                try:
                    status, reply = hub.api(
                        "POST",
                        "/api/tasks",
                        {"toolName": "echo", "toolArgs": {"i": i}, "timeout": 4000, "maxRetries": 25,
                         "idempotencyKey": f"chaos-{i}"},
                        timeout=10,
                    )  # fmt: skip
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    status = 0
                if status in (200, 201):
                    submitted[i] = reply["task"]["taskId"]
                    break
                time.sleep(0.2)

    async def chaos() -> None:
        for round_number in range(12):
            await asyncio.sleep(random.uniform(0.3, 1.0))
            if round_number == 6:
                await asyncio.to_thread(hub.restart)
                continue
            for victim in random.sample(nodes, random.randint(1, 2)):
                await victim.kill(down_s=random.uniform(0.1, 1.0))

    hub.staff_token()
    async with workers(*nodes):
        # When 300 tasks are submitted while nodes are killed and the hub restarts once
        await asyncio.gather(asyncio.to_thread(submit_all), chaos())
        assert len(submitted) == total

        # Then every task ends, and each succeeded with its own arguments
        async def all_ended():
            status, reply = await hub.aapi("GET", "/api/admin/tasks?limit=1000", timeout=20)
            if status != 200:
                return None
            tasks = {t["taskId"]: t for t in reply["tasks"]}
            return (
                tasks
                if all(tasks.get(tid, {}).get("status") in FINAL for tid in submitted.values())
                else None
            )

        tasks = await wait_for(all_ended, timeout=240, interval=1, what="all chaos tasks to end")
    assert len(set(submitted.values())) == total
    outcomes = [tasks[submitted[i]] for i in range(total)]
    assert [t["status"] for t in outcomes] == ["succeeded"] * total
    assert [t["result"] for t in outcomes] == [{"i": i} for i in range(total)]
    assert any(t["attempts"] > 1 for t in outcomes)  # the chaos did hit running tasks


# --- several hub processes ------------------------------------------------------------------------
async def test_two_hub_processes_never_assign_a_task_twice(make_hub):
    # Given two hub processes on one PostgreSQL and one Redis, two nodes on each
    hub_a = make_hub("services", name="a")
    hub_b = make_hub(
        "services", database_url=hub_a.env["DATABASE_URL"], redis_url=hub_a.env["REDIS_URL"], name="b"
    )
    nodes = [
        Worker(hub, f"pg-{hub.name}-{i}", max_concurrent=2, delay_s=(0.0, 0.05))
        for hub in (hub_a, hub_b)
        for i in range(2)
    ]
    token = hub_a.staff_token()
    async with workers(*nodes):
        # When 120 tasks are submitted through both processes at once
        async def submit_many(hub: HubServer, start: int) -> list[str]:
            ids = []
            for i in range(start, start + 60):
                status, reply = await hub.aapi(
                    "POST", "/api/tasks", {"toolName": "echo", "toolArgs": {"i": i}}, token=token
                )
                assert status == 201, reply
                ids.append(reply["task"]["taskId"])
            return ids

        batches = await asyncio.gather(submit_many(hub_a, 0), submit_many(hub_b, 60))
        task_ids = batches[0] + batches[1]
        for task_id in task_ids:
            status, reply = await hub_a.aapi("GET", f"/api/tasks/{task_id}?wait=30", token=token)
            assert reply["task"]["status"] == "succeeded", reply
    # Then every task was delivered exactly once, and no node ever ran more than its limit
    delivered = [task_id for node in nodes for task_id in node.task_ids()]
    assert sorted(delivered) == sorted(task_ids)
    assert all(node.max_in_flight <= 2 for node in nodes)
    assert sum(1 for node in nodes if node.assigned) >= 3


async def test_with_the_connection_pool_waiting_requests_do_not_starve_the_hub(make_hub):
    # Given a hub on PostgreSQL with Django's connection pool of 3, a node answering slowly
    hub = make_hub("services", env={"APEXBRIDGE_DB_POOL_SIZE": "3", "APEXBRIDGE_DB_POOL_TIMEOUT": "3"})
    worker = Worker(hub, "pool-1", max_concurrent=20, delay_s=(0.3, 0.6))
    token = hub.staff_token()
    async with workers(worker):
        # When twelve requests (four times the pool) wait for their tasks at once
        body = {"toolName": "echo", "toolArgs": {}}
        replies = await asyncio.gather(
            *(hub.aapi("POST", "/api/tasks?wait=20", body, token=token) for _ in range(12))
        )
        # Then every one gets its result (200: final within the wait; no 503 for want
        # of a connection)
        assert [status for status, _ in replies] == [200] * 12, replies
        assert [reply["task"]["status"] for _, reply in replies] == ["succeeded"] * 12
        # And the hub never held more PostgreSQL connections than the pool
        database = hub.env["DATABASE_URL"].rsplit("/", 1)[1]
        with psycopg.connect(hub.env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres") as admin:
            (connections,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone()
        assert 1 <= connections <= 3


async def test_with_persistent_connections_threads_reuse_theirs_and_survive_losing_them(make_hub):
    # Given a hub on PostgreSQL keeping each thread's connection (APEXBRIDGE_DB_CONN_MAX_AGE)
    hub = make_hub("services", env={"APEXBRIDGE_DB_CONN_MAX_AGE": "60"})
    worker = Worker(hub, "persist-1", max_concurrent=5)
    token = hub.staff_token()
    database = hub.env["DATABASE_URL"].rsplit("/", 1)[1]
    admin_url = hub.env["DATABASE_URL"].rsplit("/", 1)[0] + "/postgres"

    def backends() -> set[int]:
        with psycopg.connect(admin_url) as admin:
            rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
            return {pid for (pid,) in rows.fetchall()}

    async def run_tasks(count: int) -> None:
        for _ in range(count):
            status, reply = await hub.aapi("POST", "/api/tasks?wait=10", {"toolName": "echo"}, token=token)
            assert status == 200, reply
            assert reply["task"]["status"] == "succeeded", reply

    def opened_since(moment) -> int:
        with psycopg.connect(admin_url) as admin:
            (count,) = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_start > %s",
                (database, moment),
            ).fetchone()
        return count

    async with workers(worker):
        # When tasks run one after another, twice
        await run_tasks(10)
        with psycopg.connect(admin_url) as admin:
            (moment,) = admin.execute("SELECT now()").fetchone()
        await run_tasks(10)
        # Then the second round ran on the connections the first one opened: the
        # request threads' and the database thread's, none opened per unit of work
        assert opened_since(moment) == 0
        assert 1 <= len(backends()) <= 10
        # When PostgreSQL drops every connection of the hub (a restart, a fail-over)
        dropped = backends()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
        assert not dropped & backends()  # gone (the hub's sweeps may have connected anew)
        # Then the next tasks still run: each connection is checked before it is reused
        await run_tasks(5)
