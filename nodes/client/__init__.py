"""The ApexBridge node client: connect a Python process to the hub as a node, serve
tools, and use the hub's LLM proxy. Needs only the standard library and ``websockets``
(no Django), so it can run on any machine.

    from nodes.client import Node

    node = Node("my-node", hub="ws://hub:8000", key="...")

    @node.tool("add")
    def add(a: int, b: int) -> int:
        return a + b

    asyncio.run(node.run())
"""

from .errors import (
    HubUnavailable,
    LLMCancelled,
    LLMConnectionError,
    LLMError,
    LLMInvalidRequest,
    LLMTimeout,
    LLMUnavailable,
    ModelNotAllowed,
    NodeClientError,
    NodeRemoved,
    QuotaExceeded,
    RegistrationError,
    ToolError,
    UpstreamError,
)
from .llm import LLMResult, LLMStream
from .node import Node, __version__

__all__ = [
    "HubUnavailable",
    "LLMCancelled",
    "LLMConnectionError",
    "LLMError",
    "LLMInvalidRequest",
    "LLMResult",
    "LLMStream",
    "LLMTimeout",
    "LLMUnavailable",
    "ModelNotAllowed",
    "Node",
    "NodeClientError",
    "NodeRemoved",
    "QuotaExceeded",
    "RegistrationError",
    "ToolError",
    "UpstreamError",
    "__version__",
]
