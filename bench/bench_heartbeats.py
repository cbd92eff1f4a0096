"""Heartbeats per hub process: the maximum sustained rate (closed loop: every node
keeps ``--window`` heartbeats in flight) and the ack latency at fixed offered loads
(open loop: ``--rates`` heartbeats/s spread over the nodes).

    .venv/bin/python bench/bench_heartbeats.py --nodes 1000 --rates 1000 --seconds 10 --runs 3
"""

from __future__ import annotations

import argparse

from common import Bench, cpu_seconds, machine_header, median_spread, print_table, run_loadgen


def measure(
    bench: Bench, backend: str, nodes: int, rate: float, seconds: float, window: int, hubs: int = 1
) -> dict:
    started = [bench.hub(backend) for _ in range(1)]
    if hubs > 1:
        database_url, redis_url = started[0].env["DATABASE_URL"], started[0].env.get("REDIS_URL")
        for index in range(1, hubs):
            started.append(
                bench.hub(backend, database_url=database_url, redis_url=redis_url, cpus={index % 2})
            )
    try:
        urls = [arg for hub in started for arg in ("--url", hub.node_url())]
        cpu_before = sum(cpu_seconds(h.process.pid) for h in started)
        result = run_loadgen(
            "heartbeats",
            *urls,
            "--nodes",
            str(nodes),
            "--rate",
            str(rate),
            "--seconds",
            str(seconds),
            "--window",
            str(window),
        )
        result["hub_cpu_s"] = sum(cpu_seconds(h.process.pid) for h in started) - cpu_before
        return result
    finally:
        bench.stop_hubs()


def rows_for(label: str, runs: list[dict]) -> list:
    return [
        label,
        median_spread([r["acks_per_s"] for r in runs], 0),
        median_spread([r["heartbeat"]["p50_ms"] or float("nan") for r in runs], 2),
        median_spread([r["heartbeat"]["p99_ms"] or float("nan") for r in runs], 2),
        sum(
            r["heartbeat_errors"] + r["error_frames"] + r["connect_errors"] + r["register_errors"]
            for r in runs
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rates", type=float, nargs="*", default=[1000])
    parser.add_argument("--window", type=int, default=2, help="heartbeats in flight per node (maximum)")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["embedded", "services"], default="embedded")
    args = parser.parse_args()
    bench = Bench()
    rows = []
    try:
        runs = [
            measure(bench, args.backend, args.nodes, 0, args.seconds, args.window) for _ in range(args.runs)
        ]
        rows.append(rows_for(f"maximum ({args.window} in flight per node)", runs))
        for rate in args.rates:
            runs = [measure(bench, args.backend, args.nodes, rate, args.seconds, 1) for _ in range(args.runs)]
            rows.append(rows_for(f"offered {rate:.0f}/s", runs))
    finally:
        bench.close()
    print_table(
        machine_header(
            f"bench_heartbeats — one hub process ({args.backend}), {args.nodes} nodes, "
            f"{args.seconds:.0f} s per run, {args.runs} runs"
        ),
        ["load", "acks/s", "ack p50 ms", "ack p99 ms", "errors"],
        rows,
        [
            "Latency: heartbeat sent -> heartbeat_ack received, measured in the load process (loopback).",
            "Values: median (min–max) of the runs; every run on a fresh hub.",
        ],
    )


if __name__ == "__main__":
    main()
