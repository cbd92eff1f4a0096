"""The same hub under three ASGI servers: daphne, uvicorn (the default) and granian,
on the heartbeat and task benchmarks (one process, SQLite, in-memory layer).

    .venv/bin/python bench/bench_servers.py --nodes 1000 --seconds 10 --tasks 2000 --runs 3

granian comes from requirements-bench.txt (``make bench`` installs it).
"""

from __future__ import annotations

import argparse
from importlib.util import find_spec

from bench_heartbeats import measure as measure_heartbeats
from bench_tasks import measure as measure_tasks
from common import Bench, machine_header, median_spread, print_table

SERVERS = ("daphne", "uvicorn", "granian")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="heartbeating nodes")
    parser.add_argument("--rate", type=float, default=1000, help="offered heartbeats/s for the latency row")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--task-nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    args = parser.parse_args()
    bench = Bench()
    rows = []
    try:
        for server in args.servers:
            if find_spec(server) is None:
                rows.append([server, "not installed (pip install -r requirements-bench.txt)", "", "", "", ""])
                continue
            bench.server = server
            maximum = [
                measure_heartbeats(bench, "embedded", args.nodes, 0, args.seconds, 2)
                for _ in range(args.runs)
            ]
            offered = [
                measure_heartbeats(bench, "embedded", args.nodes, args.rate, args.seconds, 1)
                for _ in range(args.runs)
            ]
            tasks = [
                measure_tasks(bench, "embedded", args.task_nodes, args.tasks, 20) for _ in range(args.runs)
            ]
            errors = sum(
                r["heartbeat_errors"] + r["error_frames"] + r["connect_errors"] + r["register_errors"]
                for r in maximum + offered
            ) + sum(
                r["sequential_failures"] + r["submit_errors"] + r["tasks"] - r["completed"] for r in tasks
            )
            rows.append(
                [
                    server,
                    median_spread([r["acks_per_s"] for r in maximum], 0),
                    median_spread([r["heartbeat"]["p99_ms"] or float("nan") for r in offered], 2),
                    median_spread([r["throughput_tasks_per_s"] for r in tasks], 0),
                    median_spread([r["sequential"]["p50_ms"] or float("nan") for r in tasks], 1),
                    errors,
                ]
            )
    finally:
        bench.close()
    print_table(
        machine_header(f"bench_servers — one hub process under each ASGI server, {args.runs} runs"),
        [
            "server",
            "max heartbeats/s",
            f"ack p99 ms at {args.rate:.0f}/s",
            "tasks/s",
            "POST ?wait p50 ms",
            "errors",
        ],
        rows,
        [
            f"heartbeats: {args.nodes} nodes, {args.seconds:.0f} s (max: 2 in flight per node); "
            f"tasks: {args.tasks} tasks, {args.task_nodes} nodes, 32 HTTP clients; SQLite.",
        ],
    )


if __name__ == "__main__":
    main()
