"""Tools: plain Python callables registered by name, and how a task calls one.

A tool is called with the task's ``toolArgs`` as keyword arguments (``raw_args=True``:
as one positional argument instead). Coroutine functions run on the event loop and can
be cancelled; plain functions run in a daemon thread, so a slow one never blocks the
connection (a cancelled thread cannot be stopped, only abandoned).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ToolError


@dataclass(frozen=True)
class Tool:
    name: str
    function: Callable[..., Any]
    raw_args: bool = False
    description: str | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    def bind(self, tool_args: Any) -> inspect.BoundArguments:
        """The call's arguments; a ``ToolError`` (code ``invalid_args``) when they do not fit."""
        signature = inspect.signature(self.function)
        try:
            if self.raw_args:
                return signature.bind(tool_args)
            if tool_args is None:
                tool_args = {}
            if not isinstance(tool_args, dict):
                raise ToolError(f"tool {self.name!r} takes an object of named arguments", code="invalid_args")
            return signature.bind(**tool_args)
        except TypeError as exc:
            raise ToolError(f"bad arguments for tool {self.name!r}: {exc}", code="invalid_args") from None

    async def call(self, tool_args: Any) -> Any:
        bound = self.bind(tool_args)
        if self.is_async:
            return await self.function(*bound.args, **bound.kwargs)
        result = await run_in_daemon_thread(self.function, *bound.args, **bound.kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result


async def run_in_daemon_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Like ``asyncio.to_thread``, but the thread is a daemon: a sync tool that is still
    running when the node exits (cancelled, or past the shutdown grace) does not keep the
    process alive."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = context.run(function, *args, **kwargs), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop is gone: nobody is waiting for this result any more

    name = getattr(function, "__name__", "tool")
    threading.Thread(target=target, name=f"tool-{name}", daemon=True).start()
    return await future
