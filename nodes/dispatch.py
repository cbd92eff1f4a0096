"""Node choice for tasks (PROTOCOL §3.3), as pure functions over already-loaded rows.

Nothing here touches the database: ``task_services`` loads the connected nodes and
the in-flight counts once per dispatch pass, asks ``choose_node`` for each queued
task, and re-checks the answer under a row lock before it assigns.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, MutableMapping
from datetime import datetime
from typing import Protocol

from nodes.models import NodeStatus

ASSIGNABLE_STATUSES = (NodeStatus.ONLINE, NodeStatus.BUSY)
NEVER = float("-inf")  # the last assignment of a node never assigned: first in round robin


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


class FreeNodeIndex:
    """``choose_node`` for every task of one dispatch pass, without a scan of every
    connected node per task.

    With 10,000 idle nodes ``choose_node`` costs ~9 ms a task, so a pass that hands
    out a burst of 500 queued tasks held the database thread (and the GIL) for
    seconds. Here the nodes that could take one more task are a set, and for each
    (tool, capability) a pass meets, the eligible ones are a heap by preference,
    built once (one scan) and kept current: a node whose row, in-flight count or
    last assignment changes is reported with ``update`` and gets a fresh entry (its
    older entries are skipped when they reach the top). Retried tasks (whose
    preference puts untried nodes first) and pinned tasks are chosen directly.
    The answer is always ``choose_node``'s (tests/nodes/test_dispatch.py).

    ``nodes`` and ``in_flight`` are the pass's own mappings: change them, then call
    ``update(node_id)`` (or use ``set_row`` / ``set_in_flight``). The index may outlive
    its pass (``node_rows`` keeps it for the next one, which brings it up to date
    with the rows and counts that changed): building it is one look at every node,
    ~10 ms a pass at 10,000 nodes.
    """

    def __init__(self, nodes: MutableMapping[str, NodeLike], in_flight: MutableMapping[str, int]) -> None:
        self.nodes = nodes
        self.in_flight = in_flight
        # _takes_more, inlined: this and the first heap are a pass's work per node.
        count = in_flight.get
        self._free = {
            node_id
            for node_id, node in nodes.items()
            if node.connection_id
            and node.status in ASSIGNABLE_STATUSES
            and not node.draining
            and count(node_id, 0) < max(node.max_concurrent_tasks, 1)
        }
        self._versions: dict[str, int] = {}
        self._heaps: dict[tuple[str, str], list[tuple]] = {}

    def any_free(self) -> bool:
        return bool(self._free)

    def free_nodes(self) -> Iterable[NodeLike]:
        return (self.nodes[node_id] for node_id in self._free)

    def choose(self, task: TaskLike) -> NodeLike | None:
        """What ``choose_node(task, nodes, in_flight)`` answers."""
        if task.node_id:
            node = self.nodes.get(task.node_id)
            if node is None or task.node_id not in self._free:
                return None
            return node if is_eligible(node, task, self.in_flight.get(task.node_id, 0)) else None
        if task.tried_node_ids:
            return choose_node(task, self.free_nodes(), self.in_flight)
        requirement = (task.tool_name, task.capability or "")
        heap = self._heaps.get(requirement)
        if heap is None or len(heap) > 4 * len(self._free) + 64:  # new, or mostly older entries
            heap = self._heaps[requirement] = self._first_heap(*requirement)
        while heap:
            *_, node_id, version = heap[0]
            if version == self._versions.get(node_id, 0) and node_id in self._free:
                return self.nodes[node_id]
            heapq.heappop(heap)  # an older entry of a node that changed, or a full node
        return None

    def set_row(self, node_id: str, row: NodeLike | None) -> None:
        """A newer row of a node (None: no longer a candidate)."""
        if row is None:
            self.nodes.pop(node_id, None)
        else:
            self.nodes[node_id] = row
        self.update(node_id)

    def set_in_flight(self, counts: Mapping[str, int]) -> None:
        """In-flight counts read anew (by a later pass): only the nodes whose count
        changed are updated."""
        current = self.in_flight
        changed = {node_id for node_id, _ in current.items() ^ counts.items()}  # set operations in C
        current.clear()
        current.update(counts)
        for node_id in changed:
            self.update(node_id)

    def update(self, node_id: str) -> None:
        """The node's row (or its absence), in-flight count or last assignment changed."""
        self._versions[node_id] = self._versions.get(node_id, 0) + 1
        node = self.nodes.get(node_id)
        if node is None or not self._takes_more(node):
            self._free.discard(node_id)
            return
        self._free.add(node_id)
        for requirement, heap in self._heaps.items():
            if self._serves(node, *requirement):
                heapq.heappush(heap, self._entry(node))

    def _first_heap(self, tool_name: str, capability: str) -> list[tuple]:
        """``_entry`` of every free node that ``_serves`` the requirement, inlined."""
        nodes, count, versions = self.nodes, self.in_flight.get, self._versions
        heap = []
        for node_id in self._free:
            node = nodes[node_id]
            if capability and capability not in (node.capabilities or ()):
                continue
            if node.tools and tool_name not in node.tools:
                continue
            last = node.last_assigned_at
            heap.append(
                (
                    node.status != NodeStatus.ONLINE,
                    count(node_id, 0),
                    last.timestamp() if last else NEVER,
                    node_id,
                    versions.get(node_id, 0),
                )
            )
        heapq.heapify(heap)
        return heap

    def _takes_more(self, node: NodeLike) -> bool:
        return (
            is_connected(node)
            and accepts_new_work(node)
            and has_free_slot(node, self.in_flight.get(node.node_id, 0))
        )

    @staticmethod
    def _serves(node: NodeLike, tool_name: str, capability: str) -> bool:
        """Clauses 2 and 3 for an unpinned task of this tool and capability."""
        return (not capability or capability in (node.capabilities or [])) and (
            not node.tools or tool_name in node.tools
        )

    def _entry(self, node: NodeLike) -> tuple:
        """``preference_key`` of an untried node, then the version it was made at."""
        last = node.last_assigned_at.timestamp() if node.last_assigned_at else NEVER
        busy = node.status != NodeStatus.ONLINE
        in_flight = self.in_flight.get(node.node_id, 0)
        return (busy, in_flight, last, node.node_id, self._versions.get(node.node_id, 0))
