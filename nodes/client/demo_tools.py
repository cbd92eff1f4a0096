"""The built-in demo tools (PROTOCOL §8): safe to serve anywhere, they touch neither
files nor the network."""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING, Any

from .errors import ToolError

if TYPE_CHECKING:
    from .node import Node

MAX_SLEEP_SECONDS = 60


def echo(args: Any) -> Any:
    """Returns its toolArgs unchanged."""
    return args


async def sleep(seconds: float) -> dict[str, float]:
    """Waits ``seconds`` (0–60) and says so; cancellable."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ToolError("seconds must be a number", code="invalid_args")
    if not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise ToolError(f"seconds must be between 0 and {MAX_SLEEP_SECONDS}", code="invalid_args")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def sha256(text: str) -> dict[str, str]:
    """The SHA-256 hex digest of ``text`` (UTF-8)."""
    if not isinstance(text, str):
        raise ToolError("text must be a string", code="invalid_args")
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def register_demo_tools(node: Node) -> None:
    node.add_tool("echo", echo, raw_args=True, description=echo.__doc__)
    node.add_tool("sleep", sleep, description=sleep.__doc__)
    node.add_tool("sha256", sha256, description=sha256.__doc__)
