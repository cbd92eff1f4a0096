"""Tasks through one hub process: round trip (submit -> task_assign -> task_result
-> result visible) one at a time, and throughput with ``--nodes`` nodes answering
at once, on SQLite and on PostgreSQL + Redis (without and with the psycopg pool; with
persistent connections: ``services-persistent``).

    .venv/bin/python bench/bench_tasks.py --tasks 10000 --nodes 10 --runs 3 \
        --backends embedded services services-pool

Round trip through the API: ``POST /api/tasks?wait=10`` until the reply carries the
finished task. Inside the hub: the task's ``finishedAt - createdAt`` (ms resolution).
Throughput: ``--tasks`` submitted by 32 concurrent HTTP clients; done when every
node got its ``task_result_ack``.
"""

from __future__ import annotations

import argparse

from common import (
    BACKEND_LABELS,
    BACKENDS,
    Bench,
    cpu_seconds,
    machine_header,
    median_spread,
    print_table,
    run_loadgen,
    services_available,
)


def measure(bench: Bench, backend: str, nodes: int, tasks: int, sequential: int, hubs: int = 1) -> dict:
    started = [bench.hub(backend)]
    if hubs > 1:
        database_url, redis_url = started[0].env["DATABASE_URL"], started[0].env.get("REDIS_URL")
        for index in range(1, hubs):
            started.append(
                bench.hub(backend, database_url=database_url, redis_url=redis_url, cpus={index % 2})
            )
    try:
        token = started[0].staff_token()
        args = [a for h in started for a in ("--url", h.node_url(), "--http", h.http_url)]
        cpu_before = sum(cpu_seconds(h.process.pid) for h in started)
        result = run_loadgen(
            "tasks",
            *args,
            "--token",
            token,
            "--nodes",
            str(nodes),
            "--tasks",
            str(tasks),
            "--sequential",
            str(sequential),
            timeout=1800,
        )
        result["hub_cpu_s"] = sum(cpu_seconds(h.process.pid) for h in started) - cpu_before
        return result
    finally:
        bench.stop_hubs()


def row(label: str, runs: list[dict]) -> list:
    return [
        label,
        median_spread([r["inside_hub"]["p50_ms"] or float("nan") for r in runs], 1),
        median_spread([r["inside_hub"]["p99_ms"] or float("nan") for r in runs], 1),
        median_spread([r["sequential"]["p50_ms"] or float("nan") for r in runs], 1),
        median_spread([r["sequential"]["p99_ms"] or float("nan") for r in runs], 1),
        median_spread([r["throughput_tasks_per_s"] for r in runs], 0),
        median_spread([1000 * r["hub_cpu_s"] / (r["tasks"] + r["sequential"]["n"]) for r in runs], 1),
        sum(r["sequential_failures"] + r["submit_errors"] + r["tasks"] - r["completed"] for r in runs),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--sequential", type=int, default=200, help="round trips measured one at a time")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=["embedded", "services", "services-pool"]
    )
    args = parser.parse_args()
    bench = Bench()
    rows = []
    try:
        for backend in args.backends:
            if backend != "embedded" and not services_available():
                rows.append([BACKEND_LABELS[backend], "not reachable", "", "", "", "", "", ""])
                continue
            runs = [
                measure(bench, backend, args.nodes, args.tasks, args.sequential) for _ in range(args.runs)
            ]
            rows.append(row(BACKEND_LABELS[backend], runs))
    finally:
        bench.close()
    print_table(
        machine_header(
            f"bench_tasks — one hub process, {args.nodes} nodes, {args.tasks} tasks, {args.runs} runs"
        ),
        [
            "backend",
            "in hub p50 ms",
            "in hub p99 ms",
            "POST ?wait p50 ms",
            "POST ?wait p99 ms",
            "tasks/s",
            "hub CPU ms/task",
            "errors",
        ],
        rows,
        [
            "in hub: finishedAt - createdAt (ms clock); POST ?wait: HTTP round trip at the client.",
            "tasks/s: 32 HTTP clients submitting, until the last task_result_ack; median (min–max).",
            "hub CPU ms/task: the hub process's user + system CPU over the whole run, per task.",
        ],
    )


if __name__ == "__main__":
    main()
