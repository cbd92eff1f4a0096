"""Node choice for tasks (PROTOCOL §3.3), as pure functions over already-loaded rows.

Nothing here touches the database: ``task_services`` loads the connected nodes and
the in-flight counts once per dispatch pass, asks ``choose_node`` for each queued
task, and re-checks the answer under a row lock before it assigns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Protocol

from nodes.models import NodeStatus

ASSIGNABLE_STATUSES = (NodeStatus.ONLINE, NodeStatus.BUSY)


class NodeLike(Protocol):
    node_id: str
    status: str
    connection_id: str
    capabilities: list
    tools: list
    draining: bool
    max_concurrent_tasks: int
    last_assigned_at: datetime | None


class TaskLike(Protocol):
    tool_name: str
    capability: str
    node_id: str
    tried_node_ids: list


# --- the six clauses of §3.3, one function each ---------------------------------------
def is_connected(node: NodeLike) -> bool:
    """Clause 1: connected and ``online`` or ``busy``."""
    return bool(node.connection_id) and node.status in ASSIGNABLE_STATUSES


def has_capability(node: NodeLike, task: TaskLike) -> bool:
    """Clause 2: the task's capability, if any, is one of the node's."""
    return not task.capability or task.capability in (node.capabilities or [])


def offers_tool(node: NodeLike, task: TaskLike) -> bool:
    """Clause 3: a node that declared tools must declare this one."""
    return not node.tools or task.tool_name in node.tools


def matches_pin(node: NodeLike, task: TaskLike) -> bool:
    """Clause 4: a pinned task goes to that node only."""
    return not task.node_id or task.node_id == node.node_id


def accepts_new_work(node: NodeLike) -> bool:
    """Clause 5: not draining."""
    return not node.draining


def has_free_slot(node: NodeLike, in_flight: int) -> bool:
    """Clause 6: fewer tasks in flight than ``maxConcurrentTasks``."""
    return in_flight < max(node.max_concurrent_tasks, 1)


def is_eligible(node: NodeLike, task: TaskLike, in_flight: int) -> bool:
    return (
        is_connected(node)
        and has_capability(node, task)
        and offers_tool(node, task)
        and matches_pin(node, task)
        and accepts_new_work(node)
        and has_free_slot(node, in_flight)
    )


def preference_key(node: NodeLike, task: TaskLike, in_flight: int) -> tuple:
    """Smaller is better: an untried node (retries), ``online`` over ``busy``, fewest
    in flight, then round robin (least recently assigned; never assigned first)."""
    tried = node.node_id in (task.tried_node_ids or [])
    busy = node.status != NodeStatus.ONLINE
    last = node.last_assigned_at.timestamp() if node.last_assigned_at else float("-inf")
    return (tried, busy, in_flight, last, node.node_id)


def choose_node(task: TaskLike, nodes: Iterable[NodeLike], in_flight: Mapping[str, int]) -> NodeLike | None:
    """The node this task should go to now, or None when no node is eligible."""
    eligible = [n for n in nodes if is_eligible(n, task, in_flight.get(n.node_id, 0))]
    if not eligible:
        return None
    return min(eligible, key=lambda n: preference_key(n, task, in_flight.get(n.node_id, 0)))


def waiting_reason(task: TaskLike, nodes: Iterable[NodeLike], in_flight: Mapping[str, int]) -> str:
    """Why no node is eligible, in words for the ``waitingReason`` field. ``nodes``
    are the connected nodes: a task that cannot possibly run still waits."""
    candidates = [n for n in nodes if is_connected(n)]
    if task.node_id:
        pinned = [n for n in candidates if n.node_id == task.node_id]
        if not pinned:
            return f"pinned node '{task.node_id}' is not connected"
        candidates = pinned
    if not candidates:
        return "no node is connected"
    if task.capability:
        candidates = [n for n in candidates if has_capability(n, task)]
        if not candidates:
            return f"no connected node has capability '{task.capability}'"
    candidates = [n for n in candidates if offers_tool(n, task)]
    if not candidates:
        return f"no connected node offers tool '{task.tool_name}'"
    candidates = [n for n in candidates if accepts_new_work(n)]
    if not candidates:
        return "every suitable node is draining"
    if all(not has_free_slot(n, in_flight.get(n.node_id, 0)) for n in candidates):
        if len(candidates) == 1:
            node = candidates[0]
            return f"node '{node.node_id}' is at its limit of {node.max_concurrent_tasks} task(s)"
        return f"all {len(candidates)} suitable nodes are at their task limit"
    return ""
