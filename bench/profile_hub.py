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
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from common import Bench, machine_header, print_table, run_loadgen

FRAME = re.compile(r"^(.*) \((.*?):\d+\)$")
PY_SPY = Path(sys.executable).with_name("py-spy")


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
    parser.add_argument("mode", choices=["nodes", "heartbeats", "tasks", "llm"])
    args, load_args = parser.parse_known_args()
    if args.summarize:
        total, rows = summarize(args.summarize, args.top, args.focus, args.by_self)
        print_table(f"## profile_hub — {args.summarize}", ["function file", "in %", "self %"], rows, [])
        return
    if not PY_SPY.exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install -r requirements-bench.txt")
    raw = args.raw or Path(tempfile.mkstemp(suffix=".txt", prefix="apexbridge-profile-")[1])
    with contextlib.ExitStack() as stack:  # stops the hub, then the upstream, whatever fails
        if args.mode == "llm":  # a loopback upstream, and the hub's model pointed at it
            from bench_llm import LLM_ENV, start_upstream

            upstream, api_base = start_upstream(chunks=50)
            stack.callback(lambda: (upstream.kill(), upstream.wait()))
            bench = Bench()
            stack.callback(bench.close)
            hub = bench.hub(args.backend, env={**LLM_ENV, "APEXBRIDGE_LLM_API_BASE": api_base})
            load_args = ["--upstream", api_base, "--model", LLM_ENV["APEXBRIDGE_LLM_MODEL"], *load_args]
        else:
            bench = Bench()
            stack.callback(bench.close)
            hub = bench.hub(args.backend)
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
