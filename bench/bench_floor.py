"""What the stack itself costs per operation on this machine: the floor under the
hub's own numbers (no server, no load generator, one process, one core).

    .venv/bin/python bench/bench_floor.py [--runs 3] [--n 500]

Each row is one operation repeated ``--n`` times in a fresh SQLite database
(WAL, the hub's own backend, ``DEBUG`` off), median (min–max) of ``--runs`` runs,
in microseconds per operation; "per core" is how many a core does per second.
It answers "how far can this design go on this machine": a task through the hub
is one HTTP request, a few service calls and a few channel messages, so the sum
of its rows is a lower bound on the CPU one task costs (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import in_process_django, machine_header, median_spread, print_table  # noqa: E402

WORKDIR = in_process_django("apexbridge-floor-", DJANGO_ALLOWED_HOSTS="testserver")


def per_op_us(operation: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        operation()
    return (time.perf_counter() - started) / n * 1e6


async def per_op_us_async(operation, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await operation()
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()

    from asgiref.sync import sync_to_async
    from channels.testing import WebsocketCommunicator
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction
    from django.test import Client
    from rest_framework.authtoken.models import Token

    from apexbridge.asgi import application
    from nodes import events, task_queue, task_result_services, task_services
    from nodes.auth import node_key_create
    from nodes.models import Node, Task

    # Each row measures the work of the thread that runs it: in a hub the dispatch
    # pass after a submit and the event sends run elsewhere (the coalesced pass on
    # the database thread, the event sender on the loop), so they are left out here.
    task_services.dispatch_and_send = lambda: None
    events._deliver = lambda message: None
    Node.objects.create(
        node_id="floor",
        name="floor",
        status="online",
        connection_id="c-floor",
        channel_name="ch-floor",
        max_concurrent_tasks=10**9,
    )
    task = task_services.task_submit(tool_name="echo", tool_args={"i": 1}).task
    user = get_user_model().objects.create_user("floor", password="-", is_staff=True)
    client = Client(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    _, node_key = node_key_create(name="floor")
    table = Task._meta.db_table

    def raw_select() -> None:
        with connection.cursor() as cursor:
            cursor.execute(f'SELECT "status" FROM "{table}" WHERE "task_id" = %s', [task.task_id])  # noqa: S608
            cursor.fetchone()

    def update_in_transaction() -> None:
        with transaction.atomic():
            Task.objects.filter(pk=task.task_id).update(waiting_reason="")

    def submit_claim_complete() -> None:
        queued = task_services.task_submit(tool_name="echo", tool_args={"i": 1}).task
        task_queue.claim_task(queued.task_id, "floor")
        task_result_services.task_complete(
            task_id=queued.task_id, node_id="floor", connection_id="c-floor", success=True, result={"i": 1}
        )

    def api_submit() -> None:
        response = client.post("/api/tasks", {"toolName": "echo", "toolArgs": {"i": 1}}, "application/json")
        assert response.status_code == 201, response.content

    sync_rows: list[tuple[str, Callable[[], object]]] = [
        ("raw cursor: SELECT one column by primary key", raw_select),
        ("ORM: Task row by primary key (.first())", lambda: Task.objects.filter(pk=task.task_id).first()),
        (
            "ORM: one column by primary key (values_list)",
            lambda: Task.objects.filter(pk=task.task_id).values_list("status", flat=True).first(),
        ),
        ("ORM: UPDATE in a transaction", update_in_transaction),
        ("hub: task_submit (a transaction, INSERT)", lambda: task_services.task_submit(tool_name="echo")),
        ("hub: submit + claim_task + task_complete", submit_claim_complete),
        ("DRF: POST /api/tasks (token auth, task_submit)", api_submit),
    ]
    results: dict[str, list[float]] = {label: [] for label, _ in sync_rows}
    hop_label = "asgiref: sync_to_async hop (event loop -> thread -> loop)"
    frame_label = "Channels: node frame in, reply out (ping -> pong, in-process ASGI)"
    results[hop_label] = []
    results[frame_label] = []

    async def async_rows() -> None:
        hop = sync_to_async(lambda: None)
        results[hop_label].append(await per_op_us_async(hop, args.n))
        communicator = WebsocketCommunicator(application, f"/abp-distributed-server/VCP_Key={node_key}")
        connected, _ = await communicator.connect()
        assert connected
        await communicator.receive_from()  # connection_ack

        async def ping() -> None:
            await communicator.send_to(text_data='{"type": "ping", "data": {}}')
            await communicator.receive_from()

        results[frame_label].append(await per_op_us_async(ping, args.n))
        await communicator.disconnect()

    for _ in range(args.runs):
        for label, operation in sync_rows:
            operation()  # warm caches
            results[label].append(per_op_us(operation, args.n))
        asyncio.run(async_rows())

    rows = []
    for label, values in results.items():
        rows.append([label, median_spread(values, 0), f"{1e6 / statistics.median(values):,.0f}"])
    print_table(
        machine_header(f"bench_floor — the stack's cost per operation, {args.runs} runs of {args.n}"),
        ["operation", "µs per op", "per core per second"],
        rows,
        [f"In-process, SQLite (WAL) in {WORKDIR}, DEBUG off; median (min–max) of the runs."],
    )


if __name__ == "__main__":
    main()
