"""Node registry services (PROTOCOL §2): status, liveness, unregistration, tools and
logs (registration is ``nodes.registration_services``). Every write happens here, in
one transaction per unit of work, and events are published after commit.

Liveness writes are conditional (``… WHERE connection_id = mine``, ``… WHERE status
<> 'offline' AND last_heartbeat < cutoff``) so several hub processes can run the same
sweeps at once without double effects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from nodes import events
from nodes.auth import KeyIdentity
from nodes.models import HubProcess, Node, NodeLog, NodeProtocol, NodeStatus
from nodes.node_rows import node_rows
from nodes.protocol import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)

LIVE_STATUSES = (NodeStatus.ONLINE, NodeStatus.BUSY, NodeStatus.UNKNOWN)


def requeue_attempts(node_id: str, *, connection_id: str | None, reason: str) -> None:
    # Imported here: task services import this module too.
    from nodes.task_services import task_release_node_attempts

    task_release_node_attempts(node_id=node_id, connection_id=connection_id, reason=reason)


def check_key_allows(identity: KeyIdentity, node_id: str | None, capabilities: list[str]) -> None:
    """Refuse (``forbidden``) a node id or capabilities the key does not allow."""
    if identity.node_id and node_id and node_id != identity.node_id:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"This key may only register node id {identity.node_id!r}")
    if identity.capabilities:
        extra = sorted(set(capabilities) - set(identity.capabilities))
        if extra:
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"This key may not register capabilities: {', '.join(extra)}"
            )


def node_log_add(
    *, node_id: str, message: str, level: str = "info", event: str = "hub", context: dict | None = None
) -> None:
    NodeLog.objects.create(
        node_id=node_id, level=level, event=event, message=message[:10000], context=context or {}
    )


def publish_status(node_id: str, old: str, new: str) -> None:
    if old != new:
        events.publish("node_status_changed", {"nodeId": node_id, "oldStatus": old, "newStatus": new})


@transaction.atomic
def node_set_status(*, node_id: str, connection_id: str, status: str) -> str | None:
    """Set the status of a connected node; returns the previous status, or None if the
    node is no longer on this connection (taken over or unregistered)."""
    node = Node.objects.select_for_update().filter(pk=node_id, connection_id=connection_id).first()
    if node is None:
        return None
    old = node.status
    now = timezone.now()
    changes = {"status": status, "last_heartbeat": now, "last_seen": now}
    if old != status:  # e.g. offline -> online: a candidate again (node_rows)
        changes["dispatch_changed_at"] = now
    Node.objects.filter(pk=node_id).update(**changes)
    if old != status:
        node_log_add(node_id=node_id, event="status", message=f"status {old} -> {status}")
        publish_status(node_id, old, status)
    return old


@transaction.atomic
def node_disconnected(*, node_id: str, connection_id: str) -> bool:
    """The node's socket closed: offline at once, its attempts go back to the queue."""
    node = Node.objects.select_for_update().filter(pk=node_id, connection_id=connection_id).first()
    if node is None:
        return False  # already taken over by a newer connection, or unregistered
    old = node.status
    now = timezone.now()
    Node.objects.filter(pk=node_id).update(
        status=NodeStatus.OFFLINE,
        connection_id="",
        channel_name="",
        process_id="",
        last_seen=now,
        dispatch_changed_at=now,
    )
    requeue_attempts(node_id, connection_id=connection_id, reason="node_disconnected")
    node_rows.discard(node_id)
    node_log_add(node_id=node_id, event="disconnected", message="connection closed")
    publish_status(node_id, old, NodeStatus.OFFLINE)
    logger.info("node %s disconnected (%s)", node_id, connection_id)
    return True


@transaction.atomic
def node_unregister(*, node_id: str, reason: str, connection_id: str | None = None) -> Node | None:
    """Remove a node from the registry (PROTOCOL §2.3); its task history stays."""
    query = Node.objects.select_for_update().filter(pk=node_id)
    if connection_id is not None:
        query = query.filter(connection_id=connection_id)
    node = query.first()
    if node is None:
        return None
    requeue_attempts(node_id, connection_id=None, reason="node_unregistered")
    node.delete()
    node_log_add(node_id=node_id, event="node_unregistered", message=f"unregistered: {reason}")
    events.publish("node_unregistered", {"nodeId": node_id, "reason": reason})
    logger.info("node %s unregistered: %s", node_id, reason)
    return node


@transaction.atomic
def node_set_tools(
    *,
    node_id: str,
    connection_id: str,
    tools: list[str],
    manifests: list[dict[str, Any]] | None,
    identity: KeyIdentity | None = None,
) -> Node | None:
    node = Node.objects.select_for_update().filter(pk=node_id, connection_id=connection_id).first()
    if node is None:
        return None
    node.tools = list(dict.fromkeys(tools))
    if node.protocol == NodeProtocol.VCP:
        # A VCP node's tools are its capabilities: the key must allow them, as at
        # registration (otherwise a second register_tools widened a restricted key).
        if identity is not None:
            check_key_allows(identity, None, node.tools)
        node.capabilities = list(node.tools)
    if manifests is not None:
        node.tool_manifests = manifests
    node.save(update_fields=["tools", "capabilities", "tool_manifests"])
    return node


def node_remove_tools(*, node_id: str, connection_id: str, tools: list[str]) -> Node | None:
    with transaction.atomic():
        node = Node.objects.select_for_update().filter(pk=node_id, connection_id=connection_id).first()
        if node is None:
            return None
        removed = set(tools)
        manifests = [m for m in node.tool_manifests or [] if m.get("name") not in removed]
        return node_set_tools(
            node_id=node_id,
            connection_id=connection_id,
            tools=[t for t in node.tools if t not in removed],
            manifests=manifests,
        )


def node_set_ips(*, node_id: str, connection_id: str, ips: dict[str, Any]) -> bool:
    return bool(Node.objects.filter(pk=node_id, connection_id=connection_id).update(ips=ips))


@transaction.atomic
def node_set_draining(*, node_id: str, draining: bool) -> Node | None:
    node = Node.objects.select_for_update().filter(pk=node_id).first()
    if node is None:
        return None
    if node.draining != draining:
        node.draining = draining
        node.save(update_fields=["draining"])
        node_log_add(node_id=node_id, event="control", message="draining" if draining else "resumed")
    return node


# --- liveness ---------------------------------------------------------------------------
@dataclass
class HeartbeatRecord:
    node_id: str
    connection_id: str
    at: datetime
    stats: dict[str, Any] | None = None
    resources: dict[str, Any] | None = None


def node_flush_heartbeats(records: list[HeartbeatRecord]) -> list[str]:
    """Write buffered heartbeats in one transaction; returns ids of nodes that came
    back online (they were marked offline while their socket stayed open)."""
    revived: list[str] = []
    if not records:
        return revived
    with transaction.atomic():
        # Rows are updated (and locked) in node-id order, as other batches lock them.
        records = sorted(records, key=lambda r: r.node_id)
        plain = [r for r in records if r.stats is None and r.resources is None]
        _touch_heartbeats(plain)
        for record in records:
            if record.stats is None and record.resources is None:
                continue
            fields: dict[str, Any] = {"last_heartbeat": record.at, "last_seen": record.at}
            if record.stats is not None:
                fields["reported_stats"] = record.stats
            if record.resources is not None:
                fields["reported_resources"] = record.resources
            Node.objects.filter(pk=record.node_id, connection_id=record.connection_id).update(**fields)
        by_id = {r.node_id: r.connection_id for r in records}
        for node_id, connection_id in _offline_but_connected(list(by_id)):
            if by_id[node_id] != connection_id:
                continue
            if Node.objects.filter(pk=node_id, connection_id=connection_id, status=NodeStatus.OFFLINE).update(
                status=NodeStatus.ONLINE, dispatch_changed_at=timezone.now()
            ):
                revived.append(node_id)
                node_rows.drop()  # a candidate again
                node_log_add(node_id=node_id, event="status", message="status offline -> online")
                publish_status(node_id, NodeStatus.OFFLINE, NodeStatus.ONLINE)
    return revived


TOUCH_BATCH = 500


def _offline_but_connected(node_ids: list[str]) -> list[tuple[str, str]]:
    """(node id, connection id) of those nodes marked offline while a connection is
    still theirs. Plain SQL: the ORM took milliseconds of the event loop's GIL to
    build an ``IN`` of 1,000 ids on every flush, which showed in the heartbeat ack
    tail (docs/BENCHMARKS.md, session 7)."""
    table = connection.ops.quote_name(Node._meta.db_table)
    found: list[tuple[str, str]] = []
    with connection.cursor() as cursor:
        for start in range(0, len(node_ids), TOUCH_BATCH):
            batch = node_ids[start : start + TOUCH_BATCH]
            placeholders = ", ".join(["%s"] * len(batch))
            cursor.execute(
                f"SELECT node_id, connection_id FROM {table} "  # noqa: S608 - placeholders only
                f"WHERE status = %s AND connection_id <> '' AND node_id IN ({placeholders})",
                [NodeStatus.OFFLINE.value, *batch],
            )
            found.extend(cursor.fetchall())
    return found


def _sqlite_datetime(value: datetime) -> str:
    """What Django stores on SQLite for a datetime (naive text in the database's time
    zone), without its per-value conversion when both are UTC (1,000 per flush)."""
    if value.tzinfo is UTC and connection.timezone is UTC:
        return str(value.replace(tzinfo=None))
    return connection.ops.adapt_datetimefield_value(value)


def _touch_heartbeats(records: list[HeartbeatRecord]) -> None:
    """``last_heartbeat = last_seen = at`` for many nodes, each only while it is still
    on the connection that heartbeated: one ``UPDATE … FROM (VALUES …)`` per batch on
    SQLite and PostgreSQL (one UPDATE per node took the flush of 1,000 nodes from
    milliseconds to a large share of a second, stalling the event loop)."""
    vendor = connection.vendor
    if vendor not in ("sqlite", "postgresql"):
        for record in records:
            Node.objects.filter(pk=record.node_id, connection_id=record.connection_id).update(
                last_heartbeat=record.at, last_seen=record.at
            )
        return
    table = connection.ops.quote_name(Node._meta.db_table)
    adapt = _sqlite_datetime if vendor == "sqlite" else connection.ops.adapt_datetimefield_value
    for start in range(0, len(records), TOUCH_BATCH):
        batch = records[start : start + TOUCH_BATCH]
        params: list[Any] = []
        for record in batch:
            params += [
                record.node_id,
                record.connection_id,
                adapt(record.at),
            ]
        if vendor == "postgresql":
            values = ", ".join(["(%s, %s, %s::timestamptz)"] * len(batch))
            sql = (
                f"UPDATE {table} AS n SET last_heartbeat = v.at, last_seen = v.at "  # noqa: S608 - placeholders only
                f"FROM (VALUES {values}) AS v(node_id, connection_id, at) "
                "WHERE n.node_id = v.node_id AND n.connection_id = v.connection_id"
            )
        else:
            values = ", ".join(["(%s, %s, %s)"] * len(batch))
            sql = (
                f"UPDATE {table} SET last_heartbeat = v.column3, last_seen = v.column3 "  # noqa: S608 - placeholders only
                f"FROM (VALUES {values}) AS v "
                f"WHERE {table}.node_id = v.column1 AND {table}.connection_id = v.column2"
            )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)


def node_sweep_heartbeat_timeouts(*, now: datetime | None = None) -> list[tuple[str, str]]:
    """Mark nodes silent for longer than the heartbeat timeout offline. Returns
    (node_id, channel_name) of the nodes this call marked, so their connections can
    be told. Safe to run in several processes at once."""
    now = now or timezone.now()
    cutoff = now - timedelta(milliseconds=settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS)
    marked: list[tuple[str, str]] = []
    candidates = list(
        Node.objects.filter(status__in=LIVE_STATUSES, last_heartbeat__lt=cutoff).values_list(
            "node_id", "status", "connection_id", "channel_name"
        )
    )
    for node_id, old_status, _connection_id, channel_name in candidates:
        with transaction.atomic():
            won = Node.objects.filter(pk=node_id, status=old_status, last_heartbeat__lt=cutoff).update(
                status=NodeStatus.OFFLINE, dispatch_changed_at=now
            )
            if not won:
                continue  # another process did it, or a heartbeat arrived
            requeue_attempts(node_id, connection_id=None, reason="node_offline")
            node_log_add(
                node_id=node_id,
                level="warn",
                event="heartbeat_timeout",
                message=f"no heartbeat for {settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS} ms: offline",
            )
            publish_status(node_id, old_status, NodeStatus.OFFLINE)
        logger.warning("node %s missed its heartbeat timeout: offline", node_id)
        marked.append((node_id, channel_name))
    return marked


def node_check_heartbeat(*, node_id: str) -> Node | None:
    """Re-evaluate one node's heartbeat timeout now (admin heartbeat-check)."""
    node = Node.objects.filter(pk=node_id).first()
    if node is None:
        return None
    cutoff = timezone.now() - timedelta(milliseconds=settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS)
    if node.status in LIVE_STATUSES and (node.last_heartbeat is None or node.last_heartbeat < cutoff):
        node_sweep_heartbeat_timeouts()
        node.refresh_from_db()
    return node


# --- hub processes ----------------------------------------------------------------------
def process_beat(*, process_id: str, hostname: str, pid: int) -> None:
    now = timezone.now()
    updated = HubProcess.objects.filter(pk=process_id).update(last_beat_at=now, stopped_at=None)
    if not updated:
        HubProcess.objects.update_or_create(
            process_id=process_id,
            defaults={"hostname": hostname, "pid": pid, "started_at": now, "last_beat_at": now},
        )


def process_reap(*, current_process_id: str, everyone_else_is_dead: bool = False) -> list[str]:
    """Find hub processes that stopped beating; their nodes go offline and their
    attempts go back to the queue. With the in-memory channel layer only one hub
    process can exist, so at start-up every other process is known to be dead."""
    now = timezone.now()
    stale = HubProcess.objects.filter(stopped_at__isnull=True).exclude(pk=current_process_id)
    if not everyone_else_is_dead:
        stale = stale.filter(
            last_beat_at__lt=now - timedelta(milliseconds=settings.APEXBRIDGE_PROCESS_TIMEOUT_MS)
        )
    reaped = []
    for process_id in list(stale.values_list("process_id", flat=True)):
        if HubProcess.objects.filter(pk=process_id, stopped_at__isnull=True).update(stopped_at=now):
            reaped.append(process_id)
    orphaned = Node.objects.exclude(connection_id="").exclude(process_id=current_process_id)
    if not everyone_else_is_dead:
        orphaned = orphaned.filter(
            process_id__in=list(
                HubProcess.objects.filter(stopped_at__isnull=False).values_list("process_id", flat=True)
            )
        )
    for node_id, connection_id in list(orphaned.values_list("node_id", "connection_id")):
        if node_disconnected(node_id=node_id, connection_id=connection_id):
            logger.info("node %s belonged to a hub process that is gone", node_id)
    if reaped:
        logger.info("hub processes gone: %s", ", ".join(reaped))
    return reaped


def process_stopped(*, process_id: str) -> None:
    HubProcess.objects.filter(pk=process_id).update(stopped_at=timezone.now())


def node_logs_prune() -> int:
    """Keep at most APEXBRIDGE_NODE_LOG_CAP log lines per node."""
    cap = settings.APEXBRIDGE_NODE_LOG_CAP
    deleted = 0
    heavy = (
        NodeLog.objects.values("node_id")
        .annotate(n=Count("id"))
        .filter(n__gt=cap)
        .values_list("node_id", flat=True)
    )
    for node_id in list(heavy):
        keep_from = (
            NodeLog.objects.filter(node_id=node_id)
            .order_by("-timestamp", "-id")
            .values_list("id", flat=True)[cap - 1]
        )
        deleted += NodeLog.objects.filter(node_id=node_id, id__lt=keep_from).delete()[0]
    return deleted
