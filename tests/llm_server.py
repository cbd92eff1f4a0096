"""A loopback OpenAI-compatible HTTP server for the LLM proxy tests.

It serves ``POST /v1/chat/completions`` (plain JSON and SSE streaming) on
127.0.0.1 at a random port, in its own thread and event loop, so sync and async
tests can share it. What it does is chosen by the requested model name (the part
after the provider prefix):

| model            | reply                                                             |
|------------------|-------------------------------------------------------------------|
| anything else    | "Hello from loopback" (stream: 4 chunks), usage when asked for    |
| ``no-usage``     | same, but never any ``usage``                                     |
| ``slow``         | stream: one chunk every 50 ms for ~30 s; plain: waits 30 s        |
| ``hang``         | waits 30 s before sending anything (for the hub's time-out)       |
| ``garbage``      | 200 with a body that is not JSON (a broken upstream)              |
| ``rate-limited`` | 429                                                               |
| ``bad-key``      | 401                                                               |
| ``too-long``     | 400 ``context_length_exceeded``                                   |
| ``bad-request``  | 400 ``invalid_request_error``                                     |
| ``broken``       | 500                                                               |
| ``cut``          | stream: two chunks, then the connection is dropped                |

Every request is recorded (path, headers, JSON body), and the server notes when a
client goes away before the reply was finished (``disconnects``), keyed by the
``content`` of the request's last message, which tests make unique.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

REPLY_CHUNKS = ["Hel", "lo", " from", " loopback"]
REPLY_TEXT = "".join(REPLY_CHUNKS)
PROMPT_TOKENS = 9
COMPLETION_TOKENS = 4
SLOW_SECONDS = 30.0


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def marker(self) -> str:
        messages = self.body.get("messages") or [{}]
        content = messages[-1].get("content")
        return content if isinstance(content, str) else json.dumps(content)


@dataclass
class LoopbackLLMServer:
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    open_streams: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> LoopbackLLMServer:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("loopback LLM server did not start")
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def api_base(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    # --- what tests look at ----------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.disconnects.clear()

    def requests_for(self, marker: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.marker == marker]

    def saw_disconnect(self, marker: str) -> bool:
        with self._lock:
            return marker in self.disconnects

    def wait_for_disconnect(self, marker: str, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.saw_disconnect(marker):
                return True
            time.sleep(0.02)
        return False

    def wait_for_request(self, marker: str, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.requests_for(marker):
                return True
            time.sleep(0.02)
        return False

    # --- the endpoint ----------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        recorded = RecordedRequest(request.path, dict(request.headers), body)
        with self._lock:
            self.requests.append(recorded)
        model = str(body.get("model", "")).split("/")[-1]
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        if model in ERROR_REPLIES:
            status, error = ERROR_REPLIES[model]
            return web.json_response({"error": error}, status=status)
        if model == "garbage":  # a broken upstream: 200 with a body that is not JSON
            return web.Response(text="<html>\x00 not json {", content_type="application/json")
        if model == "hang" or (model == "slow" and not stream):
            if not await self._wait_or_disconnect(request, recorded, SLOW_SECONDS):
                return web.Response(status=499)  # nobody is listening any more
            return web.json_response(_completion(body, usage=True))
        if not stream:
            return web.json_response(_completion(body, usage=model != "no-usage"))
        return await self._stream(request, recorded, body, model, include_usage and model != "no-usage")

    async def _stream(
        self, request: web.Request, recorded: RecordedRequest, body: dict, model: str, usage: bool
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with self._lock:
            self.open_streams += 1
        try:
            if model == "slow":
                pieces = ["tick "] * int(SLOW_SECONDS / 0.05)
                delay = 0.05
            elif model == "cut":
                pieces, delay = REPLY_CHUNKS[:2], 0.0
            else:
                pieces, delay = REPLY_CHUNKS, 0.0
            for index, piece in enumerate(pieces):
                delta = {"content": piece} if index else {"role": "assistant", "content": piece}
                await response.write(_sse(_chunk(body, delta)))
                if delay:
                    await asyncio.sleep(delay)
            if model == "cut":
                request.transport.close()
                return response
            await response.write(_sse(_chunk(body, {}, finish_reason="stop")))
            if usage:
                await response.write(_sse(_chunk(body, None, usage=True)))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except asyncio.CancelledError:
            with self._lock:
                self.disconnects.append(recorded.marker)
            raise
        except ConnectionError:  # aiohttp's ClientConnectionResetError too
            with self._lock:
                self.disconnects.append(recorded.marker)
        finally:
            with self._lock:
                self.open_streams -= 1
        return response

    async def _wait_or_disconnect(
        self, request: web.Request, recorded: RecordedRequest, seconds: float
    ) -> bool:
        """Wait ``seconds``; False as soon as the client goes away."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                transport = request.transport
                if transport is None or transport.is_closing():
                    with self._lock:
                        self.disconnects.append(recorded.marker)
                    return False
                await asyncio.sleep(0.02)
            return True
        except asyncio.CancelledError:
            with self._lock:
                self.disconnects.append(recorded.marker)
            raise


ERROR_REPLIES: dict[str, tuple[int, dict[str, Any]]] = {
    "rate-limited": (
        429,
        {"message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"},
    ),
    "bad-key": (
        401,
        {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"},
    ),
    "too-long": (
        400,
        {
            "message": "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
    ),
    "bad-request": (
        400,
        {"message": "Invalid value for 'temperature'", "type": "invalid_request_error", "code": None},
    ),
    "broken": (500, {"message": "The server had an error", "type": "server_error", "code": None}),
}


def _usage() -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": COMPLETION_TOKENS,
        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
    }


def _completion(body: dict, *, usage: bool) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY_TEXT},
                "finish_reason": "stop",
            }
        ],
    }
    if usage:
        reply["usage"] = _usage()
    return reply


def _chunk(body: dict, delta: dict | None, *, finish_reason: str | None = None, usage: bool = False):
    chunk: dict[str, Any] = {
        "id": "chatcmpl-loopback",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage:
        chunk["usage"] = _usage()
    return chunk


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()
