"""Scale-out: the heartbeat and task benchmarks with 1 and 2 hub processes sharing
one PostgreSQL database and one Redis (nodes and HTTP clients spread round robin).

    .venv/bin/python bench/bench_scaleout.py --nodes 1000 --tasks 2000 --runs 3

On a 2-core machine the two hubs get one core each and the load generator,
PostgreSQL and Redis share them: the ratio shown is a floor, not the scaling a
machine with spare cores would show.
"""

from __future__ import annotations

import argparse

from bench_heartbeats import measure as measure_heartbeats
from bench_tasks import measure as measure_tasks
from common import BACKEND_LABELS, Bench, machine_header, median_spread, print_table, services_available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="heartbeating nodes")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--task-nodes", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["services", "services-pool"], default="services")
    args = parser.parse_args()
    if not services_available():
        raise SystemExit("bench_scaleout needs PostgreSQL and Redis on 127.0.0.1")
    bench = Bench()
    results: dict[tuple[str, int], list[float]] = {}
    try:
        for hubs in (1, 2):
            results[("heartbeats", hubs)] = [
                measure_heartbeats(bench, args.backend, args.nodes, 0, args.seconds, 2, hubs=hubs)[
                    "acks_per_s"
                ]
                for _ in range(args.runs)
            ]
            results[("tasks", hubs)] = [
                measure_tasks(bench, args.backend, args.task_nodes, args.tasks, 20, hubs=hubs)[
                    "throughput_tasks_per_s"
                ]
                for _ in range(args.runs)
            ]
    finally:
        bench.close()
    rows = []
    for what, unit in (("heartbeats", "heartbeats/s"), ("tasks", "tasks/s")):
        one, two = results[(what, 1)], results[(what, 2)]
        ratios = [b / a for a, b in zip(sorted(one), sorted(two), strict=True) if a]
        rows.append(
            [f"{what} ({unit})", median_spread(one, 0), median_spread(two, 0), median_spread(ratios, 2)]
        )
    print_table(
        machine_header(
            f"bench_scaleout — 1 vs 2 hub processes on {BACKEND_LABELS[args.backend]}, {args.runs} runs"
        ),
        ["benchmark", "1 hub", "2 hubs", "ratio"],
        rows,
        [
            f"heartbeats: {args.nodes} nodes, 2 in flight each, {args.seconds:.0f} s; "
            f"tasks: {args.tasks} tasks, {args.task_nodes} nodes, 32 HTTP clients.",
            "2 hubs: pinned to cores 0 and 1; load generator, PostgreSQL and Redis share those 2 cores.",
        ],
    )


if __name__ == "__main__":
    main()
