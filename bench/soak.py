"""Soak test (issue 8, ``make soak``): one hub under steady, mixed load for minutes,
sampled for leaks and growth. Not part of CI.

    .venv/bin/python bench/soak.py [--minutes 10] [--nodes 1000] [--backend embedded|services]

What runs:

- one hub (uvicorn, ``DJANGO_DEBUG=0``; SQLite, or PostgreSQL + Redis with
  ``--backend services``) with an LLM model pointed at a loopback
  OpenAI-compatible upstream (``bench/llm_upstream.py``). The heartbeat interval is
  shortened to ``--heartbeat-ms`` (default 5 s, timeout 3×) so the heartbeat load is
  real: 1,000 nodes → 200 heartbeats/s;
- a separate load process (this script with ``--load-process``; asyncio +
  ``websockets``, the ``SimNode`` of ``bench/loadgen.py``): ``--nodes`` nodes that
  heartbeat every interval (phases spread evenly), answer every ``task_assign``
  with a ``task_result``, make ``llm_request`` calls at ``--llm-rate``/s (every
  ``--stream-every``-th one streaming) from random nodes, and send ``node_log``
  lines at ``--log-rate``/s from ``--log-nodes`` nodes (the hub's per-node cap is
  lowered to ``--log-cap`` so its prune is exercised within the run); it also
  submits tasks through ``POST /api/tasks`` (staff DRF token) at ``--task-rate``/s;
- this process samples the hub every ``--sample`` seconds: RSS, open fds,
  database connections, Redis keys, row counts, errors; after ``--minutes`` the
  load stops submitting, tasks get ``--grace`` seconds to finish, then one table
  and the verdicts are printed. Exit status 1 when a verdict fails.

Everything is on loopback; every loop is bounded by the run's deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
for entry in (str(ROOT), str(BENCH)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

FINAL = ("succeeded", "failed", "timed_out", "cancelled")
EXPECTED_FRAMES = {
    "node_registered",
    "heartbeat_ack",
    "task_assign",
    "task_result_ack",
    "llm_response_stream",
    "llm_response",
}


# =====================================================================================
# Load process
# =====================================================================================
def load_main(args: argparse.Namespace) -> None:
    from loadgen import SimNode, _raise_fd_limit, connect_all, make_nodes, register_storm

    _raise_fd_limit()

    class SoakNode(SimNode):
        """A SimNode that classifies every frame and counts anything unexpected."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.unexpected: list[str] = []
            self.refused = 0
            self.refused_sample: list[str] = []
            self.closing = False
            self.hb_acked = 0

        def _refuse(self, what: str) -> None:
            self.refused += 1
            if len(self.refused_sample) < 3:
                self.refused_sample.append(what[:300])

        async def _read(self) -> None:
            import websockets

            try:
                async for raw in self.ws:
                    message = json.loads(raw)
                    kind = message.get("type")
                    data = message.get("data") or {}
                    self.frames[kind] = self.frames.get(kind, 0) + 1
                    if kind not in EXPECTED_FRAMES:
                        self.unexpected.append(str(raw)[:300])
                    elif kind == "heartbeat_ack":
                        sent = self.heartbeat_sent.popleft() if self.heartbeat_sent else None
                        if data.get("success") and sent is not None:
                            self.hb_acked += 1
                            self.heartbeat_latencies.append(time.perf_counter() - sent)
                        else:
                            self.heartbeat_errors += 1
                            self._refuse(f"heartbeat_ack {data}")
                    elif kind == "node_registered":
                        if self.registered is not None and not self.registered.done():
                            self.registered.set_result(data)
                    elif kind == "task_assign":
                        await self.on_task(self, data)
                    elif kind == "task_result_ack":
                        self.task_acks += 1
                        if not data.get("success"):
                            self._refuse(f"task_result_ack {data}")
                    elif kind == "llm_response":
                        waiter = self.waiters.pop(data.get("requestId"), None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(data)
            except websockets.ConnectionClosed as exc:
                if not self.closing:
                    self.closed = f"{exc}"[:200] or "closed"
                self.heartbeat_sent.clear()

    stats: dict[str, Any] = {
        "tasks_submitted": 0,
        "submit_errors": 0,
        "submit_error_sample": [],
        "llm_ok": 0,
        "llm_failed": 0,
        "llm_stream_ok": 0,
        "llm_failed_sample": [],
        "node_logs_sent": 0,
        "heartbeats_sent": 0,
        "submitting": True,
    }
    task_ids: list[str] = []
    llm_latencies: list[float] = []

    async def run() -> dict[str, Any]:
        import aiohttp

        nodes: list[SoakNode] = make_nodes([args.url], args.nodes, "soak", capabilities=["soak"])
        nodes = [SoakNode(n.url, n.node_id, n.capabilities) for n in nodes]

        async def answer(node: SoakNode, data: dict) -> None:
            await node.send(
                "task_result",
                {
                    "taskId": data["taskId"],
                    "nodeId": node.node_id,
                    "success": True,
                    "result": data.get("toolArgs"),
                    "executionTime": 1,
                },
            )

        for node in nodes:
            node.on_task = answer
        setup = await connect_all(nodes, 100)
        # Register in batches of 200 (a 1,000-node storm at once is bench_nodes' job).
        storms = []
        for start in range(0, len(nodes), 200):
            storms.append(await register_storm(nodes[start : start + 200]))
        setup["registered"] = sum(s["registered"] for s in storms)
        setup["register_errors"] = sum(s["register_errors"] for s in storms)
        live = [n for n in nodes if n.registered is not None and n.registered.done()]
        submit_until = time.monotonic() + args.seconds
        stop = asyncio.Event()

        def alive() -> list[SoakNode]:
            return [n for n in live if not n.closed]

        async def heartbeats() -> None:
            # Every node once per interval, phases spread evenly (open loop).
            rate = len(live) / (args.heartbeat_ms / 1000)
            ring = itertools.cycle(live)
            started = time.monotonic()
            sent = 0
            while not stop.is_set():
                due = int((time.monotonic() - started) * rate) - sent
                for _ in range(max(0, due)):
                    await next(ring).heartbeat()
                sent += max(0, due)
                stats["heartbeats_sent"] = sent
                await asyncio.sleep(0.02)

        async def paced(rate: float, action) -> None:
            if rate <= 0:
                return
            started = time.monotonic()
            count = 0
            pending: set[asyncio.Task] = set()
            while not stop.is_set() and time.monotonic() < submit_until:
                due = int((time.monotonic() - started) * rate) - count
                for _ in range(max(0, due)):
                    task = asyncio.create_task(action(count))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    count += 1
                await asyncio.sleep(0.02)
            if pending:
                await asyncio.wait(pending, timeout=90)

        headers = {"Authorization": f"Token {args.token}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=16)
        ) as session:

            async def submit(i: int) -> None:
                body = {"toolName": "echo", "toolArgs": {"i": i}, "capability": "soak"}
                try:
                    async with session.post(
                        f"{args.http}/api/tasks", json=body, timeout=aiohttp.ClientTimeout(total=60)
                    ) as response:
                        reply = await response.json(content_type=None)
                        if response.status in (200, 201) and (reply or {}).get("task"):
                            stats["tasks_submitted"] += 1
                            task_ids.append(reply["task"]["taskId"])
                            return
                        problem = f"{response.status} {str(reply)[:200]}"
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    problem = repr(exc)[:200]
                stats["submit_errors"] += 1
                if len(stats["submit_error_sample"]) < 3:
                    stats["submit_error_sample"].append(problem)

            async def llm(i: int) -> None:
                candidates = alive()
                if not candidates:
                    return
                node = random.choice(candidates)
                stream = args.stream_every > 0 and i % args.stream_every == 0
                request_id = f"r-{uuid.uuid4().hex[:12]}"
                waiter = asyncio.get_running_loop().create_future()
                node.waiters[request_id] = waiter
                started = time.perf_counter()
                problem = ""
                try:
                    await node.send(
                        "llm_request",
                        {
                            "requestId": request_id,
                            "nodeId": node.node_id,
                            "messages": [{"role": "user", "content": f"soak {i}"}],
                            "options": {"stream": stream, "maxTokens": 16},
                        },
                    )
                    reply = await asyncio.wait_for(waiter, 60)
                    if reply.get("success"):
                        stats["llm_ok"] += 1
                        stats["llm_stream_ok"] += int(stream)
                        llm_latencies.append(time.perf_counter() - started)
                    else:
                        problem = str(reply)[:300]
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    problem = repr(exc)[:200]
                finally:
                    node.waiters.pop(request_id, None)
                    node.stream_chunks.pop(request_id, None)
                if problem:
                    stats["llm_failed"] += 1
                    if len(stats["llm_failed_sample"]) < 3:
                        stats["llm_failed_sample"].append(problem)

            log_nodes = live[: max(1, args.log_nodes)]

            async def node_log(i: int) -> None:
                node = log_nodes[i % len(log_nodes)]
                if node.closed:
                    return
                await node.send(
                    "node_log",
                    {
                        "nodeId": node.node_id,
                        "level": "info",
                        "message": f"soak log line {i}",
                        "context": {"i": i},
                    },
                )
                stats["node_logs_sent"] += 1

            def snapshot() -> dict[str, Any]:
                unexpected = [u for n in nodes for u in n.unexpected]
                lat = sorted(llm_latencies)
                return {
                    **stats,
                    "setup": setup,
                    "live": len(alive()),
                    "closed_by_hub": sum(1 for n in nodes if n.closed),
                    "closed_sample": [n.closed for n in nodes if n.closed][:3],
                    "unexpected_frames": len(unexpected),
                    "unexpected_sample": unexpected[:3],
                    "refused": sum(n.refused for n in nodes),
                    "refused_sample": [s for n in nodes for s in n.refused_sample][:3],
                    "heartbeat_acks": sum(n.hb_acked for n in nodes),
                    # Unanswered for over 10 s (the hub's timeout is 3 intervals = 15 s).
                    "heartbeat_late": sum(
                        1 for n in nodes for sent in n.heartbeat_sent if time.perf_counter() - sent > 10
                    ),
                    "heartbeat_failed": sum(n.heartbeat_errors for n in nodes),
                    "task_results_acked": sum(n.task_acks for n in nodes),
                    "llm_p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
                    "llm_p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                }

            async def report() -> None:
                path = Path(args.stats_file)
                while not stop.is_set():
                    stats["submitting"] = time.monotonic() < submit_until
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(snapshot()))
                    tmp.replace(path)
                    # Keep the heartbeat latency lists short (only counts are reported).
                    for n in nodes:
                        if len(n.heartbeat_latencies) > 1000:
                            del n.heartbeat_latencies[:-10]
                    try:
                        await asyncio.wait_for(stop.wait(), 1)
                    except TimeoutError:
                        pass

            print("READY " + json.dumps(setup), file=sys.stderr, flush=True)
            workers = [
                asyncio.create_task(heartbeats()),
                asyncio.create_task(paced(args.task_rate, submit)),
                asyncio.create_task(paced(args.llm_rate, llm)),
                asyncio.create_task(paced(args.log_rate, node_log)),
                asyncio.create_task(report()),
            ]
            # Runs until the caller closes stdin (after its grace period), at most
            # the run plus one hour.
            try:
                await asyncio.wait_for(asyncio.to_thread(sys.stdin.read), args.seconds + 3600)
            except TimeoutError:
                pass
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
            final = snapshot()
            final["task_ids"] = task_ids
        for node in nodes:
            node.closing = True
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
        return final

    result = asyncio.run(run())
    print(json.dumps(result), flush=True)


# =====================================================================================
# Driver
# =====================================================================================
class Probe:
    """Reads the hub's process, database and Redis from outside."""

    def __init__(self, hub: Any, database_url: str, redis_url: str | None) -> None:
        self.hub = hub
        self.pid = hub.process.pid
        self.database_url = database_url
        self.redis_url = redis_url
        self._redis = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url)
        self._log_offset = 0
        self.hub_errors = 0
        self.hub_error_sample: list[str] = []

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def query(self, sql: str) -> list[tuple]:
        if self.database_url.startswith("sqlite"):
            path = self.database_url.split("sqlite:///", 1)[1]
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.database_url, connect_timeout=10) as conn:
            return conn.execute(sql).fetchall()

    def db_connections(self) -> str | int:
        if self.database_url.startswith("sqlite"):
            return "n/a"
        import psycopg

        from tests.e2e.harness import PG_ADMIN_URL

        name = self.database_url.rsplit("/", 1)[1]
        # Connections are short-lived (CONN_MAX_AGE=0): the highest of 10 reads 50 ms apart.
        # Our own admin connection is to another database, so it is not counted.
        highest = 0
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=10) as conn:
            for _ in range(10):
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,))
                highest = max(highest, row.fetchone()[0])
                time.sleep(0.05)
        return highest

    def redis_keys(self) -> str | int:
        return "n/a" if self._redis is None else int(self._redis.dbsize())

    def redis_key_kinds(self) -> dict[str, int]:
        if self._redis is None:
            return {}
        kinds: dict[str, int] = {}
        for key in itertools.islice(self._redis.scan_iter(count=1000), 100000):
            text = key.decode(errors="replace")
            kind = re.sub(r"[0-9a-f]{8,}|\d+", "*", text)[:60]
            kinds[kind] = kinds.get(kind, 0) + 1
        return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:8])

    def scan_log(self) -> None:
        with open(self.hub.log_path, errors="replace") as log:
            log.seek(self._log_offset)
            text = log.read()
            self._log_offset = log.tell()
        for line in text.splitlines():
            if " ERROR " in line or line.startswith("Traceback") or "Traceback (most recent" in line:
                self.hub_errors += 1
                if len(self.hub_error_sample) < 5:
                    self.hub_error_sample.append(line[:300])

    def rows(self) -> dict[str, Any]:
        counts = {
            "nodelog": self.query("SELECT count(*) FROM nodes_nodelog")[0][0],
            "nodelog_max_per_node": self.query(
                "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM nodes_nodelog GROUP BY node_id) x"
            )[0][0],
            "llmlog": self.query("SELECT count(*) FROM llmproxy_llmrequestlog")[0][0],
            "online": self.query("SELECT count(*) FROM nodes_node WHERE status = 'online'")[0][0],
        }
        tasks = dict(self.query("SELECT status, count(*) FROM nodes_task GROUP BY status"))
        counts["tasks"] = sum(tasks.values())
        counts["task_status"] = tasks
        return counts


def sample(probe: Probe, started: float, stats_file: Path) -> dict[str, Any]:
    probe.scan_log()
    load = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    row = {
        "t_s": time.monotonic() - started,
        "rss_mb": probe.rss_mb(),
        "fds": probe.fds(),
        "db_conns": probe.db_connections(),
        "redis_keys": probe.redis_keys(),
        "hub_errors": probe.hub_errors,
        "load": load,
    }
    row.update(probe.rows())
    return row


def load_errors(load: dict[str, Any]) -> int:
    return (
        load.get("unexpected_frames", 0)
        + load.get("refused", 0)
        + load.get("closed_by_hub", 0)
        + load.get("submit_errors", 0)
        + load.get("llm_failed", 0)
        + load.get("heartbeat_failed", 0)
        + load.get("heartbeat_late", 0)
        + load.get("setup", {}).get("connect_errors", 0)
        + load.get("setup", {}).get("register_errors", 0)
    )


def render(samples: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for s in samples:
        load = s["load"]
        status = s["task_status"]
        rows.append(
            [
                f"{int(s['t_s']) // 60}:{int(s['t_s']) % 60:02d}",
                f"{s['rss_mb']:.0f}",
                s["fds"],
                s["db_conns"],
                s["redis_keys"],
                s["online"],
                f"{s['nodelog']} (≤{s['nodelog_max_per_node']}/node)",
                s["llmlog"],
                s["tasks"],
                load.get("tasks_submitted", 0),
                status.get("succeeded", 0),
                sum(v for k, v in status.items() if k not in FINAL),
                f"{load.get('llm_ok', 0)}/{load.get('llm_failed', 0)}",
                load_errors(load),
                s["hub_errors"],
            ]
        )
    return rows


def slope_per_min(samples: list[dict[str, Any]], key: str) -> float:
    """Least-squares slope of ``key`` over time, per minute."""
    points = [(s["t_s"] / 60, float(s[key])) for s in samples]
    if len(points) < 2:
        return 0.0
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    den = sum((p[0] - mx) ** 2 for p in points)
    return 0.0 if den == 0 else sum((p[0] - mx) * (p[1] - my) for p in points) / den


LABELS = {True: "PASS", False: "FAIL", None: "FINDING (reported, not a failure)"}


def verdicts(
    args: argparse.Namespace, samples: list[dict[str, Any]], final: dict[str, Any]
) -> list[tuple[str, bool | None, str]]:
    run_s = args.minutes * 60
    steady = [s for s in samples if s["t_s"] >= 0.2 * run_s and s["t_s"] <= run_s + 1] or samples[-2:]
    ref = steady[0]
    out: list[tuple[str, bool | None, str]] = []

    rss = [s["rss_mb"] for s in steady]
    lo, hi = min(rss) / ref["rss_mb"] - 1, max(rss) / ref["rss_mb"] - 1
    out.append(
        (
            "RSS flat within ±10 % after warm-up",
            lo >= -0.10 and hi <= 0.10,
            f"ref {ref['rss_mb']:.0f} MB at {ref['t_s'] / 60:.1f} min, range {lo:+.1%} … {hi:+.1%}, "
            f"slope {slope_per_min(steady, 'rss_mb'):+.2f} MB/min",
        )
    )
    fds = [s["fds"] for s in steady]
    fd_ok = max(fds) <= ref["fds"] * 1.05 + 10 and min(fds) >= ref["fds"] * 0.95 - 10
    out.append(
        (
            "open fds flat (±5 % + 10)",
            fd_ok,
            f"ref {ref['fds']}, range {min(fds)} … {max(fds)}, end of run {samples[-1]['fds']}",
        )
    )
    if args.backend == "services":
        conns = [s["db_conns"] for s in samples]
        out.append(
            (
                f"database connections bounded (≤ {args.max_db_conns})",
                max(conns) <= args.max_db_conns,
                f"max {max(conns)}, last {conns[-1]}",
            )
        )
        # The hub's Redis keys are per-node quota keys with TTLs (a bucket hash: refill
        # time + 60 s = 180 s with the default quota; a stream-slot set: 2 leases) plus
        # channel-layer groups: bounded by the node count, and level once the TTLs
        # turn over. A leak (keys without a TTL, per request) grows linearly, so the
        # last third of the run must not exceed the middle third by more than 10 % + 10.
        keys = [s["redis_keys"] for s in samples]
        middle = [s["redis_keys"] for s in samples if run_s / 3 <= s["t_s"] < 2 * run_s / 3] or keys
        last = [s["redis_keys"] for s in samples if s["t_s"] >= 2 * run_s / 3] or keys[-1:]
        bound = 2 * args.nodes + 50
        out.append(
            (
                f"Redis keys bounded (≤ 2 × nodes + 50 = {bound}), last third ≤ middle third +10 % + 10",
                max(keys) <= bound and max(last) <= max(middle) * 1.1 + 10,
                f"max {max(keys)}; middle third {min(middle)} … {max(middle)}, "
                f"last third {min(last)} … {max(last)}; kinds at end: {final.get('redis_kinds')}",
            )
        )
    else:
        out.append(("database connections bounded", True, "n/a on SQLite (a file; no server connections)"))
        out.append(("Redis keys not growing", True, "n/a (in-memory channel layer, database quota limiter)"))

    # NodeLog: capped per node by the hub's prune (every 60 s in the sweep).
    per_node = max(s["nodelog_max_per_node"] for s in steady)
    inflow = args.log_rate / max(1, min(args.log_nodes, args.nodes)) * 75  # lines per log node between prunes
    cap_ok = per_node <= args.log_cap + inflow + 5
    out.append(
        (
            f"NodeLog capped per node (cap {args.log_cap} + ≤75 s of inflow)",
            cap_ok,
            f"max rows per node {per_node}; total {samples[0]['nodelog']} → {samples[-1]['nodelog']} "
            f"({slope_per_min(steady, 'nodelog'):+.0f} rows/min after warm-up)",
        )
    )
    llm_rate = slope_per_min(steady, "llmlog")
    task_rate = slope_per_min(steady, "tasks")
    out.append(
        (
            "LLMRequestLog retention",
            None,
            f"grows {llm_rate:.0f} rows/min with traffic; rows older than "
            "APEXBRIDGE_LLM_LOG_RETENTION_DAYS (default 30) are pruned by the sweep",
        )
    )
    out.append(
        (
            "Task retention",
            None,
            f"grows {task_rate:.0f} rows/min with traffic; finished tasks older than "
            "APEXBRIDGE_TASK_RETENTION_DAYS (default 30) are pruned by the sweep",
        )
    )
    status = final["rows"]["task_status"]
    lost = sum(v for k, v in status.items() if k not in FINAL)
    not_ok = sum(v for k, v in status.items() if k in FINAL and k != "succeeded")
    submitted = final["load"].get("tasks_submitted", 0)
    out.append(
        (
            "tasks: none lost, all succeeded",
            lost == 0 and not_ok == 0 and status.get("succeeded", 0) == submitted and submitted > 0,
            f"submitted {submitted}, succeeded {status.get('succeeded', 0)}, other final {not_ok}, "
            f"lost (unfinished after {args.grace:.0f} s grace) {lost}",
        )
    )
    load = final["load"]
    errors = load_errors(load) + final["hub_errors"]
    detail = (
        f"load: unexpected frames {load.get('unexpected_frames')}, refused {load.get('refused')}, "
        f"closed by hub {load.get('closed_by_hub')}, submit errors {load.get('submit_errors')}, "
        f"LLM failed {load.get('llm_failed')}, heartbeat failed {load.get('heartbeat_failed')}, "
        f"heartbeats unanswered > 10 s {load.get('heartbeat_late')}; "
        f"hub log ERROR/Traceback lines {final['hub_errors']}"
    )
    samples_text = [
        *load.get("unexpected_sample", []),
        *load.get("refused_sample", []),
        *load.get("closed_sample", []),
        *load.get("submit_error_sample", []),
        *load.get("llm_failed_sample", []),
        *final.get("hub_error_sample", []),
    ]
    if samples_text:
        detail += "; samples: " + " | ".join(samples_text[:6])
    out.append(("errors 0", errors == 0, detail))
    offline = [s for s in steady if s["online"] < args.nodes]
    out.append(
        (
            "all nodes stay online",
            not offline,
            f"online min {min(s['online'] for s in steady)}/{args.nodes}",
        )
    )
    return out


def driver_main(args: argparse.Namespace) -> int:
    from common import LOAD_CPUS, PYTHON, Bench, machine_header, print_table

    bench = Bench()
    upstream = subprocess.Popen(
        [PYTHON, str(BENCH / "llm_upstream.py"), "--chunks", str(args.chunks)],
        stdout=subprocess.PIPE,
        text=True,
    )
    load = None
    our_redis = None
    try:
        if LOAD_CPUS:
            os.sched_setaffinity(upstream.pid, LOAD_CPUS)
        api_base = f"http://127.0.0.1:{int(upstream.stdout.readline())}/v1"
        if args.backend == "services":
            import redis

            from tests.e2e.harness import REDIS_TEST_URL

            # A Redis database of its own, not one of the test workers' (1–15 from 1 up),
            # which the e2e harness empties: refuse rather than empty someone's data.
            redis_url = f"{REDIS_TEST_URL}/{args.redis_db}"
            if redis.Redis.from_url(redis_url).dbsize():
                raise SystemExit(f"{redis_url} is not empty: pick another --redis-db")
            our_redis = redis_url
            database_url = bench.databases.postgres_url()
        else:
            database_url = bench.databases.sqlite_url()
            redis_url = None
        interval = args.heartbeat_ms
        hub = bench.hub(
            args.backend,
            database_url=database_url,
            redis_url=redis_url,
            env={
                "APEXBRIDGE_HEARTBEAT_INTERVAL_MS": str(interval),
                "APEXBRIDGE_HEARTBEAT_TIMEOUT_MS": str(3 * interval),
                "APEXBRIDGE_NODE_LOG_CAP": str(args.log_cap),
                "APEXBRIDGE_LLM_MODEL": "openai/soak",
                "APEXBRIDGE_LLM_API_BASE": api_base,
                "APEXBRIDGE_LLM_API_KEY": "sk-soak",
            },
        )
        probe = Probe(hub, database_url, redis_url)
        token = hub.staff_token()
        stats_file = bench.workdir / "soak-load.json"
        print(
            f"soak: hub pid {hub.process.pid} on {hub.http_url} ({args.backend}); "
            f"{args.nodes} nodes, heartbeat every {interval} ms; log {hub.log_path}",
            file=sys.stderr,
            flush=True,
        )
        load = subprocess.Popen(
            [
                PYTHON,
                str(Path(__file__).resolve()),
                "--load-process",
                "--url",
                hub.node_url(),
                "--http",
                hub.http_url,
                "--token",
                token,
                "--nodes",
                str(args.nodes),
                "--seconds",
                str(args.minutes * 60),
                "--heartbeat-ms",
                str(interval),
                "--task-rate",
                str(args.task_rate),
                "--llm-rate",
                str(args.llm_rate),
                "--stream-every",
                str(args.stream_every),
                "--log-rate",
                str(args.log_rate),
                "--log-nodes",
                str(args.log_nodes),
                "--stats-file",
                str(stats_file),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if LOAD_CPUS:
            try:
                os.sched_setaffinity(load.pid, LOAD_CPUS)
            except OSError:
                pass
        setup_deadline = time.monotonic() + 600
        while True:
            line = load.stderr.readline()
            if not line or time.monotonic() > setup_deadline:
                raise RuntimeError(
                    f"load process failed before READY (rc {load.poll()}): {line}{load.stderr.read()[-3000:]}"
                )
            if line.startswith("READY "):
                setup = json.loads(line[6:])
                break
        print(f"soak: nodes up {setup}", file=sys.stderr, flush=True)
        started = time.monotonic()
        samples: list[dict[str, Any]] = []
        run_s = args.minutes * 60
        next_at = started
        while time.monotonic() < started + run_s:
            if load.poll() is not None:
                raise RuntimeError(
                    f"load process exited early (rc {load.returncode}): {load.stderr.read()[-3000:]}"
                )
            if time.monotonic() >= next_at:
                samples.append(sample(probe, started, stats_file))
                s = samples[-1]
                print(
                    f"soak: {s['t_s'] / 60:5.1f} min rss {s['rss_mb']:.0f} MB fds {s['fds']} "
                    f"tasks {s['tasks']} llm {s['llmlog']} errors {load_errors(s['load'])}/{s['hub_errors']}",
                    file=sys.stderr,
                    flush=True,
                )
                next_at += args.sample
            time.sleep(min(1.0, max(0.05, next_at - time.monotonic())))
        samples.append(sample(probe, started, stats_file))
        # Grace: submission stopped; wait for the tasks still queued or assigned.
        grace_end = time.monotonic() + args.grace
        while time.monotonic() < grace_end:
            rows = probe.rows()
            if (
                not any(k not in FINAL for k in rows["task_status"])
                and json.loads(stats_file.read_text()).get("submitting") is False
            ):
                break
            time.sleep(1)
        time.sleep(2)
        end_sample = sample(probe, started, stats_file)
        stdout, stderr = load.communicate(input="", timeout=300)
        if load.returncode != 0:
            raise RuntimeError(f"load process failed ({load.returncode}):\n{stderr[-3000:]}")
        final_load = json.loads(stdout.strip().splitlines()[-1])
        final_load.pop("task_ids", None)
        time.sleep(2)
        probe.scan_log()  # errors caused by the nodes' disconnects count too
        end_sample["hub_errors"] = probe.hub_errors
        end_sample["load"] = final_load
        samples.append(end_sample)
        final = {
            "rows": end_sample,
            "load": final_load,
            "hub_errors": probe.hub_errors,
            "hub_error_sample": probe.hub_error_sample,
            "redis_kinds": probe.redis_key_kinds(),
        }
        columns = [
            "m:ss",
            "RSS MB",
            "fds",
            "DB conns",
            "Redis keys",
            "online",
            "NodeLog rows",
            "LLMRequestLog",
            "Task rows",
            "submitted",
            "succeeded",
            "unfinished",
            "LLM ok/failed",
            "load errors",
            "hub errors",
        ]
        rows = render(samples)
        rows[-2][0] = f"{rows[-2][0]} (end)"
        rows[-1][0] = f"{rows[-1][0]} (+grace)"
        results = verdicts(args, samples, final)
        fl = final_load
        notes = [
            f"{args.nodes} nodes heartbeating every {interval / 1000:g} s "
            f"({args.nodes * 1000 / interval:.0f}/s), tasks {args.task_rate:g}/s via POST /api/tasks, "
            f"LLM {args.llm_rate:g}/s (1 in {args.stream_every} streaming, {args.chunks} chunks), "
            f"node_log {args.log_rate:g}/s from {args.log_nodes} nodes "
            f"(APEXBRIDGE_NODE_LOG_CAP={args.log_cap}); {args.minutes:g} min, sampled every "
            f"{args.sample:g} s; warm-up = first 20 %; grace {args.grace:g} s.",
            f"load: {fl.get('heartbeats_sent')} heartbeats sent, {fl.get('heartbeat_acks')} acked; "
            f"{fl.get('task_results_acked')} task results acked; LLM ok {fl.get('llm_ok')} "
            f"({fl.get('llm_stream_ok')} streaming), p50 {fl.get('llm_p50_ms') or 0:.0f} ms, "
            f"p99 {fl.get('llm_p99_ms') or 0:.0f} ms; node_log lines sent {fl.get('node_logs_sent')}.",
            "Verdicts:",
            *[f"- {LABELS[ok]} {name}: {detail}" for name, ok, detail in results],
        ]
        print_table(
            machine_header(f"soak — {args.backend}, {args.nodes} nodes, {args.minutes:g} min"),
            columns,
            rows,
            notes,
        )
        return 1 if any(ok is False for _, ok, _ in results) else 0
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait(10)
        upstream.kill()
        upstream.wait(10)
        bench.close()
        if our_redis:
            import redis

            redis.Redis.from_url(our_redis).flushdb()  # the hub's keys of this run only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--backend", choices=["embedded", "services"], default="embedded")
    parser.add_argument(
        "--heartbeat-ms", type=int, default=5000, help="hub heartbeat interval (timeout = 3×)"
    )
    parser.add_argument("--task-rate", type=float, default=5.0, help="tasks/s through POST /api/tasks")
    parser.add_argument("--llm-rate", type=float, default=2.0, help="llm_request/s over all nodes")
    parser.add_argument("--stream-every", type=int, default=3, help="every Nth LLM request streams")
    parser.add_argument("--chunks", type=int, default=10, help="chunks per upstream answer")
    parser.add_argument("--log-rate", type=float, default=2.0, help="node_log lines/s")
    parser.add_argument("--log-nodes", type=int, default=10, help="nodes that send node_log")
    parser.add_argument("--log-cap", type=int, default=50, help="APEXBRIDGE_NODE_LOG_CAP of the hub")
    parser.add_argument("--sample", type=float, default=30, help="seconds between samples")
    parser.add_argument("--grace", type=float, default=60, help="seconds for tasks to finish after the run")
    parser.add_argument("--max-db-conns", type=int, default=60)
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database (services; must be empty)")
    # The load process (started by the driver).
    parser.add_argument("--load-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--http", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stats-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_process:
        load_main(args)
        return
    sys.exit(driver_main(args))


if __name__ == "__main__":
    main()
