"""The connected nodes as the dispatch pass sees them: rows, and a copy of them kept
between passes of this process (``node_rows``). The copy is a per-process cache of
the database, never the truth: no other hub process needs to see it (STYLE), and no
decision that it could get wrong is made from it alone.

At 10,000 connected nodes reading them is ~30 ms, and a pass runs after every
submission and every result. A pass may start from rows read up to
``APEXBRIDGE_DISPATCH_NODE_ROWS_MS`` ago (default 1000), because nothing it decides
from them is final:

- an assignment is re-checked under the node's row lock (``task_queue.claim_task``);
  a row found out of date is replaced and the choice made again;
- "no node can take it" is never concluded from old rows: the pass first reads the
  rows of the nodes changed since (``Node.dispatch_changed_at``, stamped by every
  write of a field the pass decides by, in any process: ``refresh``), so a node
  that registered in another process a moment ago is seen — at the cost of the
  changes, not of every row (a full fleet runs into this on every pass);
- in-flight counts are read fresh by every pass.

- a retried task is never sent back to a node it already ran on from kept rows
  (they are brought up to date first: PROTOCOL §3.4 wants a different node when
  one is eligible).

The stamp is written by the hub's own code: a change it does not see (SQL by hand, a
hub process of an older release during a rolling upgrade, a host whose clock is more
than ``REFRESH_SLACK`` behind, rows read inside a transaction that then rolled back)
is seen when the kept rows age out, so it can delay a task by up to that age, never
more.

What old rows can change is only which of several eligible nodes a task goes to
(online over busy, round robin: approximate within the age). Registrations and
heartbeat revivals in this process, and any ``save()`` or ``delete()`` of a node
(tools, drain / resume, the admin), drop the kept rows at once; a disconnect
removes its node from them.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast
from django.db.models.signals import post_delete, post_save
from django.utils import timezone

from nodes import dispatch
from nodes.models import Node


@dataclass(slots=True)
class NodeRow:
    """What the dispatch pass needs of a connected node, read as a row: building
    10,000 model instances took ~200 ms of every pass."""

    node_id: str
    status: str
    connection_id: str
    capabilities: list
    tools: list
    draining: bool
    max_concurrent_tasks: int
    last_assigned_at: datetime | None


def connected_node_rows() -> dict[str, NodeRow]:
    """Every node a task could go to now."""
    connected = Node.objects.exclude(connection_id="").filter(status__in=dispatch.ASSIGNABLE_STATUSES)
    return {row.node_id: row for row in _rows(connected)}


def changed_node_rows(since: datetime) -> dict[str, NodeRow | None]:
    """The nodes whose ``dispatch_changed_at`` is ``since`` or later: the row of each
    that a task could go to now, None for the others."""
    return {
        row.node_id: row if dispatch.is_connected(row) else None
        for row in _rows(Node.objects.filter(dispatch_changed_at__gte=since))
    }


def _rows(nodes: QuerySet) -> list[NodeRow]:
    """Capabilities and tools are read as JSON text and each distinct text is parsed
    once per read: nodes of one kind declare the same lists, and parsing 20,000 of
    them was most of the read. The parsed lists are shared between rows; nothing in
    the pass changes them."""
    parsed: dict[str, list] = {}

    def parse(text: str | None) -> list:
        if text is None:
            return []
        value = parsed.get(text)
        if value is None:
            value = parsed[text] = json.loads(text)
        return value

    rows = (
        nodes.order_by()
        .annotate(capabilities_text=Cast("capabilities", TextField()), tools_text=Cast("tools", TextField()))
        .values_list(
            "node_id",
            "status",
            "connection_id",
            "capabilities_text",
            "tools_text",
            "draining",
            "max_concurrent_tasks",
            "last_assigned_at",
        )
    )
    return [
        NodeRow(node_id, status, connection_id, parse(caps), parse(tools), *rest)
        for node_id, status, connection_id, caps, tools, *rest in rows
    ]


# A change stamped this long before the rows were read may still have been missing
# from them (its transaction not yet committed, or another host's clock behind):
# ``refresh`` reads the changes from that far back.
REFRESH_SLACK = timedelta(seconds=10)


@dataclass(slots=True)
class PassStart:
    """What a dispatch pass starts from: the index over the node rows and in-flight
    counts (``index.nodes``, ``index.in_flight``: the pass's own to change), whether
    the rows were read just now, and where they came from (to ``put`` newer rows
    back, and to ``keep`` the index for the next pass)."""

    index: dispatch.FreeNodeIndex
    fresh: bool
    generation: int
    position: int


class NodeRowCache:
    """This process's last read of the connected nodes (thread-safe: passes also run
    outside the database thread, in admin requests and management commands). Rows
    are never changed in place: a pass that learns something newer puts a new row.

    It also keeps the last pass's ``FreeNodeIndex`` (built from these rows, one look
    at every node): the next pass takes it and updates only the nodes whose row
    changed since (logged by ``put`` and ``discard``) or whose in-flight count did.
    A pass has the index to itself; one that finds none builds its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, NodeRow] | None = None
        self._read_at = 0.0
        self._read_wall: datetime | None = None  # when the rows were read, by the clock writers stamp with
        self._generation = 0
        self._changed: list[str] = []  # nodes whose row changed, in order, this generation
        self._kept: PassStart | None = None

    def get(self, *, fresh: bool = False) -> tuple[dict[str, NodeRow], bool, int]:
        """A copy of the rows (the pass adds and removes entries), whether they were
        read just now, and the generation to ``put`` newer rows back into."""
        rows, fresh, generation, _ = self._get(fresh)
        return rows, fresh, generation

    def _get(self, fresh: bool) -> tuple[dict[str, NodeRow], bool, int, int]:
        max_age_s = settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS / 1000
        with self._lock:
            if not fresh and self._rows is not None and time.monotonic() - self._read_at < max_age_s:
                return dict(self._rows), False, self._generation, len(self._changed)
            generation = self._generation
        started, started_wall = time.monotonic(), timezone.now()
        rows = connected_node_rows()
        with self._lock:
            # Not kept if dropped while read. (Rows read inside a transaction that
            # then rolls back — the admin's node actions run a pass inside theirs —
            # are kept: like any kept row they only steer a choice the claim checks.)
            if self._generation == generation:
                self._new_generation()
                generation = self._generation
                self._rows, self._read_at, self._read_wall = rows, started, started_wall
        return dict(rows), True, generation, 0

    def _new_generation(self) -> None:
        """Older passes' ``put``s miss from now on; the kept index is of older rows."""
        self._generation += 1
        self._changed = []
        self._kept = None

    def start_pass(self, in_flight: dict[str, int], *, fresh: bool = False) -> PassStart:
        """The index a dispatch pass starts from, with these in-flight counts (read
        by the pass): the one kept from the previous pass brought up to date when
        its rows may still be used, else one built from the rows."""
        max_age_s = settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS / 1000
        with self._lock:
            kept, self._kept = self._kept, None
            usable = (
                not fresh
                and kept is not None
                and self._rows is not None
                and kept.generation == self._generation
                and time.monotonic() - self._read_at < max_age_s
            )
            if usable:
                changed = {node_id: self._rows.get(node_id) for node_id in self._changed[kept.position :]}
                position = len(self._changed)
        if usable:
            index = kept.index
            for node_id, row in changed.items():
                index.set_row(node_id, row)
            index.set_in_flight(in_flight)
            return PassStart(index, False, kept.generation, position)
        rows, is_fresh, generation, position = self._get(fresh)
        return PassStart(dispatch.FreeNodeIndex(rows, in_flight), is_fresh, generation, position)

    def refresh(self, start: PassStart) -> bool:
        """Bring the pass's rows (and the kept ones) up to date with the nodes whose
        row changed since the rows were read (``Node.dispatch_changed_at``, stamped by
        every change that may let a node take a task, in any process): what reading
        every row again would tell a pass about free nodes, at the cost of the
        changes. False when the rows were dropped or read again since (read them)."""
        with self._lock:
            if self._rows is None or self._generation != start.generation or self._read_wall is None:
                return False
            since = self._read_wall - REFRESH_SLACK
        for node_id, row in changed_node_rows(since).items():
            if start.index.nodes.get(node_id) != row:  # the window's other rows are known
                start.index.set_row(node_id, row)
                self.put(start.generation, node_id, row)
        return True

    def keep(self, start: PassStart) -> None:
        """Keep a pass's index (brought up to date by the pass itself) for the next
        pass; ignored when its rows were dropped or read again since."""
        with self._lock:
            if self._rows is not None and self._generation == start.generation:
                self._kept = start

    def put(self, generation: int, node_id: str, row: NodeRow | None) -> None:
        """A newer row of one node (None: no longer a candidate), learnt by a pass
        that started from ``generation``; ignored if the rows were dropped or read
        again since."""
        with self._lock:
            if self._rows is not None and self._generation == generation:
                if row is None:
                    self._rows.pop(node_id, None)
                else:
                    self._rows[node_id] = row
                self._changed.append(node_id)

    def discard(self, node_id: str) -> None:
        """The node is gone from this process (disconnected): not a candidate, after
        the commit. Cheaper than ``drop`` for the common change of a large fleet."""

        def discard() -> None:
            with self._lock:
                if self._rows is not None:
                    self._rows.pop(node_id, None)
                    self._changed.append(node_id)

        transaction.on_commit(discard)

    def drop(self) -> None:
        """Forget the rows (a node changed in this process); after the commit too, so a
        pass that read them in between does not keep the old state."""
        self.forget()
        transaction.on_commit(self.forget)

    def forget(self) -> None:
        with self._lock:
            self._rows = None
            self._new_generation()


def as_row(node: NodeRow | Node, **changes: object) -> NodeRow:
    """A new row with the dispatch fields of ``node`` (a row or a model instance)."""
    row = NodeRow(
        node.node_id,
        node.status,
        node.connection_id,
        node.capabilities,
        node.tools,
        node.draining,
        node.max_concurrent_tasks,
        node.last_assigned_at,
    )
    return replace(row, **changes) if changes else row


node_rows = NodeRowCache()


def _node_changed(**kwargs) -> None:  # noqa: ANN003 - a signal receiver
    node_rows.drop()


post_save.connect(_node_changed, sender=Node, dispatch_uid="node_rows.saved")
post_delete.connect(_node_changed, sender=Node, dispatch_uid="node_rows.deleted")
