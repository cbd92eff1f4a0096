"""Frames that must reach the hub even if the connection drops: task results.

Results made while disconnected wait in a bounded queue and go out after the next
registration; results sent but not yet acknowledged (``task_result_ack``) are queued again
if the connection drops. When the queue is full the oldest frame is dropped, and the log
says which task's result was lost (the hub re-runs such a task after its timeout).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .wire import encode

logger = logging.getLogger("apexbridge.node")


class Outbox:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queue: deque[tuple[str, dict[str, Any]]] = deque()
        self._unacked: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, message_type: str, data: dict[str, Any], *, front: bool = False) -> None:
        if len(self._queue) >= self.limit:
            dropped_type, dropped = self._queue.pop() if front else self._queue.popleft()
            logger.warning(
                "Outbox full (%d frames): dropped %s for task %s",
                self.limit,
                dropped_type,
                dropped.get("taskId"),
            )
        if front:
            self._queue.appendleft((message_type, data))
        else:
            self._queue.append((message_type, data))

    def sent(self, message_type: str, data: dict[str, Any]) -> None:
        if message_type == "task_result":
            self._unacked[data["taskId"]] = data

    def acked(self, task_id: Any) -> dict[str, Any] | None:
        """The hub answered this result; returns the result as it was sent."""
        return self._unacked.pop(task_id, None)

    def requeue_unacked(self) -> None:
        for data in reversed(list(self._unacked.values())):
            self.put("task_result", data, front=True)
        self._unacked.clear()

    async def flush(self, ws: ClientConnection, node_id: str | None) -> None:
        """Send everything queued, oldest first, as the (possibly new) ``node_id``."""
        if self._queue:
            logger.info("Sending %d frame(s) queued while disconnected", len(self._queue))
        while self._queue:
            message_type, data = self._queue.popleft()
            if "nodeId" in data:
                data = {**data, "nodeId": node_id}
            try:
                await ws.send(encode(message_type, data))
            except (ConnectionClosed, asyncio.CancelledError):
                self._queue.appendleft((message_type, data))
                raise
            self.sent(message_type, data)
