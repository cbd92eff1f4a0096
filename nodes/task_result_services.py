"""Task results (PROTOCOL §3.2, §2.5): a node's ``task_result`` or VCP
``tool_result`` completes the current attempt of its task. Results are applied in
batches (``task_complete_many``, fed by ``nodes.batching.task_results``), one
transaction per batch; each result still gets its own outcome, and a result that
is not for the current attempt of this node on this connection is refused
(``unknown_task``, ``node_mismatch``, ``stale_result``) and changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from apexbridge.db.prepared import Param, PreparedQuery, save_fields
from nodes.models import Node, Task, TaskStatus
from nodes.protocol import ErrorCode, ProtocolError
from nodes.task_queue import publish_task
from nodes.task_services import node_stats_add, retry_or_finish, timedelta_ms


def _check_result_source(task: Task, node_id: str, connection_id: str, attempt: int | None) -> None:
    if node_id != task.assigned_node_id and node_id not in (task.tried_node_ids or []):
        raise ProtocolError(
            ErrorCode.NODE_MISMATCH, f"Task {task.task_id} was not assigned to node {node_id!r}"
        )
    if task.status != TaskStatus.ASSIGNED or task.assigned_node_id != node_id:
        raise ProtocolError(
            ErrorCode.STALE_RESULT,
            f"Task {task.task_id} is {task.status}; this node's attempt is no longer current",
        )
    if task.assigned_connection_id != connection_id:
        raise ProtocolError(ErrorCode.STALE_RESULT, f"Task {task.task_id} was assigned on another connection")
    if attempt is not None and attempt != task.attempts:
        raise ProtocolError(
            ErrorCode.STALE_RESULT, f"Task {task.task_id} is on attempt {task.attempts}, not {attempt}"
        )


@dataclass
class TaskResult:
    """A node's result for one attempt (``task_result`` or VCP ``tool_result``)."""

    task_id: str
    node_id: str
    connection_id: str
    success: bool
    result: Any = None
    error: dict[str, Any] | None = None
    execution_time_ms: int | None = None
    attempt: int | None = None


def task_complete(
    *,
    task_id: str,
    node_id: str,
    connection_id: str,
    success: bool,
    result: Any = None,
    error: dict[str, Any] | None = None,
    execution_time_ms: int | None = None,
    attempt: int | None = None,
) -> Task:
    """Accept a node's result for the current attempt (``task_result`` or VCP
    ``tool_result``). Raises ``ProtocolError`` (``unknown_task``, ``node_mismatch``,
    ``stale_result``) and changes nothing for any other result."""
    outcome = task_complete_many(
        results=[
            TaskResult(task_id, node_id, connection_id, success, result, error, execution_time_ms, attempt)
        ]
    )[0]
    if isinstance(outcome, ProtocolError):
        raise outcome
    return outcome


@transaction.atomic
def task_complete_many(*, results: list[TaskResult]) -> list[Task | ProtocolError]:
    """``task_complete`` for results of distinct tasks in one transaction (results
    streaming in from many nodes cost a few queries per batch plus one UPDATE per
    task, not a transaction each). One outcome per result, in order: the task, or
    the ``ProtocolError`` that refused the result (a refused one changes nothing)."""
    task_ids = [result.task_id for result in results]
    if len(set(task_ids)) != len(task_ids):
        raise ValueError("task_complete_many: task ids must be distinct")
    node_ids = sorted({result.node_id for result in results})
    if connection.features.has_select_for_update:  # SQLite: BEGIN IMMEDIATE serialises writers
        list(Node.objects.select_for_update().filter(pk__in=node_ids).order_by("pk").values_list("pk"))
    tasks = {task.task_id: task for task in _locked_tasks(task_ids)}
    now = timezone.now()
    stats: dict[str, Counter] = {}
    outcomes: list[Task | ProtocolError] = []
    for result in results:
        task = tasks.get(result.task_id)
        try:
            if task is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TASK, f"No task {result.task_id!r}")
            _check_result_source(task, result.node_id, result.connection_id, result.attempt)
        except ProtocolError as refusal:
            outcomes.append(refusal)
            continue
        _apply_result(task, result, now, stats.setdefault(result.node_id, Counter()))
        outcomes.append(task)
    for node_id, increments in stats.items():
        node_stats_add(node_id, **increments)
    return outcomes


_TASK_LOCKED = PreparedQuery(lambda: Task.objects.select_for_update().filter(pk=Param("task_id")))


def _locked_tasks(task_ids: list[str]) -> Iterable[Task]:
    """The tasks, locked in id order (one result at a time is the common case: prepared)."""
    if len(task_ids) == 1:
        return _TASK_LOCKED.all(task_id=task_ids[0])
    return Task.objects.select_for_update().filter(pk__in=task_ids).order_by("pk")


def _apply_result(task: Task, result: TaskResult, now: datetime, node_stats: Counter) -> None:
    elapsed_ms = timedelta_ms(now - task.assigned_at) if task.assigned_at else 0
    task.execution_time_ms = result.execution_time_ms if result.execution_time_ms is not None else elapsed_ms
    if result.success:
        task.status = TaskStatus.SUCCEEDED
        task.result = result.result
        task.error = None
        task.finished_at = now
        task.deadline_at = None
        save_fields(task, ("status", "result", "error", "execution_time_ms", "finished_at", "deadline_at"))
        node_stats.update(completed_tasks=1, total_response_time_ms=elapsed_ms)
        publish_task("task_succeeded", task)
        return
    error = dict(result.error or {"code": "tool_error", "message": "The node reported a failure"})
    node_stats.update(failed_tasks=1)
    if error.get("retryable"):
        save_fields(task, ("execution_time_ms",))
        retry_or_finish(task, error=error, final_status=TaskStatus.FAILED, now=now)
    else:
        task.status = TaskStatus.FAILED
        task.error = error
        task.finished_at = now
        task.deadline_at = None
        save_fields(task, ("status", "error", "execution_time_ms", "finished_at", "deadline_at"))
        publish_task("task_failed", task)
