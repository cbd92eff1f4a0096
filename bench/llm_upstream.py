"""A minimal OpenAI-compatible upstream for bench_llm: ``POST /v1/chat/completions``
answers at once, plain JSON or SSE with ``--chunks`` content chunks. Prints its
port on stdout, then serves until killed."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

USAGE = {"prompt_tokens": 9, "completion_tokens": 16, "total_tokens": 25}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=50)
    args = parser.parse_args()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "chatcmpl-bench", "created": int(time.time()), "model": body.get("model", "bench")}
        if not body.get("stream"):
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "usage": USAGE,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "tok " * args.chunks},
                        }
                    ],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        def sse(delta: dict | None, finish: str | None = None, usage: bool = False) -> bytes:
            payload = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if usage:
                payload["usage"] = USAGE
            return f"data: {json.dumps(payload)}\n\n".encode()

        await response.write(sse({"role": "assistant", "content": ""}))
        for _ in range(args.chunks):
            await response.write(sse({"content": "tok "}))
        await response.write(sse({}, finish="stop"))
        await response.write(sse(None, usage=True))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)

    runner = web.AppRunner(app, access_log=None)

    async def serve() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
