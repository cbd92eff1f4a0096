"""Load generator of the benchmarks: many simulated nodes in one asyncio process.

Run by the ``bench_*.py`` scripts as a separate process (pinned to its own core):

    loadgen.py nodes      --url U [--url U2 …] --nodes N
    loadgen.py heartbeats --url U … --nodes N --rate R --seconds S
    loadgen.py tasks      --url U … --http H … --token T --nodes N --tasks K
    loadgen.py llm        --url U --requests K --upstream BASE --model M

It prints one JSON object (its measurements) as the last line of stdout. ``--hold``
makes it print ``READY <json>`` on stderr when its nodes are up and keep them
connected until stdin closes, so the caller can measure the hub meanwhile.
Nodes are spread round robin over the ``--url`` hubs.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import websockets


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def latency_summary(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": max(ms) if ms else None}


class SimNode:
    """One simulated node: a socket, a reader task, and what it measured."""

    def __init__(
        self, url: str, node_id: str, capabilities: list[str] | None = None, max_concurrent: int = 1000
    ) -> None:
        self.url = url
        self.node_id = node_id
        self.capabilities = capabilities or []
        self.max_concurrent = max_concurrent
        self.ws: Any = None
        self.reader: asyncio.Task | None = None
        self.registered: asyncio.Future | None = None
        self.heartbeat_sent: deque[float] = deque()
        self.heartbeat_latencies: list[float] = []
        self.heartbeat_errors = 0
        self.frames: dict[str, int] = {}
        self.waiters: dict[str, asyncio.Future] = {}  # requestId -> future (LLM)
        self.stream_chunks: dict[str, list[float]] = {}
        self.on_task = None  # callback(data) for task_assign
        self.task_acks = 0
        self.closed = ""

    async def connect(self) -> None:
        self.ws = await websockets.connect(
            self.url, open_timeout=120, close_timeout=5, ping_interval=None, max_size=None, compression=None
        )
        ack = json.loads(await asyncio.wait_for(self.ws.recv(), 120))
        if ack.get("type") != "connection_ack":
            raise RuntimeError(f"expected connection_ack, got {ack}")
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                kind = message.get("type")
                data = message.get("data") or {}
                self.frames[kind] = self.frames.get(kind, 0) + 1
                if kind == "heartbeat_ack":
                    sent = self.heartbeat_sent.popleft() if self.heartbeat_sent else None
                    if data.get("success") and sent is not None:
                        self.heartbeat_latencies.append(time.perf_counter() - sent)
                    else:
                        self.heartbeat_errors += 1
                elif kind == "node_registered":
                    if self.registered is not None and not self.registered.done():
                        self.registered.set_result(data)
                elif kind == "task_assign" and self.on_task is not None:
                    await self.on_task(self, data)
                elif kind == "task_result_ack":
                    self.task_acks += 1
                elif kind == "llm_response_stream":
                    self.stream_chunks.setdefault(data.get("requestId"), []).append(time.perf_counter())
                elif kind == "llm_response":
                    waiter = self.waiters.pop(data.get("requestId"), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(data)
        except websockets.ConnectionClosed as exc:
            self.closed = f"{exc}"[:200]
            self.heartbeat_errors += len(self.heartbeat_sent)
            self.heartbeat_sent.clear()

    async def send(self, message_type: str, data: dict[str, Any]) -> None:
        await self.ws.send(json.dumps({"type": message_type, "data": data}))

    async def register(self) -> dict:
        self.registered = asyncio.get_running_loop().create_future()
        await self.send(
            "node_register",
            {
                "nodeId": self.node_id,
                "name": self.node_id,
                "type": "worker",
                "capabilities": self.capabilities,
                "config": {"maxConcurrentTasks": self.max_concurrent},
            },
        )
        return await self.registered

    async def heartbeat(self) -> None:
        if self.closed:
            return
        self.heartbeat_sent.append(time.perf_counter())
        try:
            await self.send("heartbeat", {"nodeId": self.node_id, "stats": {"activeTasks": 0}})
        except websockets.ConnectionClosed as exc:
            # Counted, not fatal: the table reports errors (the hub closed the socket).
            self.closed = f"{exc}"[:200]
            self.heartbeat_sent.clear()
            self.heartbeat_errors += 1

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()


async def connect_all(nodes: list[SimNode], concurrency: int) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)
    errors: list[str] = []

    async def one(node: SimNode) -> None:
        async with gate:
            try:
                await node.connect()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in nodes))
    return {
        "connect_s": time.perf_counter() - started,
        "connect_errors": len(errors),
        "connect_error_sample": errors[:3],
    }


async def register_storm(nodes: list[SimNode], timeout_s: float = 600) -> dict[str, Any]:
    """Every connected node sends node_register at once; wall time until the last reply."""
    live = [n for n in nodes if n.ws is not None]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(asyncio.wait_for(n.register(), timeout_s) for n in live), return_exceptions=True
    )
    wall = time.perf_counter() - started
    failed = [r for r in results if isinstance(r, BaseException) or not r.get("success")]
    return {
        "storm_s": wall,
        "registered": len(live) - len(failed),
        "register_errors": len(failed),
        "register_error_sample": [repr(r)[:200] for r in failed[:3]],
    }


def make_nodes(
    urls: list[str],
    count: int,
    prefix: str,
    capabilities: list[str] | None = None,
    max_concurrent: int = 1000,
) -> list[SimNode]:
    tag = uuid.uuid4().hex[:6]
    cycle = itertools.cycle(urls)
    return [SimNode(next(cycle), f"{prefix}-{tag}-{i}", capabilities, max_concurrent) for i in range(count)]


async def hold(result: dict[str, Any], hold_open: bool) -> None:
    if not hold_open:
        return
    print("READY " + json.dumps(result), file=sys.stderr, flush=True)
    await asyncio.to_thread(sys.stdin.read)


# --- modes -----------------------------------------------------------------------------
async def mode_nodes(args) -> dict[str, Any]:
    urls = args.url
    if args.keys_file:  # one per-node key each: URL i carries key i
        keys = Path(args.keys_file).read_text().split()[: args.nodes]
        urls = [f"{args.url[i % len(args.url)].rsplit('=', 1)[0]}={key}" for i, key in enumerate(keys)]
    nodes = make_nodes(urls, args.nodes, "bn")
    result: dict[str, Any] = {"nodes": args.nodes}
    result.update(await connect_all(nodes, args.concurrency))
    result.update(await register_storm(nodes))
    # One heartbeat per node, spread over --spread seconds (a scaled-down heartbeat interval).
    live = [n for n in nodes if n.registered is not None and n.registered.done()]
    interval = args.spread / max(1, len(live))
    started = time.perf_counter()
    for index, node in enumerate(live):
        delay = started + index * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await node.heartbeat()
    await wait_until(
        lambda: sum(len(n.heartbeat_latencies) + n.heartbeat_errors for n in live) >= len(live), 60
    )
    latencies = [x for n in live for x in n.heartbeat_latencies]
    result["heartbeat"] = latency_summary(latencies)
    result["heartbeat_errors"] = sum(n.heartbeat_errors for n in live) + (len(live) - len(latencies))
    # Again, with every row in place (as nodes that come back after a hub restart).
    again = await register_storm(live)
    result["restorm_s"], result["reregister_errors"] = again["storm_s"], again["register_errors"]
    result["error_frames"] = sum(n.frames.get("error", 0) for n in nodes)
    await hold(result, args.hold)
    await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
    return result


async def wait_until(predicate, timeout_s: float) -> bool:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def mode_heartbeats(args) -> dict[str, Any]:
    """--rate R > 0: offered load of R heartbeats/s over the nodes (open loop);
    --rate 0: every node keeps --window heartbeats in flight (closed loop, maximum)."""
    nodes = make_nodes(args.url, args.nodes, "bh")
    result: dict[str, Any] = {"nodes": args.nodes, "rate": args.rate}
    result.update(await connect_all(nodes, args.concurrency))
    result.update(await register_storm(nodes))
    live = [n for n in nodes if n.registered is not None and n.registered.done()]
    # Warm-up, then measure only what was sent inside the window.
    await run_heartbeats(live, args.rate, min(2.0, args.seconds / 3), args.window)
    for node in live:
        node.heartbeat_latencies.clear()
        node.heartbeat_errors = 0
    print("MEASURE", file=sys.stderr, flush=True)
    started = time.perf_counter()
    sent = await run_heartbeats(live, args.rate, args.seconds, args.window)
    wall = time.perf_counter() - started
    latencies = [x for n in live for x in n.heartbeat_latencies]
    result.update(
        heartbeats_sent=sent,
        acks=len(latencies),
        seconds=wall,
        acks_per_s=len(latencies) / wall,
        heartbeat=latency_summary(latencies),
        heartbeat_errors=sum(n.heartbeat_errors for n in live),
        error_frames=sum(n.frames.get("error", 0) for n in nodes),
        closed_by_hub=sum(1 for n in nodes if n.closed),
        closed_sample=[n.closed for n in nodes if n.closed][:3],
    )
    await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
    return result


async def run_heartbeats(nodes: list[SimNode], rate: float, seconds: float, window: int) -> int:
    if not nodes:
        return 0
    sent = 0
    started = time.perf_counter()
    if rate > 0:
        ring = itertools.cycle(nodes)
        while (elapsed := time.perf_counter() - started) < seconds:
            due = int(elapsed * rate) - sent
            for _ in range(due):
                await next(ring).heartbeat()
            sent += max(0, due)
            await asyncio.sleep(0.001)
    else:
        stop = started + seconds

        async def pump(node: SimNode) -> int:
            count = 0
            while time.perf_counter() < stop:
                while len(node.heartbeat_sent) < window:
                    await node.heartbeat()
                    count += 1
                await asyncio.sleep(0.0005)
            return count

        sent = sum(await asyncio.gather(*(pump(n) for n in nodes)))
    # Let the acks of what was sent arrive.
    await wait_until(lambda: all(not n.heartbeat_sent for n in nodes), 30)
    return sent


async def mode_tasks(args) -> dict[str, Any]:
    """Nodes answer every task_assign at once; tasks are submitted through POST /api/tasks."""
    import aiohttp

    # A node takes --max-concurrent tasks at a time (10 by default, 100 in flight over 10
    # nodes): with 1,000 each, the hub handed out 10,000 tasks at once, their results
    # queued in the hub for longer than the 60 s task time-out, and thousands ended
    # timed_out although the nodes had answered (docs/BENCHMARKS.md, Tasks).
    nodes = make_nodes(args.url, args.nodes, "bt", capabilities=["bench"], max_concurrent=args.max_concurrent)
    assigned: dict[str, float] = {}

    async def answer(node: SimNode, data: dict) -> None:
        assigned[data["taskId"]] = time.perf_counter()
        await node.send(
            "task_result",
            {
                "taskId": data["taskId"],
                "nodeId": node.node_id,
                "success": True,
                "result": data.get("toolArgs"),
                "executionTime": 0,
            },
        )

    for node in nodes:
        node.on_task = answer
    result: dict[str, Any] = {"nodes": args.nodes, "tasks": args.tasks}
    result.update(await connect_all(nodes, args.concurrency))
    result.update(await register_storm(nodes))
    beating = asyncio.create_task(keep_alive(nodes))  # a long run outlasts heartbeatTimeout
    headers = {"Authorization": f"Token {args.token}", "Content-Type": "application/json"}
    http = itertools.cycle(args.http)
    connector = aiohttp.TCPConnector(limit=args.http_concurrency * 2)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:

        async def submit(i: int, wait_s: int = 0) -> tuple[int, dict]:
            body = {"toolName": "echo", "toolArgs": {"i": i}, "capability": "bench"}
            url = f"{next(http)}/api/tasks" + (f"?wait={wait_s}" if wait_s else "")
            async with session.post(url, json=body) as response:
                return response.status, await response.json(content_type=None)

        # Sequential round trips through POST /api/tasks?wait=.
        round_trips: list[float] = []
        inside_hub_ms: list[float] = []
        failures = 0
        for i in range(args.sequential):
            started = time.perf_counter()
            status, body = await submit(i, wait_s=10)
            elapsed = time.perf_counter() - started
            task = (body or {}).get("task") or {}
            if status not in (200, 201) or task.get("status") != "succeeded":
                failures += 1
                if failures <= 3:
                    result.setdefault("sequential_error_sample", []).append([status, str(body)[:300]])
                continue
            round_trips.append(elapsed)
            if task.get("finishedAt") and task.get("createdAt"):
                inside_hub_ms.append(task["finishedAt"] - task["createdAt"])
        result["sequential"] = latency_summary(round_trips)
        result["sequential_failures"] = failures
        result["inside_hub"] = {
            "n": len(inside_hub_ms),
            "p50_ms": pct(inside_hub_ms, 50),
            "p99_ms": pct(inside_hub_ms, 99),
        }

        # Throughput: --tasks submitted by --http-concurrency clients; done when every
        # node got its task_result_ack.
        # The ?wait reply can beat the node's task_result_ack: let those arrive first,
        # or the throughput phase counts one of them (completed = tasks + 1).
        await wait_until(lambda: sum(n.task_acks for n in nodes) >= len(round_trips), 5)
        acks_before = sum(n.task_acks for n in nodes)
        counter = itertools.count()
        submit_errors: list[str] = []

        async def worker() -> None:
            while (i := next(counter)) < args.tasks:
                try:
                    status, body = await submit(i)
                    if status not in (200, 201):
                        submit_errors.append(f"{status} {str(body)[:200]}")
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    submit_errors.append(repr(exc)[:200])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.http_concurrency)))
        submitted_s = time.perf_counter() - started
        expected = args.tasks - len(submit_errors)
        await wait_until(lambda: sum(n.task_acks for n in nodes) - acks_before >= expected, 300)
        wall = time.perf_counter() - started
        done = sum(n.task_acks for n in nodes) - acks_before
        result.update(
            throughput_tasks_per_s=done / wall,
            completed=done,
            wall_s=wall,
            submit_s=submitted_s,
            submit_errors=len(submit_errors),
            submit_error_sample=submit_errors[:3],
        )
    beating.cancel()
    await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
    return result


async def keep_alive(nodes: list[SimNode], interval_s: float = 10) -> None:
    """Heartbeat every node now and then, as a real node does between tasks."""
    while True:
        await asyncio.sleep(interval_s)
        for node in nodes:
            await node.heartbeat()


async def mode_llm(args) -> dict[str, Any]:
    """Hub overhead: the same completion through the hub (llm_request) and bare
    (litellm.acompletion from this process) against the same upstream."""
    import litellm

    litellm.suppress_debug_info = True
    node = make_nodes(args.url, 1, "bl")[0]
    await node.connect()
    await node.register()
    messages = [{"role": "user", "content": "benchmark"}]
    result: dict[str, Any] = {"requests": args.requests, "chunks": args.chunks}

    async def through_hub(stream: bool) -> tuple[float, int]:
        request_id = f"r-{uuid.uuid4().hex[:10]}"
        waiter = asyncio.get_running_loop().create_future()
        node.waiters[request_id] = waiter
        started = time.perf_counter()
        await node.send(
            "llm_request",
            {
                "requestId": request_id,
                "nodeId": node.node_id,
                "model": args.model,
                "messages": messages,
                "options": {"stream": stream, "maxTokens": 16},
            },
        )
        reply = await asyncio.wait_for(waiter, 30)
        elapsed = time.perf_counter() - started
        if not reply.get("success"):
            raise RuntimeError(f"llm_request failed: {reply}")
        return elapsed, len(node.stream_chunks.pop(request_id, []))

    async def bare(stream: bool) -> tuple[float, int]:
        started = time.perf_counter()
        kwargs = dict(
            model=args.model,
            messages=messages,
            api_base=args.upstream,
            api_key="sk-bench",
            max_tokens=16,
            num_retries=0,
            max_retries=0,
            timeout=30,
        )
        chunks = 0
        if stream:
            response = await litellm.acompletion(
                stream=True, stream_options={"include_usage": True}, **kwargs
            )
            async for chunk in response:
                if chunk.choices and getattr(chunk.choices[0].delta, "content", None):
                    chunks += 1
        else:
            await litellm.acompletion(**kwargs)
        return time.perf_counter() - started, chunks

    for stream in (False, True):
        label = "stream" if stream else "plain"
        for _ in range(args.warmup):
            await bare(stream)
            await through_hub(stream)
        hub_times: list[float] = []
        bare_times: list[float] = []
        frames = chunks = 0
        # Interleaved so drift in machine load hits both sides alike.
        for _ in range(args.requests):
            elapsed, frames = await through_hub(stream)
            hub_times.append(elapsed)
            elapsed, chunks = await bare(stream)
            bare_times.append(elapsed)
        result[label] = {
            "hub": latency_summary(hub_times),
            "bare": latency_summary(bare_times),
            "hub_stream_frames": frames,
            "bare_chunks": chunks,
        }
    await node.close()
    return result


def main() -> None:
    _raise_fd_limit()
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["nodes", "heartbeats", "tasks", "llm"])
    parser.add_argument("--url", action="append", required=True, help="node WebSocket URL (repeatable)")
    parser.add_argument("--http", action="append", default=[], help="hub HTTP base URL (repeatable)")
    parser.add_argument("--token", default="")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    parser.add_argument("--spread", type=float, default=5.0)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--keys-file", default="", help="nodes mode: one per-node key per line")
    parser.add_argument("--rate", type=float, default=0)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--http-concurrency", type=int, default=32)
    parser.add_argument(
        "--max-concurrent", type=int, default=10, help="tasks mode: maxConcurrentTasks per node"
    )
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--model", default="openai/bench")
    parser.add_argument("--chunks", type=int, default=0)
    args = parser.parse_args()
    modes = {"nodes": mode_nodes, "heartbeats": mode_heartbeats, "tasks": mode_tasks, "llm": mode_llm}
    result = asyncio.run(modes[args.mode](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
