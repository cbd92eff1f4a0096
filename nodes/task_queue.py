"""The task queue's dispatch pass (PROTOCOL §3.3): queued tasks are given to eligible
nodes, highest priority first and oldest first within a priority; tasks waiting for
dependencies are released or cancelled.

The node choice itself is ``nodes.dispatch`` (pure); this module re-checks it under
row locks and claims. A claim locks the node row (so two hub processes cannot
overfill a node: the in-flight count is taken under that lock) and the queued task
row with ``skip_locked`` (so a task is never assigned twice). SQLite gets the same
guarantees from ``transaction_mode=IMMEDIATE``. Every write that touches both rows
locks the node first and the task second, so hub processes cannot deadlock.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import Count, F, OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from apexbridge.db.prepared import Param, PreparedQuery, PreparedUpdate, save_fields
from nodes import dispatch, events, task_waiters
from nodes.models import FINAL_TASK_STATUSES, Node, NodeProtocol, Task, TaskStatus
from nodes.node_rows import NodeRow, PassStart, as_row, node_rows
from nodes.protocol import execute_tool_data, frame, task_assign_data, task_data

logger = logging.getLogger(__name__)

Outgoing = list[tuple[str, dict[str, Any]]]

# Queued tasks looked at per dispatch pass, highest priority and oldest first.
DISPATCH_BATCH = 500
# Read a page at a time: a pass usually fills the free slots within the first page.
DISPATCH_PAGE = 50
# Rows handled per sweep step; the next sweep takes the rest.
SWEEP_BATCH = 1000
ENDED_UNSUCCESSFULLY = frozenset(FINAL_TASK_STATUSES) - {TaskStatus.SUCCEEDED}
NODE_FIELDS = (
    "node_id",
    "status",
    "connection_id",
    "channel_name",
    "protocol",
    "capabilities",
    "tools",
    "draining",
    "max_concurrent_tasks",
    "last_assigned_at",
)


def node_message(
    node_id: str, channel_name: str, message_type: str, data: dict[str, Any], *, assigns: Task | None = None
) -> tuple[str, dict]:
    """A channel message that makes the node's consumer send one frame. ``assigns``:
    the frame hands over this task's current attempt (``send_all`` puts the attempt
    back in the queue if the message cannot be sent)."""
    message = {"type": "node.send", "nodeId": node_id, "frame": frame(message_type, data)}
    if assigns is not None:
        message["assigns"] = [assigns.task_id, assigns.attempts]
    return channel_name, message


def publish_task(event_type: str, task: Task) -> None:
    events.publish(event_type, {"task": task_data(task)})
    if task.is_final:
        task_id = task.task_id
        transaction.on_commit(lambda: task_waiters.task_ended(task_id))


def _node_in_flight(node_id: Any) -> QuerySet:
    """The number of tasks in flight on a node, as a one-row (or no-row) query."""
    return (
        Task.objects.filter(status=TaskStatus.ASSIGNED, assigned_node_id=node_id)
        .order_by()
        .values("assigned_node_id")
        .annotate(n=Count("task_id"))
        .values("n")
    )


# The statements of a claim (a few per task): prepared, not built each time.
_LOCKED_NODE = PreparedQuery(
    lambda: Node.objects.select_for_update().filter(pk=Param("node_id")).only(*NODE_FIELDS)[:1]
)
_IN_FLIGHT = PreparedQuery(lambda: _node_in_flight(Param("node_id")).values_list("n", flat=True))
_NODE_COUNTING = PreparedQuery(
    lambda: (
        Node.objects.filter(pk=Param("node_id"))
        .only(*NODE_FIELDS)
        .annotate(in_flight=Subquery(_node_in_flight(OuterRef("pk"))))[:1]
    )
)
_QUEUED_TASK_LOCKED = PreparedQuery(
    lambda: Task.objects.select_for_update(skip_locked=True).filter(
        pk=Param("task_id"), status=TaskStatus.QUEUED
    )[:1]
)
_NODE_ASSIGNED = PreparedUpdate(
    lambda: (
        Node.objects.filter(pk=Param("node_id")),
        {
            "total_tasks": F("total_tasks") + 1,
            "last_assigned_at": Param("now", Node._meta.get_field("last_assigned_at")),
        },
    )
)
CLAIM_FIELDS = (
    "status",
    "attempts",
    "assigned_node_id",
    "assigned_connection_id",
    "assigned_at",
    "deadline_at",
    "not_before",
    "waiting_reason",
    "tried_node_ids",
)


def lock_node(node_id: str) -> Node | None:
    if not node_id:
        return None
    return _LOCKED_NODE.first(node_id=node_id)


def _lock_node_counting(node_id: str) -> tuple[Node | None, int]:
    """The node row locked, and its tasks in flight counted under that lock.

    On SQLite one statement (the count a scalar subquery): the transaction holds the
    database's write lock from ``BEGIN IMMEDIATE``, so nothing changes under it. Not
    on PostgreSQL: a statement that waits for a row lock sees the locked row as
    committed after the wait, but its subqueries see the snapshot taken before it,
    so the count would miss the tasks the other process just assigned to the node
    (and overfill it); there the count is a second statement, after the lock."""
    if connection.vendor != "sqlite":
        node = lock_node(node_id)
        if node is None:
            return None, 0
        return node, _IN_FLIGHT.first(node_id=node_id) or 0
    node = _NODE_COUNTING.first(node_id=node_id)
    return node, (node.in_flight or 0) if node is not None else 0


_IN_FLIGHT_COUNTS = PreparedQuery(
    lambda: (
        Task.objects.filter(status=TaskStatus.ASSIGNED)
        .values_list("assigned_node_id")
        .annotate(n=Count("task_id"))
        .order_by()
    )
)


def _in_flight_counts() -> dict[str, int]:
    """Tasks in flight per node that has any (not filtered by node: an ``IN`` of every
    connected node cost more to build than the count, ~60 ms at 10,000 nodes). Node
    ids and counts need no conversion: with a full fleet of 10,000 nodes the ORM's
    per-row conversion was most of a pass."""
    return dict(_IN_FLIGHT_COUNTS.raw_rows())


@dataclass
class Claim:
    assigned: tuple[str, dict] | None = None
    task_gone: bool = False
    node: Node | None = None  # fresh node row, when the cached one was out of date
    in_flight: int = 0


def claim_task(task_id: str, node_id: str) -> Claim:
    """Assign one queued task to one node, re-checking both under their locks."""
    with transaction.atomic():
        node, in_flight = _lock_node_counting(node_id)
        if node is None:
            return Claim()
        task = _QUEUED_TASK_LOCKED.first(task_id=task_id)
        now = timezone.now()
        if task is None or task.dependencies_pending or (task.not_before and task.not_before > now):
            return Claim(task_gone=True)
        if not dispatch.is_eligible(node, task, in_flight):
            return Claim(node=node, in_flight=in_flight)
        task.status = TaskStatus.ASSIGNED
        task.attempts += 1
        task.assigned_node_id = node.node_id
        task.assigned_connection_id = node.connection_id
        task.assigned_at = now
        task.deadline_at = now + timedelta(milliseconds=task.timeout_ms)
        task.not_before = None
        task.waiting_reason = ""
        if node.node_id not in task.tried_node_ids:
            task.tried_node_ids = [*task.tried_node_ids, node.node_id]
        save_fields(task, CLAIM_FIELDS)
        _NODE_ASSIGNED.run(node_id=node_id, now=now)
        publish_task("task_assigned", task)
    if node.protocol == NodeProtocol.VCP:
        message = node_message(
            node.node_id, node.channel_name, "execute_tool", execute_tool_data(task), assigns=task
        )
    else:
        message = node_message(
            node.node_id, node.channel_name, "task_assign", task_assign_data(task), assigns=task
        )
    logger.info("task %s attempt %d -> node %s", task.task_id, task.attempts, node.node_id)
    return Claim(assigned=message)


@dataclass(frozen=True)
class QueuedTask:
    """What the dispatch pass needs of a queued task (read as a row, not a model)."""

    task_id: str
    tool_name: str
    capability: str
    node_id: str
    tried_node_ids: list
    waiting_reason: str

    @property
    def requirements(self) -> tuple[str, str, str]:
        """All that decides whether a node is eligible (PROTOCOL §3.3, clauses 2-4)."""
        return (self.tool_name, self.capability, self.node_id)


QUEUED_TASK_FIELDS = ("task_id", "tool_name", "capability", "node_id", "tried_node_ids", "waiting_reason")


def task_dispatch_pending() -> Outgoing:
    """Give queued tasks to eligible nodes (PROTOCOL §3.3), priority 10 first, oldest
    first within a priority. Tasks that stay queued get their ``waitingReason``.
    Safe to run in several processes at once.

    The pass runs after every change that may free a slot, so it must stay cheap
    when little can be assigned (a long queue behind full nodes): queued tasks are
    read as rows, in order, only until every node is full; once tasks with some
    requirements found no node, later tasks with the same requirements are not
    looked at again in this pass (a pass only fills slots, so they cannot find one
    either); and when no node has a free slot, only queued tasks without a waiting
    reason yet are read (to get one; the others keep theirs until a pass with a
    free slot reaches them)."""
    _settle_dependencies()
    now = timezone.now()
    queued = _in_order(_FIRST_PAGE.all(now=now), lambda: _ready(now))
    first = next(queued, None)
    if first is None:
        return []  # the common case on a busy hub: no node rows to read
    pass_ = DispatchPass(node_rows.start_pass(_in_flight_counts()))
    if pass_.free_slots():
        pass_.run(itertools.chain([first], queued))
    if not pass_.free_slots():
        pass_.run(
            _in_order(_FIRST_PAGE_WITHOUT_REASON.all(now=now), lambda: _ready(now).filter(waiting_reason=""))
        )
    pass_.save_reasons()
    node_rows.keep(pass_.start)  # for the next pass, which brings it up to date
    return pass_.outgoing


def _ready(now: Any) -> QuerySet:
    """Queued tasks a node may take now (dependencies settled, back-off over)."""
    return Task.objects.filter(status=TaskStatus.QUEUED, dependencies_pending=False).filter(
        Q(not_before__isnull=True) | Q(not_before__lte=now)
    )


def _page(queued: QuerySet) -> QuerySet:
    return queued.order_by("-priority", "created_at", "task_id").values_list(
        "priority", "created_at", *QUEUED_TASK_FIELDS
    )


# The first page of a pass (every pass reads it): prepared, not built each time.
_FIRST_PAGE = PreparedQuery(
    lambda: _page(_ready(Param("now", Task._meta.get_field("not_before"))))[:DISPATCH_PAGE]
)
_FIRST_PAGE_WITHOUT_REASON = PreparedQuery(
    lambda: _page(_ready(Param("now", Task._meta.get_field("not_before"))).filter(waiting_reason=""))[
        :DISPATCH_PAGE
    ]
)


def _in_order(first_page: list[tuple], queued: Callable[[], QuerySet]) -> Iterator[QueuedTask]:
    """Up to ``DISPATCH_BATCH`` queued tasks, highest priority and oldest first, read a
    page at a time (no cursor stays open while tasks are claimed), starting from
    ``first_page`` (``_page(queued())[:DISPATCH_PAGE]``, already read)."""
    rows = first_page
    remaining = DISPATCH_BATCH
    while True:
        page_size = min(DISPATCH_PAGE, remaining)
        for row in rows:
            yield QueuedTask(*row[2:])
        remaining -= len(rows)
        if len(rows) < page_size or remaining <= 0:
            return
        priority, created_at, task_id = rows[-1][:3]
        after = (
            Q(priority__lt=priority)
            | Q(priority=priority, created_at__gt=created_at)
            | Q(priority=priority, created_at=created_at, task_id__gt=task_id)
        )
        rows = list(_page(queued().filter(after))[: min(DISPATCH_PAGE, remaining)])


class DispatchPass:
    """One pass over queued tasks with the node rows and in-flight counts read once."""

    def __init__(self, start: PassStart) -> None:
        self.start = start
        self.nodes: dict[str, NodeRow] = start.index.nodes
        self.in_flight: dict[str, int] = start.index.in_flight
        self.outgoing: Outgoing = []
        self.reasons: dict[str, str] = {}  # task id -> its new waiting reason
        self._blocked: dict[tuple[str, str, str], str] = {}  # requirements -> why no node
        # The nodes that could take one more task, and the best of them per task, kept
        # up to date as the pass assigns: neither is a scan of every node per task.
        self._free = start.index

    def free_slots(self) -> bool:
        """Whether any node can take one more task; never "no" from kept rows."""
        if not self._free.any_free() and self._read_rows_again():
            return self._free.any_free()
        return self._free.any_free()

    def _read_rows_again(self) -> bool:
        """Bring rows kept from an earlier pass up to date (once per pass): the rows
        changed since they were read, or all of them when they were read again or
        dropped meanwhile. False when they were read by this pass already."""
        if self.start.fresh:
            return False
        if node_rows.refresh(self.start):  # only the rows that changed since (any process)
            self.start.fresh = True
        else:
            self.start = node_rows.start_pass(self.in_flight, fresh=True)
            self.nodes.clear()  # the same mappings: callers hold them
            self.nodes.update(self.start.index.nodes)
            self.start.index.nodes = self.nodes
            self._free = self.start.index
        self._blocked.clear()
        return True

    def run(self, queued: Iterator[QueuedTask]) -> None:
        """Assign or explain each task; stops reading once every node is full, unless
        the tasks only need explaining."""
        explaining_only = not self.free_slots()
        for task in queued:
            reason = self._blocked.get(task.requirements)
            if reason is None:
                reason = self._assign_or_explain(task)
                if reason is not None:
                    self._blocked[task.requirements] = reason
                elif not explaining_only and not self.free_slots():
                    return
            if reason and reason != task.waiting_reason:
                self.reasons[task.task_id] = reason[:255]

    def save_reasons(self) -> None:
        by_reason: dict[str, list[str]] = {}
        for task_id, reason in self.reasons.items():
            by_reason.setdefault(reason, []).append(task_id)
        for reason, task_ids in by_reason.items():
            Task.objects.filter(pk__in=task_ids, status=TaskStatus.QUEUED).update(waiting_reason=reason)

    def _assign_or_explain(self, task: QueuedTask) -> str | None:
        """Claim ``task`` for the best eligible node (its message goes to ``outgoing``)
        and return None, or return why no node is eligible. A node row that turned out
        out of date is replaced (all rows, when they were kept from an earlier pass)
        and the choice made again."""
        nodes, in_flight = self.nodes, self.in_flight
        for _ in range(5):
            node = self._free.choose(task)
            if (node is None or node.node_id in (task.tried_node_ids or ())) and self._read_rows_again():
                # Never "no node", or "only a node it already ran on", from kept rows.
                node = self._free.choose(task)
            if node is None:
                return dispatch.waiting_reason(task, nodes.values(), in_flight)
            try:
                claim = claim_task(task.task_id, node.node_id)
            except DatabaseError:
                logger.warning("could not claim task %s; the next pass retries", task.task_id, exc_info=True)
                return None
            if claim.assigned is not None:
                self.outgoing.append(claim.assigned)
                in_flight[node.node_id] = in_flight.get(node.node_id, 0) + 1
                self._set_row(node.node_id, as_row(node, last_assigned_at=timezone.now()))
                return None
            if claim.task_gone:
                return None
            self._read_rows_again()  # rows kept from an earlier pass: bring them up to date
            self._blocked.clear()  # fresher node rows: what blocked before may not now
            if claim.node is None or not dispatch.is_connected(claim.node):
                self._set_row(node.node_id, None)
            else:
                in_flight[node.node_id] = claim.in_flight
                self._set_row(node.node_id, as_row(claim.node))
        return None

    def _set_row(self, node_id: str, row: NodeRow | None) -> None:
        """A newer row of a node (None: not a candidate) for this pass, the index and
        later passes (rows are shared between passes, so never changed in place)."""
        self._free.set_row(node_id, row)
        node_rows.put(self.start.generation, node_id, row)


_WAITING_FOR_DEPENDENCIES = PreparedQuery(  # read by every pass
    lambda: Task.objects.filter(status=TaskStatus.QUEUED, dependencies_pending=True).values_list(
        "task_id", "depends_on"
    )[:SWEEP_BATCH]
)


def _settle_dependencies() -> None:
    """Release tasks whose dependencies all succeeded; cancel those with a dependency
    that ended any other way (and, in turn, their own dependents)."""
    for _ in range(10):
        waiting = _WAITING_FOR_DEPENDENCIES.all()
        if not waiting:
            return
        statuses = dict(
            Task.objects.filter(pk__in={d for _, deps in waiting for d in deps}).values_list(
                "task_id", "status"
            )
        )
        cancelled_any = False
        for task_id, deps in waiting:
            failed = [d for d in deps if statuses.get(d, TaskStatus.FAILED) in ENDED_UNSUCCESSFULLY]
            if failed:
                cancelled_any |= _cancel_for_dependency(task_id, failed, statuses)
            elif all(statuses.get(d) == TaskStatus.SUCCEEDED for d in deps):
                Task.objects.filter(pk=task_id, status=TaskStatus.QUEUED, dependencies_pending=True).update(
                    dependencies_pending=False, waiting_reason=""
                )
        if not cancelled_any:
            return


def _cancel_for_dependency(task_id: str, failed: list[str], statuses: dict[str, str]) -> bool:
    with transaction.atomic():
        task = (
            Task.objects.select_for_update(skip_locked=True)
            .filter(pk=task_id, status=TaskStatus.QUEUED, dependencies_pending=True)
            .first()
        )
        if task is None:
            return False
        described = ", ".join(f"{d} ({statuses.get(d, 'missing')})" for d in failed)
        task.status = TaskStatus.CANCELLED
        message = f"dependency did not succeed: {described}"
        task.error = {"code": "dependency_failed", "message": message[:2000]}
        task.finished_at = timezone.now()
        task.dependencies_pending = False
        task.waiting_reason = ""
        task.save(update_fields=["status", "error", "finished_at", "dependencies_pending", "waiting_reason"])
        publish_task("task_cancelled", task)
    return True
