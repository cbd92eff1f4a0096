"""Profile a hub process under one load-generator mode with py-spy; print where it spends.

    .venv/bin/python bench/profile_hub.py nodes --nodes 2000
    .venv/bin/python bench/profile_hub.py heartbeats --nodes 1000 --rate 1000 --seconds 10
    .venv/bin/python bench/profile_hub.py --backend services tasks --nodes 10 --tasks 1000
    .venv/bin/python bench/profile_hub.py --gil llm --requests 400

Everything after the options is passed to ``bench/loadgen.py`` (``--url``/``--http``/
``--token`` are filled in). py-spy (``requirements-bench.txt``) samples the hub for the
whole load run, GIL holders only with ``--gil``; the table lists the functions with the
most samples, inclusive ("in") and on top of the stack ("self"). ``--raw FILE`` keeps
the collapsed stacks (``py-spy record --format raw``) for a flame graph.
Needs the rights to ptrace the hub (root, or ``kernel.yama.ptrace_scope=0``).

``--count-queries`` counts SQL statements instead of sampling (``bench/querycount``):
the table lists each statement shape with its count per unit of load (per task, per
LLM request, per heartbeat, per node).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Bench, machine_header, print_table, run_loadgen

FRAME = re.compile(r"^(.*) \((.*?):\d+\)$")
PY_SPY = Path(sys.executable).with_name("py-spy")
QUERYCOUNT = Path(__file__).resolve().with_name("querycount")


def load_units(mode: str, result: dict) -> tuple[int, str]:
    """How much work a load run did, in the unit its statements are counted per."""
    if mode == "tasks":
        return result["tasks"] + result["sequential"]["n"], "task"
    if mode == "llm":  # measured requests (warm-up requests are counted too)
        return sum(v["hub"]["n"] for v in result.values() if isinstance(v, dict) and "hub" in v), "request"
    if mode == "heartbeats":  # measured heartbeats (warm-up and registrations are counted too)
        return result["heartbeats_sent"], "heartbeat"
    return result["nodes"], "node"


def count_rows(counts: dict[str, int], units: int, top: int) -> list[list]:
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:top]
    rows = [[f"{count / units:.2f}", str(count), statement] for statement, count in ranked]
    rows.append([f"{sum(counts.values()) / units:.2f}", str(sum(counts.values())), "(all statements)"])
    return rows


def _frame_name(frame: str) -> str:
    """``Class.method (path/to/file.py:12)`` -> ``Class.method to/file.py``."""
    match = FRAME.match(frame)
    if not match:
        return frame
    function, path = match.groups()
    return f"{function} {'/'.join(path.split('/')[-2:])}"


def summarize(raw: Path, top: int, focus: str, by_self: bool = False) -> tuple[int, list[list]]:
    """(total samples, rows of function / in % / self %) from py-spy's collapsed stacks."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_frame_name(frame) for frame in stack.split(";")[1:]]
        for frame in set(frames):
            inclusive[frame] += samples
        if frames:
            own[frames[-1]] += samples
    ranked = (own if by_self else inclusive).most_common()
    names = [name for name, _ in ranked if focus in name][:top]
    rows = [
        [name, f"{100 * inclusive[name] / total:.1f}", f"{100 * own[name] / total:.1f}"] for name in names
    ]
    return total, rows


def start_hub(stack: contextlib.ExitStack, mode: str, backend: str, load_args: list[str], **env: str):
    """A benchmark hub for this mode (an upstream too for ``llm``), stopped by ``stack``;
    returns it and the load generator's arguments."""
    if mode == "llm":  # a loopback upstream, and the hub's model pointed at it
        from bench_llm import LLM_ENV, start_upstream

        upstream, api_base = start_upstream(chunks=50)
        stack.callback(lambda: (upstream.kill(), upstream.wait()))
        env = {**LLM_ENV, "APEXBRIDGE_LLM_API_BASE": api_base, **env}
        load_args = ["--upstream", api_base, "--model", LLM_ENV["APEXBRIDGE_LLM_MODEL"], *load_args]
    bench = Bench()
    stack.callback(bench.close)
    return bench.hub(backend, env=env), load_args


def count_queries(args: argparse.Namespace, load_args: list[str]) -> None:
    log = Path(tempfile.mkstemp(suffix=".json", prefix="apexbridge-queries-")[1])
    env = {
        "APEXBRIDGE_BENCH_QUERY_LOG": str(log),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(QUERYCOUNT), os.environ.get("PYTHONPATH")])),
    }
    with contextlib.ExitStack() as stack:
        hub, load_args = start_hub(stack, args.mode, args.backend, load_args, **env)
        connection = ["--url", hub.node_url(), "--http", hub.http_url, "--token", hub.staff_token()]
        time.sleep(1.5)  # the counter's first write: the start-up statements, taken off below
        before = json.loads(log.read_text() or "{}")
        result = run_loadgen(args.mode, *connection, *load_args)
        time.sleep(1.5)  # the last batches and passes, and the counter's next write
        after = json.loads(log.read_text() or "{}")
    counts = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    units, unit = load_units(args.mode, result)
    print_table(
        machine_header(f"profile_hub --count-queries — {args.mode} {' '.join(load_args)} ({args.backend})"),
        [f"per {unit}", "count", "statement"],
        count_rows(counts, units, args.top),
        [f"{units} {unit}s; load result: {result}", f"counts: {log}"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["embedded", "services"], default="embedded")
    parser.add_argument("--sample-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--focus", default="", help="only functions whose 'name file' contains this")
    parser.add_argument("--self", dest="by_self", action="store_true", help="rank by self time")
    parser.add_argument("--summarize", type=Path, help="only summarize these collapsed stacks")
    parser.add_argument("--gil", action="store_true", help="only sample the thread holding the GIL")
    parser.add_argument("--raw", type=Path, help="keep the collapsed stacks in this file")
    parser.add_argument("--count-queries", action="store_true", help="count SQL statements, no py-spy")
    parser.add_argument("mode", choices=["nodes", "heartbeats", "tasks", "llm"])
    args, load_args = parser.parse_known_args()
    if args.summarize:
        total, rows = summarize(args.summarize, args.top, args.focus, args.by_self)
        print_table(f"## profile_hub — {args.summarize}", ["function file", "in %", "self %"], rows, [])
        return
    if args.count_queries:
        count_queries(args, load_args)
        return
    if not PY_SPY.exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -r requirements-bench.txt")
    raw = args.raw or Path(tempfile.mkstemp(suffix=".txt", prefix="apexbridge-profile-")[1])
    with contextlib.ExitStack() as stack:  # stops the hub, then the upstream, whatever fails
        hub, load_args = start_hub(stack, args.mode, args.backend, load_args)
        connection = ["--url", hub.node_url(), "--http", hub.http_url, "--token", hub.staff_token()]
        command = [str(PY_SPY), "record", "--pid", str(hub.process.pid), "--rate", str(args.sample_rate)]
        command += ["--format", "raw", "--output", str(raw), "--threads", "--nonblocking"]
        if args.gil:
            command.append("--gil")
        spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            result = run_loadgen(args.mode, *connection, *load_args)
        finally:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(timeout=60)
    total, rows = summarize(raw, args.top, args.focus, args.by_self)
    print_table(
        machine_header(f"profile_hub — {args.mode} {' '.join(load_args)} ({args.backend})"),
        ["function file", "in %", "self %"],
        rows,
        [f"{total} samples; load result: {result}", f"collapsed stacks: {raw}"],
    )


if __name__ == "__main__":
    main()
