"""Task messages of the node connection (PROTOCOL §3.2, §2.5): ``task_result`` and
VCP's ``tool_result``. Mixed into ``NodeConsumer``.

Both complete the current attempt through
``task_result_services.task_complete_many``, in batches (``nodes.batching.task_results``:
results arriving while a batch is written wait for the next, so a stream of results
from many nodes costs a few queries per batch). A result that is not for the current
attempt of this node on this connection is refused there with ``unknown_task``,
``node_mismatch`` or ``stale_result`` and changes nothing. An accepted result frees
a slot, so queued tasks are dispatched at once.
"""

from __future__ import annotations

from typing import Any

from nodes import task_result_services
from nodes.batching import task_results
from nodes.protocol import (
    TaskResultPayload,
    ToolResultPayload,
    task_result_ack_data,
    tool_result_error,
    validate,
)
from nodes.runtime import runtime


class TaskConsumerMixin:
    async def handle_task_result(self, data: dict[str, Any]) -> None:
        node_id = self.require_node(data)
        payload = validate(TaskResultPayload, data)
        error = payload.error.model_dump(exclude_none=True) if payload.error is not None else None
        await task_results.submit(
            task_result_services.TaskResult(
                task_id=payload.task_id,
                node_id=node_id,
                connection_id=self.connection_id,
                success=payload.success,
                result=payload.result,
                error=error,
                execution_time_ms=payload.execution_time,
                attempt=payload.attempt,
            )
        )
        await self.send_frame("task_result_ack", task_result_ack_data(payload.task_id, node_id))
        await runtime.dispatch()

    async def handle_tool_result(self, data: dict[str, Any]) -> None:
        """VCP completion: no acknowledgement on success (VCP nodes expect none);
        refusals come back as an ``error`` frame."""
        node_id = self.require_node(data)
        payload = validate(ToolResultPayload, data)
        success = payload.status == "success"
        await task_results.submit(
            task_result_services.TaskResult(
                task_id=payload.requestId,
                node_id=node_id,
                connection_id=self.connection_id,
                success=success,
                result=payload.result,
                error=None if success else tool_result_error(payload.error),
            )
        )
        await runtime.dispatch()
