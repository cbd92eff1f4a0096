"""Task services (PROTOCOL §3): submission, time-outs, retries, lost nodes,
cancellation and re-queueing. Results are ``nodes.task_result_services``; the
dispatch pass lives in ``nodes.task_queue`` and is re-exported here
(``task_dispatch_pending``) for the runtime and the admin.

The database is the truth. Every write that touches a node row and a task row locks
the node first and the task second (as the dispatch pass does), and writes that lock
many rows of a kind lock them in id order, so hub processes do not deadlock each
other (should PostgreSQL still report one, a batch is tried again:
``nodes.batching``); sweeps use ``skip_locked`` and conditional filters so several
processes may run them at once.

Frames for nodes are returned (or sent after commit) as ``(channel_name, message)``
pairs: the channel layer only carries the nudge. A lost ``task_assign`` costs one
attempt time-out, never the task.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from apexbridge.db.prepared import Param, PreparedUpdate, insert
from nodes.models import Node, NodeProtocol, Task, TaskStatus
from nodes.protocol import task_cancel_data
from nodes.task_queue import (
    NODE_FIELDS,
    SWEEP_BATCH,
    Outgoing,
    lock_node,
    node_message,
    publish_task,
    task_dispatch_pending,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SubmitResult",
    "TaskError",
    "TaskStateError",
    "TaskValidationError",
    "task_cancel",
    "task_dispatch_pending",
    "task_release_node_attempts",
    "task_requeue",
    "task_submit",
    "task_sweep_timeouts",
]


class TaskError(Exception):
    """A refused task request; ``code`` is the API's error code."""

    code = "task_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class TaskValidationError(TaskError):
    """Bad input (the API answers 400); nothing was created."""

    code = "invalid_payload"


class TaskStateError(TaskError):
    """The task is not in a state that allows this (the API answers 409)."""

    code = "task_state_conflict"


@dataclass
class SubmitResult:
    task: Task
    created: bool


# --- small helpers -------------------------------------------------------------------------
def new_task_id() -> str:
    return f"t-{uuid.uuid4().hex}"


def timedelta_ms(delta: timedelta) -> int:
    return max(int(delta.total_seconds() * 1000), 0)


def retry_backoff_ms(attempt: int) -> int:
    """Back-off before retry number ``attempt`` (PROTOCOL §3.4)."""
    base = settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS
    return min(base * 2 ** max(attempt - 1, 0), settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MAX_MS)


def _cancel_message(
    task: Task, node: Node | None, reason: str, *, any_node_id: bool = False
) -> tuple[str, dict] | None:
    """``task_cancel`` for the connection running the current attempt, if it is still
    there (VCP nodes have no such message). ``any_node_id``: deliver it even though
    the connection no longer acts as this node (it has just unregistered)."""
    if node is None or not node.channel_name or node.protocol == NodeProtocol.VCP:
        return None
    if node.connection_id != task.assigned_connection_id:
        return None
    data = task_cancel_data(task.task_id, reason)
    channel_name, message = node_message(node.node_id, node.channel_name, "task_cancel", data)
    if any_node_id:
        message["nodeId"] = None
    return channel_name, message


def send_outgoing(outgoing: Outgoing) -> None:
    """Send channel messages from sync code (a view, a command, an on_commit hook)."""
    if not outgoing:
        return
    from nodes.runtime import send_all

    try:
        async_to_sync(send_all)(list(outgoing))
    except Exception:  # at-most-once nudges: time-outs and sweeps recover
        logger.warning("could not send %d node message(s)", len(outgoing), exc_info=True)


def dispatch_and_send() -> None:
    """Run a dispatch pass now and send what it assigned (after a change that may let
    a queued task run: a new task, a freed slot).

    In a hub process the pass is the runtime's coalesced one: concurrent API requests
    share passes instead of each running its own over the same queued tasks (which
    made them queue on the database's write lock). Elsewhere (a ``manage.py``
    command, tests without background loops) the pass runs here."""
    from nodes.runtime import runtime

    if runtime.dispatch_from_thread():
        return
    try:
        send_outgoing(task_dispatch_pending())
    except DatabaseError:
        logger.warning("dispatch pass failed; the next sweep retries", exc_info=True)


_stats_updates: dict[tuple[str, ...], PreparedUpdate] = {}


def node_stats_add(node_id: str, **increments: int) -> None:
    """Add to a node's counters (one UPDATE, prepared per set of counters: a few per task)."""
    if not node_id:
        return
    names = tuple(sorted(increments))
    update = _stats_updates.get(names)
    if update is None:
        changes = {name: F(name) + Param(name, Node._meta.get_field(name)) for name in names}
        update = _stats_updates.setdefault(
            names, PreparedUpdate(lambda: (Node.objects.filter(pk=Param("node_id")), changes))
        )
    update.run(node_id=node_id, **increments)


# --- submission --------------------------------------------------------------------------
def _check_dependencies(task_id: str, depends_on: list[str]) -> None:
    if not depends_on:
        return
    known = set(Task.objects.filter(pk__in=depends_on).values_list("task_id", flat=True))
    unknown = [d for d in depends_on if d not in known]
    if unknown:
        raise TaskValidationError(f"dependsOn: unknown task id(s): {', '.join(unknown[:10])}")
    # Walk the graph upwards: reaching the new task again would be a cycle.
    seen: set[str] = set()
    frontier = set(depends_on)
    while frontier:
        if task_id in frontier:
            raise TaskValidationError("dependsOn: the dependencies form a cycle")
        seen |= frontier
        parents: set[str] = set()
        for deps in Task.objects.filter(pk__in=frontier).values_list("depends_on", flat=True):
            parents.update(deps or [])
        frontier = parents - seen


def task_submit(
    *,
    tool_name: str,
    tool_args: Any = None,
    capability: str = "",
    node_id: str = "",
    priority: int = 5,
    timeout_ms: int | None = None,
    max_retries: int | None = None,
    idempotency_key: str | None = None,
    depends_on: list[str] | None = None,
    created_by: str = "",
    task_id: str | None = None,
) -> SubmitResult:
    """Queue a task (PROTOCOL §3.1) and dispatch right after commit. A known
    ``idempotency_key`` returns the first task unchanged."""
    if idempotency_key:
        existing = Task.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return SubmitResult(task=existing, created=False)
    task_id = task_id or new_task_id()
    deps = list(dict.fromkeys(depends_on or []))
    if task_id in deps:
        raise TaskValidationError("dependsOn: a task cannot depend on itself")
    try:
        with transaction.atomic():
            _check_dependencies(task_id, deps)
            task = insert(
                Task(
                    task_id=task_id,
                    tool_name=tool_name,
                    tool_args={} if tool_args is None else tool_args,
                    capability=capability or "",
                    node_id=node_id or "",
                    priority=priority,
                    timeout_ms=timeout_ms or settings.APEXBRIDGE_TASK_DEFAULT_TIMEOUT_MS,
                    max_retries=settings.APEXBRIDGE_TASK_MAX_RETRIES if max_retries is None else max_retries,
                    idempotency_key=idempotency_key or None,
                    depends_on=deps,
                    dependencies_pending=bool(deps),
                    waiting_reason=f"waiting for dependencies: {', '.join(deps)}"[:255] if deps else "",
                    created_by=created_by,
                )
            )
            publish_task("task_queued", task)
    except IntegrityError:
        existing = Task.objects.filter(idempotency_key=idempotency_key).first() if idempotency_key else None
        if existing is None:
            raise
        return SubmitResult(task=existing, created=False)  # a concurrent submission won
    logger.info("task %s queued: %s (priority %s)", task.task_id, tool_name, priority)
    transaction.on_commit(dispatch_and_send)
    return SubmitResult(task=task, created=True)


# --- attempts that end without a result ------------------------------------------------------
def retry_or_finish(task: Task, *, error: dict[str, Any], final_status: str, now: datetime) -> None:
    """End the current attempt: back to the queue if ``attempts <= maxRetries``
    (after the back-off), otherwise the task ends with ``final_status``. The caller
    holds the task row lock."""
    task.error = error
    task.assigned_node_id = ""
    task.assigned_connection_id = ""
    task.deadline_at = None
    if task.attempts <= task.max_retries:
        backoff_ms = retry_backoff_ms(task.attempts)
        task.status = TaskStatus.QUEUED
        task.not_before = now + timedelta(milliseconds=backoff_ms) if backoff_ms > 0 else None
        until = task.not_before.isoformat(timespec="milliseconds") if task.not_before else ""
        task.waiting_reason = f"retry back-off until {until}" if until else ""
        event = "task_retried"
    else:
        task.status = final_status
        task.finished_at = now
        task.waiting_reason = ""
        event = "task_timed_out" if final_status == TaskStatus.TIMED_OUT else "task_failed"
    task.save(
        update_fields=[
            "status",
            "error",
            "assigned_node_id",
            "assigned_connection_id",
            "deadline_at",
            "not_before",
            "waiting_reason",
            "finished_at",
        ]
    )
    publish_task(event, task)


def task_release_node_attempts(*, node_id: str, connection_id: str | None, reason: str) -> int:
    """A node's attempts can no longer be answered (its socket closed, it went offline,
    unregistered or was taken over): retry them elsewhere or end them ``failed`` with
    code ``node_lost``. ``connection_id`` limits this to one connection's attempts.
    Called inside the registry service's transaction, which holds the node row."""
    now = timezone.now()
    released = 0
    cancels: Outgoing = []
    with transaction.atomic():
        node = Node.objects.filter(pk=node_id).only(*NODE_FIELDS).first()
        query = Task.objects.select_for_update().filter(status=TaskStatus.ASSIGNED, assigned_node_id=node_id)
        if connection_id is not None:
            query = query.filter(assigned_connection_id=connection_id)
        for task in query.order_by("task_id"):
            if reason in ("node_offline", "node_unregistered"):
                # The socket may still be open: tell the node to stop the work.
                cancel = _cancel_message(task, node, reason, any_node_id=reason == "node_unregistered")
                if cancel:
                    cancels.append(cancel)
            error = {
                "code": "node_lost",
                "message": f"node {node_id} was lost during attempt {task.attempts} ({reason})",
            }
            retry_or_finish(task, error=error, final_status=TaskStatus.FAILED, now=now)
            released += 1
        if released:
            node_stats_add(node_id, failed_tasks=released)
            logger.info("node %s (%s): %d attempt(s) released", node_id, reason, released)
    if cancels:
        transaction.on_commit(lambda: send_outgoing(cancels))
    return released


LAYER_DOWN_REASON = "channel layer unavailable: waiting for it to come back"


def task_note_layer_down() -> int:
    """Say why new queued tasks are not dispatched while the channel layer is down
    (dispatch waits for it; see ``runtime.layer_reachable``)."""
    return Task.objects.filter(status=TaskStatus.QUEUED, waiting_reason="").update(
        waiting_reason=LAYER_DOWN_REASON
    )


def task_return_undelivered(assignments: list[tuple[str, int]], reason: str) -> int:
    """Attempts whose ``task_assign`` never left the hub (the channel layer refused the
    message) go back to the queue at once, without counting as an attempt, instead of
    waiting for their time-out. Only the attempt that was sent is touched: a task
    that has moved on since is left alone. Returns how many went back."""
    returned = 0
    for task_id, attempt in assignments:
        assigned_node_id = Task.objects.filter(pk=task_id).values_list("assigned_node_id", flat=True).first()
        with transaction.atomic():
            lock_node(assigned_node_id or "")  # node first, task second, as every writer
            task = (
                Task.objects.select_for_update()
                .filter(pk=task_id, status=TaskStatus.ASSIGNED, attempts=attempt)
                .first()
            )
            if task is None:
                continue
            node_id = task.assigned_node_id
            task.status = TaskStatus.QUEUED
            task.attempts -= 1
            task.assigned_node_id = ""
            task.assigned_connection_id = ""
            task.deadline_at = None
            task.waiting_reason = f"could not notify node {node_id} ({reason}); waiting to try again"[:255]
            task.save(
                update_fields=[
                    "status",
                    "attempts",
                    "assigned_node_id",
                    "assigned_connection_id",
                    "deadline_at",
                    "waiting_reason",
                ]
            )
            Node.objects.filter(pk=node_id, total_tasks__gt=0).update(total_tasks=F("total_tasks") - 1)
            publish_task("task_queued", task)
        returned += 1
        logger.warning(
            "task %s: task_assign for attempt %d not delivered (%s); queued again", task_id, attempt, reason
        )
    return returned


def task_sweep_timeouts() -> Outgoing:
    """End attempts past their deadline (``task_cancel`` to the node, then retry or
    ``timed_out``) and attempts whose connection no longer exists (a hub process died
    with them). Conditional, so several processes may sweep at once."""
    outgoing: Outgoing = []
    now = timezone.now()
    due = list(
        Task.objects.filter(status=TaskStatus.ASSIGNED, deadline_at__lt=now).values_list(
            "task_id", "assigned_node_id"
        )[:SWEEP_BATCH]
    )
    for task_id, node_id in due:
        try:
            with transaction.atomic():
                node = lock_node(node_id)
                task = (
                    Task.objects.select_for_update(skip_locked=True)
                    .filter(pk=task_id, status=TaskStatus.ASSIGNED, deadline_at__lt=now)
                    .first()
                )
                if task is None:
                    continue
                cancel = _cancel_message(task, node, "timeout")
                if cancel:
                    outgoing.append(cancel)
                error = {
                    "code": "timeout",
                    "message": (
                        f"attempt {task.attempts} on node {node_id} got no result within {task.timeout_ms} ms"
                    ),
                }
                retry_or_finish(task, error=error, final_status=TaskStatus.TIMED_OUT, now=now)
                node_stats_add(node_id, failed_tasks=1)
        except DatabaseError:
            logger.warning("time-out of task %s not applied; the next sweep retries", task_id, exc_info=True)
    _sweep_orphans(now)
    return outgoing


def _sweep_orphans(now: datetime) -> None:
    """Release attempts assigned to a connection that no longer exists (its hub
    process died before it could say so, or the node row moved on)."""
    live_connection = Node.objects.filter(
        node_id=OuterRef("assigned_node_id"), connection_id=OuterRef("assigned_connection_id")
    )
    orphans = list(
        Task.objects.filter(status=TaskStatus.ASSIGNED)
        .exclude(Exists(live_connection))
        .values_list("task_id", "assigned_node_id")[:SWEEP_BATCH]
    )
    for task_id, node_id in orphans:
        try:
            with transaction.atomic():
                node = lock_node(node_id)
                task = (
                    Task.objects.select_for_update(skip_locked=True)
                    .filter(pk=task_id, status=TaskStatus.ASSIGNED)
                    .first()
                )
                if task is None or task.assigned_node_id != node_id:
                    continue
                if node is not None and node.connection_id == task.assigned_connection_id:
                    continue  # the connection exists after all
                error = {
                    "code": "node_lost",
                    "message": f"connection of node {node_id} for attempt {task.attempts} is gone",
                }
                retry_or_finish(task, error=error, final_status=TaskStatus.FAILED, now=now)
                node_stats_add(node_id, failed_tasks=1)
                logger.info("task %s: its connection is gone; attempt released", task_id)
        except DatabaseError:
            logger.warning("orphaned task %s not released; the next sweep retries", task_id, exc_info=True)


# --- staff actions ----------------------------------------------------------------------------
def task_cancel(*, task_id: str, reason: str) -> Task:
    """Cancel a queued or running task; the running node gets ``task_cancel``.
    Raises ``Task.DoesNotExist``, or ``TaskStateError`` when the task already ended."""
    assigned_node_id = Task.objects.values_list("assigned_node_id", flat=True).get(pk=task_id)
    outgoing: Outgoing = []
    with transaction.atomic():
        node = lock_node(assigned_node_id)
        task = Task.objects.select_for_update().get(pk=task_id)
        if task.is_final:
            raise TaskStateError(f"Task {task_id} already ended: {task.status}", code="task_finished")
        if task.status == TaskStatus.ASSIGNED:
            if node is None or node.node_id != task.assigned_node_id:
                node = Node.objects.filter(pk=task.assigned_node_id).first()
            cancel = _cancel_message(task, node, reason or "cancelled")
            if cancel:
                outgoing.append(cancel)
        task.status = TaskStatus.CANCELLED
        task.error = {"code": "cancelled", "message": reason or "cancelled"}
        task.finished_at = timezone.now()
        task.deadline_at = None
        task.not_before = None
        task.waiting_reason = ""
        task.save(
            update_fields=["status", "error", "finished_at", "deadline_at", "not_before", "waiting_reason"]
        )
        publish_task("task_cancelled", task)
        transaction.on_commit(lambda: _after_cancel(outgoing))
    logger.info("task %s cancelled: %s", task_id, reason)
    return task


def _after_cancel(outgoing: Outgoing) -> None:
    send_outgoing(outgoing)
    # The node's slot is free and dependents must learn the outcome.
    dispatch_and_send()


def task_requeue(*, task_id: str) -> Task:
    """Put a ``failed``, ``timed_out`` or ``cancelled`` task back in the queue with its
    attempts reset (staff). Raises ``Task.DoesNotExist`` or ``TaskStateError``."""
    with transaction.atomic():
        task = Task.objects.select_for_update().get(pk=task_id)
        if task.status not in (TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED):
            raise TaskStateError(
                f"Only failed, timed-out or cancelled tasks can be re-queued; {task_id} is {task.status}",
                code="task_not_requeueable",
            )
        task.status = TaskStatus.QUEUED
        task.attempts = 0
        task.tried_node_ids = []
        task.assigned_node_id = ""
        task.assigned_connection_id = ""
        task.assigned_at = None
        task.deadline_at = None
        task.not_before = None
        task.finished_at = None
        task.result = None
        task.error = None
        task.execution_time_ms = None
        task.dependencies_pending = bool(task.depends_on)
        task.waiting_reason = (
            f"waiting for dependencies: {', '.join(task.depends_on)}"[:255] if task.depends_on else ""
        )
        task.save()
        publish_task("task_queued", task)
        transaction.on_commit(dispatch_and_send)
    logger.info("task %s re-queued by staff", task_id)
    return task
