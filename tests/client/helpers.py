"""Small helpers shared by the client tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], object], timeout: float = 10, what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy."""
    async with asyncio.timeout(timeout):
        while True:
            value = condition()
            if value:
                return value
            await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover


def assign(task_id: str, tool: str, args: object = None, *, attempt: int = 1, timeout: int = 60000) -> dict:
    """A ``task_assign`` payload as the hub sends it (PROTOCOL §3.2)."""
    return {
        "taskId": task_id,
        "nodeId": "n1",
        "toolName": tool,
        "toolArgs": {} if args is None else args,
        "timeout": timeout,
        "priority": 5,
        "attempt": attempt,
    }
