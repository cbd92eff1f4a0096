"""Run every benchmark, one table each: ``make bench`` runs the short version.

    .venv/bin/python bench/run_all.py [--short]

``--short`` uses small N and short runs (a smoke test of the benchmarks, a minute
or two each); without it the full sizes of docs/BENCHMARKS.md are used.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [
    ["bench_floor.py", "--runs", "3", "--n", "500"],
    ["bench_nodes.py", "--nodes", "1000", "5000", "10000", "--runs", "3"],
    ["bench_heartbeats.py", "--nodes", "1000", "--rates", "1000", "--seconds", "10", "--runs", "3"],
    ["bench_tasks.py", "--tasks", "10000", "--nodes", "10", "--runs", "3"],
    ["bench_dispatch.py", "--nodes", "100", "1000", "10000", "--runs", "5"],
    ["bench_llm.py", "--requests", "200", "--chunks", "50", "--runs", "3"],
    ["bench_scaleout.py", "--nodes", "1000", "--tasks", "2000", "--runs", "3"],
    ["bench_servers.py", "--nodes", "1000", "--seconds", "10", "--tasks", "2000", "--runs", "3"],
]
SHORT = [
    ["bench_floor.py", "--runs", "1", "--n", "50"],
    ["bench_nodes.py", "--nodes", "300", "--runs", "1", "--spread", "1"],
    ["bench_heartbeats.py", "--nodes", "300", "--rates", "300", "--seconds", "3", "--runs", "1"],
    ["bench_tasks.py", "--tasks", "200", "--nodes", "5", "--sequential", "20", "--runs", "1"],
    ["bench_dispatch.py", "--nodes", "100", "1000", "--runs", "2"],
    ["bench_llm.py", "--requests", "20", "--chunks", "20", "--runs", "1"],
    ["bench_scaleout.py", "--nodes", "200", "--seconds", "3", "--tasks", "200", "--runs", "1"],
    [
        "bench_servers.py",
        "--nodes",
        "200",
        "--rate",
        "200",
        "--seconds",
        "3",
        "--tasks",
        "200",
        "--runs",
        "1",
    ],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args()
    failed = []
    for command in SHORT if args.short else FULL:
        print(f"\n$ bench/{' '.join(command)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], cwd=HERE.parent).returncode:
            failed.append(command[0])
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
