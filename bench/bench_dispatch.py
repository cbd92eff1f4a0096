"""What one dispatch pass costs as the fleet grows: a queued task and N connected
nodes, in-process (no server, no load generator).

    .venv/bin/python bench/bench_dispatch.py [--nodes 100 1000 10000] [--runs 5] [--burst 200]

The pass runs after every submission and every result, on the process's one
database thread, so its cost per task bounds how many tasks a hub with N nodes
assigns per second, and every millisecond of it holds the GIL the event loop needs
for heartbeat acks. Each row: N nodes (all online, one slot each, the same tools),
one fresh queued task per pass, median (min–max) of ``--runs`` passes in
milliseconds, and the statements the pass ran, with the rows read by the pass and kept from an
earlier pass (nodes/node_rows.py); then a burst: ``--burst`` tasks
queued at once and handed out by one pass (as after a bulk submission), its time
and the time per task assigned. SQLite (WAL, the hub's backend).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import in_process_django, machine_header, median_spread, print_table  # noqa: E402


def measure(nodes: int, runs: int, burst: int = 0) -> dict:
    from django.conf import settings
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from nodes import task_services
    from nodes.models import Node, Task
    from nodes.node_rows import node_rows

    Task.objects.all().delete()
    Node.objects.all()._raw_delete(Node.objects.db)  # no per-row signals for 10,000 rows
    now = timezone.now()
    Node.objects.bulk_create(
        (
            Node(
                node_id=f"n{i:06d}",
                name=f"n{i}",
                status="online",
                connection_id=f"c{i}",
                channel_name=f"ch{i}",
                last_heartbeat=now,
                last_seen=now,
                capabilities=["files"],
                tools=["read", "write", "list"],
                max_concurrent_tasks=1,
            )
            for i in range(nodes)
        ),
        batch_size=2000,
    )
    node_rows.forget()  # bulk_create sends no signal

    def passes(label: str, rows_ms: int) -> tuple[list[float], int]:
        settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS = rows_ms
        times_ms: list[float] = []
        statements = 0
        for run in range(runs):
            Task.objects.create(
                task_id=f"t-{nodes}-{label}-{run}", tool_name="read", capability="files", timeout_ms=60000
            )
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                assigned = task_services.task_dispatch_pending()
                times_ms.append((time.perf_counter() - started) * 1000)
            if len(assigned) != 1:
                raise SystemExit(f"the pass assigned {len(assigned)} tasks, expected 1")
            statements = len(queries)
        return times_ms, statements

    result: dict = {}
    result["read"], result["read_statements"] = passes("read", 0)
    node_rows.get(fresh=True)  # what the pass before would have left
    result["kept"], result["kept_statements"] = passes("kept", 60_000)
    result["burst_ms"] = None
    if burst:
        settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS = 0
        Task.objects.all().delete()  # every node free again
        Task.objects.bulk_create(
            Task(task_id=f"b-{nodes}-{i:05d}", tool_name="read", capability="files", timeout_ms=60000)
            for i in range(burst)
        )
        started = time.perf_counter()
        assigned = task_services.task_dispatch_pending()
        result["burst_ms"] = (time.perf_counter() - started) * 1000
        if len(assigned) != min(burst, nodes):
            raise SystemExit(f"the burst pass assigned {len(assigned)} tasks, expected {min(burst, nodes)}")
    result["saturated"] = saturated_passes(nodes, runs)
    return result


def saturated_passes(nodes: int, runs: int) -> list[float]:
    """A saturated fleet: every node full, a queue waiting. A result frees one node
    and the pass after it (as after every result) hands that node the oldest queued
    task and finds every node full again. The pass's time, per run (rows and index
    kept from the pass before, as on a busy hub)."""
    from django.conf import settings
    from django.utils import timezone

    from nodes import task_services
    from nodes.models import Task

    settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS = 60_000
    Task.objects.all().delete()
    now = timezone.now()
    Task.objects.bulk_create(
        (
            Task(
                task_id=f"s-{nodes}-{i:06d}",
                tool_name="read",
                capability="files",
                timeout_ms=600_000,
                status="assigned",
                attempts=1,
                assigned_node_id=f"n{i:06d}",
                assigned_connection_id=f"c{i}",
                assigned_at=now,
                deadline_at=now + timedelta(minutes=10),
            )
            for i in range(nodes)
        ),
        batch_size=2000,
    )
    Task.objects.bulk_create(
        Task(task_id=f"q-{nodes}-{i:05d}", tool_name="read", capability="files", timeout_ms=60000)
        for i in range(200)
    )
    task_services.task_dispatch_pending()  # explains the queue; keeps the rows and the index
    times_ms: list[float] = []
    for run in range(runs):
        Task.objects.filter(pk=f"s-{nodes}-{run:06d}").update(status="succeeded", finished_at=now)
        started = time.perf_counter()
        assigned = task_services.task_dispatch_pending()
        times_ms.append((time.perf_counter() - started) * 1000)
        if len(assigned) != 1:
            raise SystemExit(f"the saturated pass assigned {len(assigned)} tasks, expected 1")
    return times_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--burst", type=int, default=200, help="tasks handed out by one pass (0: none)")
    args = parser.parse_args()

    in_process_django("apexbridge-dispatch-")

    rows = []
    for nodes in args.nodes:
        result = measure(nodes, args.runs, args.burst)
        burst_ms = result["burst_ms"]
        rows.append(
            [
                nodes,
                median_spread(result["read"], 1),
                f"{statistics.median(result['read']) * 1000 / nodes:.1f}",
                result["read_statements"],
                median_spread(result["kept"], 1),
                result["kept_statements"],
                f"{burst_ms:.0f}" if burst_ms else "-",
                f"{burst_ms / min(args.burst, nodes):.2f}" if burst_ms else "-",
                median_spread(result["saturated"], 1),
            ]
        )
    print_table(
        machine_header(f"bench_dispatch — one dispatch pass, {args.runs} runs per size (SQLite, in-process)"),
        [
            "connected nodes",
            "pass ms, rows read",
            "µs per node",
            "statements",
            "pass ms, rows and index kept",
            "statements",
            f"burst of {args.burst}: pass ms",
            "ms per task",
            "saturated: pass ms",
        ],
        rows,
        [
            "One queued task, every node eligible and free; the pass assigns it. 'rows read': the pass",
            "reads every connected node (APEXBRIDGE_DISPATCH_NODE_ROWS_MS=0, or the first pass after",
            "the age ran out); 'rows kept': it starts from the rows an earlier pass read and, from",
            "the second run on, from the index over them that the pass before kept (node_rows.start_pass).",
            f"Burst: {args.burst} tasks queued at once; one pass (rows read) hands out min({args.burst}, N).",
            "Saturated: every node full, 200 queued; a result frees one node, and the pass after it",
            "(rows and index kept) gives it the oldest queued task and finds every node full again.",
        ],
    )


if __name__ == "__main__":
    main()
