"""The node side of the hub's LLM proxy (PROTOCOL §4): one ``llm_request`` per call,
replies matched by ``requestId``, stream frames aggregated, failures raised as typed
``LLMError`` subclasses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import LLMCancelled, LLMError, LLMTimeout, llm_error_from
from .wire import llm_options

if TYPE_CHECKING:
    from .node import Node

# Put into a request's queue by the node when the connection drops.
CONNECTION_LOST = "connection_lost"


@dataclass
class LLMResult:
    content: str
    request_id: str
    model: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    stream: bool = False

    def __str__(self) -> str:
        return self.content


def normalise_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, list | tuple) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a string or a list of {'role', 'content'} dicts")
    return list(messages)


class LLMStream:
    """``async for chunk in node.llm_stream(...)`` yields text chunks as the hub forwards
    them; afterwards ``content``, ``usage`` and ``result`` hold the whole answer.

    Leaving the loop early cancels the request at the hub (``llm_cancel``)."""

    def __init__(
        self,
        node: Node,
        messages: Any,
        model: str | None,
        options: dict[str, Any],
        *,
        stream: bool,
        timeout: float | None,
    ) -> None:
        self._node = node
        self.request_id = f"r-{uuid.uuid4().hex}"
        self._stream = stream
        self._timeout = timeout
        wire_options = llm_options(options)
        wire_options["stream"] = stream
        self._request: dict[str, Any] = {
            "requestId": self.request_id,
            "messages": normalise_messages(messages),
            "options": wire_options,
        }
        if model:
            self._request["model"] = model
        self._chunks: list[str] = []
        self.usage: dict[str, Any] = {}
        self.result: LLMResult | None = None
        self._started = False

    @property
    def content(self) -> str:
        return self.result.content if self.result else "".join(self._chunks)

    def __aiter__(self) -> AsyncIterator[str]:
        if self._started:
            raise RuntimeError("an LLM stream can be iterated only once")
        self._started = True
        return self._frames()

    async def collect(self) -> LLMResult:
        async for _chunk in self:
            pass
        assert self.result is not None
        return self.result

    async def cancel(self) -> None:
        await self._node.llm_cancel(self.request_id)

    async def _frames(self) -> AsyncIterator[str]:
        queue = await self._node._llm_open(self._request)
        finished = False
        try:
            while True:
                try:
                    message_type, data = await asyncio.wait_for(queue.get(), self._timeout)
                except TimeoutError:
                    raise LLMTimeout(
                        "timeout", f"no answer from the hub within {self._timeout:.0f}s; request cancelled"
                    ) from None
                if message_type == CONNECTION_LOST:
                    finished = True
                    raise llm_error_from(
                        {"code": "connection_lost", "message": "connection to the hub was lost"}
                    )
                if message_type == "llm_response_stream":
                    if data.get("done"):
                        if isinstance(data.get("usage"), dict):
                            self.usage = data["usage"]
                        continue
                    chunk = data.get("chunk")
                    if not chunk and isinstance(data.get("delta"), dict):
                        chunk = data["delta"].get("content")
                    if isinstance(chunk, str) and chunk:
                        self._chunks.append(chunk)
                        yield chunk
                    continue
                finished = True
                if not data.get("success"):
                    raise llm_error_from(data.get("error"))
                content = data.get("content")
                if not isinstance(content, str):
                    content = "".join(self._chunks)
                if isinstance(data.get("usage"), dict):
                    self.usage = data["usage"]
                self.result = LLMResult(
                    content=content,
                    request_id=self.request_id,
                    model=data.get("model"),
                    usage=self.usage,
                    stream=bool(data.get("stream", self._stream)),
                )
                if self._stream and not self._chunks and content:
                    yield content
                return
        finally:
            self._node._llm_close(self.request_id)
            if not finished:
                # Left early (break, cancelled, timed out): free the hub's upstream call.
                await asyncio.shield(self._node._llm_cancel_quietly(self.request_id))


__all__ = ["LLMCancelled", "LLMError", "LLMResult", "LLMStream"]
