"""Nodes per hub process: memory per connected, registered, heartbeating node, and
the registration storm (all N nodes send ``node_register`` at once).

    .venv/bin/python bench/bench_nodes.py --nodes 1000 5000 10000 --runs 3 [--backend services]

For each N and run: a fresh hub (its own database), then one load-generator
process connects N nodes, registers them all at once, sends one heartbeat per node
(spread over a few seconds), registers them all again (their rows now exist) and
holds the sockets open while this script reads the hub's VmRSS and counts the
online nodes in the database.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading

from common import (
    Bench,
    LoadgenProcess,
    count_nodes,
    machine_header,
    median_spread,
    print_table,
    rss_kib,
)

from tests.e2e.harness import WsNode


class PeakRss:
    """Samples a process's VmRSS every 50 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


async def warm_up(url: str) -> None:
    """One node through the whole path, so lazy imports are in the 'before' RSS."""
    node = await WsNode(url).connect()
    await node.register("bench-warmup")
    await node.send("heartbeat", {})
    await node.recv_type("heartbeat_ack")
    await node.close()


# Creates N per-node keys in the hub's database and writes their plain text to a file
# (argv: N, path); bulk_create, because node_key_create one by one takes minutes.
_MAKE_KEYS = """
import secrets, sys
from nodes.auth import KEY_PREFIX, hash_key
from nodes.models import NodeKey
count, path = int(sys.argv[-2]), sys.argv[-1]
plain = [f"{KEY_PREFIX}_{n:08x}_{secrets.token_urlsafe(32)}" for n in range(count)]
NodeKey.objects.bulk_create(
    [NodeKey(name=f"bench-{n}", prefix=f"{n:08x}", key_hash=hash_key(k)) for n, k in enumerate(plain)],
    batch_size=500,
)
open(path, "w").write(chr(10).join(plain))
"""


def make_keys(bench: Bench, hub, nodes: int) -> str:
    path = bench.workdir / f"keys-{hub.port}.txt"
    script = bench.workdir / "make_keys.py"
    script.write_text(_MAKE_KEYS)
    hub.manage("shell", "-c", f"import sys; sys.argv += ['{nodes}', '{path}']; exec(open('{script}').read())")
    return str(path)


def one_run(bench: Bench, backend: str, nodes: int, spread: float, keys: str) -> dict:
    hub = bench.hub(backend)
    try:
        asyncio.run(warm_up(hub.node_url()))
        key_args = ["--keys-file", make_keys(bench, hub, nodes)] if keys == "per-node" else []
        before = rss_kib(hub.process.pid)
        peak = PeakRss(hub.process.pid)
        load = LoadgenProcess(
            "nodes",
            "--url",
            hub.node_url(),
            "--nodes",
            str(nodes),
            "--hold",
            "--spread",
            str(spread),
            *key_args,
        )
        result = load.wait_ready(timeout=1200)
        after = rss_kib(hub.process.pid)
        result["online_in_db"] = count_nodes(hub, "online")
        result["rss_before_kib"] = before
        result["rss_after_kib"] = after
        result["rss_peak_kib"] = peak.stop()
        load.finish()
        return result
    finally:
        bench.stop_hubs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["embedded", "services"], default="embedded")
    parser.add_argument(
        "--spread", type=float, default=5.0, help="seconds over which the heartbeats are spread"
    )
    parser.add_argument(
        "--keys",
        choices=["shared", "per-node"],
        default="shared",
        help="the key each node connects with: the shared key, or one per-node key each",
    )
    args = parser.parse_args()
    bench = Bench()
    rows = []
    try:
        for n in args.nodes:
            runs = [one_run(bench, args.backend, n, args.spread, args.keys) for _ in range(args.runs)]
            per_node = [(r["rss_after_kib"] - r["rss_before_kib"]) / n for r in runs]
            rows.append(
                [
                    n,
                    median_spread([r["connect_s"] for r in runs], 2),
                    median_spread([r["storm_s"] for r in runs], 2),
                    median_spread([r["registered"] / r["storm_s"] for r in runs], 0),
                    median_spread([r["restorm_s"] for r in runs], 2),
                    median_spread(per_node, 1),
                    median_spread([r["rss_peak_kib"] / 1024 for r in runs], 0),
                    median_spread([(r["heartbeat"]["p99_ms"] or float("nan")) for r in runs], 1),
                    f"{statistics.median(r['online_in_db'] for r in runs):.0f}/{n}",
                    sum(
                        r["connect_errors"]
                        + r["register_errors"]
                        + r["reregister_errors"]
                        + r["heartbeat_errors"]
                        + r["error_frames"]
                        for r in runs
                    ),
                ]
            )
    finally:
        bench.close()
    print_table(
        machine_header(
            f"bench_nodes — nodes per hub process ({args.backend}, {args.keys} keys, {args.runs} runs each)"
        ),
        [
            "nodes",
            "connect s",
            "storm s",
            "registrations/s",
            "again s",
            "RSS KiB/node",
            "peak RSS MiB",
            "hb ack p99 ms",
            "online in DB",
            "errors",
        ],
        rows,
        [
            "connect: N WebSocket handshakes (200 in flight); storm: all N send node_register at once, "
            "wall time to the last node_registered; again: the same N register once more (every row "
            "exists: the updates a hub restart's storm makes).",
            "RSS KiB/node: (hub VmRSS with N registered nodes - VmRSS after warm-up) / N; "
            "hb: one heartbeat per node spread over the run; values: median (min–max) of the runs.",
        ],
    )


if __name__ == "__main__":
    main()
