"""LLM proxy overhead: the same completion through the hub (``llm_request`` over a
node socket) and bare (``litellm.acompletion`` in the load process), against one
loopback OpenAI-compatible upstream (bench/llm_upstream.py), non-streaming and
streaming.

    .venv/bin/python bench/bench_llm.py --requests 200 --chunks 50 --runs 3

Overhead = hub p50 - bare p50; per chunk = (streaming overhead - non-streaming
overhead) / chunks forwarded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from common import LOAD_CPUS, PYTHON, ROOT, Bench, machine_header, median_spread, print_table, run_loadgen

# The hub's LLM settings for a bench (plus APEXBRIDGE_LLM_API_BASE: the upstream's);
# quotas high enough never to refuse.
LLM_ENV = {
    "APEXBRIDGE_LLM_MODEL": "openai/bench",
    "APEXBRIDGE_LLM_API_KEY": "sk-bench",
    "APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE": "1000000",
    "APEXBRIDGE_QUOTA_MAX_TOKENS_PER_DAY": "1000000000",
}


def start_upstream(chunks: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [PYTHON, str(ROOT / "bench" / "llm_upstream.py"), "--chunks", str(chunks)],
        stdout=subprocess.PIPE,
        text=True,
    )
    if LOAD_CPUS:
        import os

        os.sched_setaffinity(process.pid, LOAD_CPUS)
    port = int(process.stdout.readline())
    return process, f"http://127.0.0.1:{port}/v1"


def measure(bench: Bench, backend: str, requests: int, chunks: int) -> dict:
    upstream, api_base = start_upstream(chunks)
    try:
        hub = bench.hub(
            backend,
            env={**LLM_ENV, "APEXBRIDGE_LLM_API_BASE": api_base},
        )
        return run_loadgen(
            "llm",
            "--url",
            hub.node_url(),
            "--requests",
            str(requests),
            "--upstream",
            api_base,
            "--model",
            LLM_ENV["APEXBRIDGE_LLM_MODEL"],
            "--chunks",
            str(chunks),
        )
    finally:
        bench.stop_hubs()
        upstream.kill()
        upstream.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--backend", choices=["embedded", "services"], default="embedded")
    args = parser.parse_args()
    bench = Bench()
    try:
        runs = [measure(bench, args.backend, args.requests, args.chunks) for _ in range(args.runs)]
    finally:
        bench.close()
    rows = []
    plain_overhead = [r["plain"]["hub"]["p50_ms"] - r["plain"]["bare"]["p50_ms"] for r in runs]
    for label in ("plain", "stream"):
        hub = [r[label]["hub"]["p50_ms"] for r in runs]
        bare = [r[label]["bare"]["p50_ms"] for r in runs]
        overhead = [h - b for h, b in zip(hub, bare, strict=True)]
        frames = [max(1, r[label]["hub_stream_frames"] - 1) for r in runs]  # minus the done frame
        rows.append(
            [
                "non-streaming" if label == "plain" else f"streaming ({args.chunks} chunks)",
                median_spread(bare, 2),
                median_spread(hub, 2),
                median_spread([r[label]["hub"]["p99_ms"] for r in runs], 2),
                median_spread(overhead, 2),
                # What streaming adds over the fixed per-request overhead, per forwarded chunk.
                median_spread(
                    [(o - p) / f for o, p, f in zip(overhead, plain_overhead, frames, strict=True)], 3
                )
                if label == "stream"
                else "",
            ]
        )
    print_table(
        machine_header(
            f"bench_llm — LLM proxy overhead ({args.backend}), {args.requests} requests per run, "
            f"{args.runs} runs"
        ),
        [
            "request",
            "bare p50 ms",
            "through hub p50 ms",
            "through hub p99 ms",
            "overhead p50 ms",
            "overhead per chunk ms",
        ],
        rows,
        [
            "bare: litellm.acompletion in the load process; through hub: llm_request -> final llm_response.",
            "One loopback upstream (bench/llm_upstream.py), requests interleaved; median (min–max).",
        ],
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
