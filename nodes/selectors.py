"""Read-only queries of the nodes app (no writes here): node reads for the admin API,
the Django admin, the dashboard and the management commands, and task reads.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import BooleanField, Count, Q, QuerySet, Sum
from django.db.models.expressions import RawSQL
from django.utils import timezone

from apexbridge.db.prepared import Param, PreparedQuery
from nodes.models import Node, NodeLog, NodeStatus, Task, TaskStatus
from nodes.protocol import dt_ms

# =====================================================================================
# node selectors
# =====================================================================================

NODE_LOG_LEVELS = ("debug", "info", "warn", "error")


def _json_list_has(queryset: QuerySet[Node], field: str, value: str) -> QuerySet[Node]:
    """Nodes whose JSON list ``field`` holds ``value`` exactly.

    ``JSONField`` ``__contains`` is not supported on SQLite, so SQLite asks
    ``json_each`` instead; PostgreSQL (and MySQL) use the native containment test,
    which PostgreSQL can serve from a GIN index.
    """
    if connection.features.supports_json_field_contains:
        return queryset.filter(**{f"{field}__contains": [value]})
    table = Node._meta.db_table
    column = Node._meta.get_field(field).column
    # The identifiers come from the model, never from the request; the value is a parameter.
    sql = f'EXISTS (SELECT 1 FROM json_each("{table}"."{column}") WHERE json_each.value = %s)'  # noqa: S608
    alias = f"_has_{field}"
    return queryset.alias(**{alias: RawSQL(sql, [value], output_field=BooleanField())}).filter(  # noqa: S611
        **{alias: True}
    )


def node_list(
    *,
    type: str | None = None,  # noqa: A002 - the API's own parameter name
    status: str | None = None,
    capability: str | None = None,
    tag: str | None = None,
    search: str | None = None,
) -> QuerySet[Node]:
    """Registered nodes, filtered as ``GET /api/admin/nodes`` and the ``nodes`` command do."""
    queryset = Node.objects.all().order_by("node_id")
    if type:
        queryset = queryset.filter(type=type)
    if status:
        queryset = queryset.filter(status=status)
    if capability:
        queryset = _json_list_has(queryset, "capabilities", capability)
    if tag:
        queryset = _json_list_has(queryset, "tags", tag)
    if search:
        queryset = queryset.filter(
            Q(node_id__icontains=search) | Q(name__icontains=search) | Q(endpoint__icontains=search)
        )
    return queryset


def node_get(*, node_id: str) -> Node | None:
    return Node.objects.filter(pk=node_id).first()


def node_active_task_count(*, node_id: str) -> int:
    return Task.objects.filter(assigned_node_id=node_id, status=TaskStatus.ASSIGNED).count()


def node_stats(*, node: Node, now: datetime | None = None) -> dict[str, Any]:
    """``GET /api/admin/nodes/<id>/stats``: hub-kept counters plus uptime (ms connected
    and live; 0 when offline or disconnected)."""
    now = now or timezone.now()
    live = node.is_connected and node.status in (NodeStatus.ONLINE, NodeStatus.BUSY)
    uptime = int((now - node.connected_at).total_seconds() * 1000) if live and node.connected_at else 0
    average = round(node.total_response_time_ms / node.completed_tasks, 1) if node.completed_tasks else 0
    return {
        "totalTasks": node.total_tasks,
        "completedTasks": node.completed_tasks,
        "failedTasks": node.failed_tasks,
        "activeTasks": node_active_task_count(node_id=node.node_id),
        "averageResponseTime": average,
        "uptime": max(uptime, 0),
        "lastHeartbeat": dt_ms(node.last_heartbeat),
    }


def node_log_list(*, node_id: str, limit: int = 100, level: str | None = None) -> list[NodeLog]:
    """The node's newest log lines first."""
    queryset = NodeLog.objects.filter(node_id=node_id)
    if level:
        queryset = queryset.filter(level=level)
    return list(queryset.order_by("-timestamp", "-id")[:limit])


def node_log_data(entry: NodeLog) -> dict[str, Any]:
    return {
        "timestamp": dt_ms(entry.timestamp),
        "level": entry.level,
        "event": entry.event,
        "message": entry.message,
        "context": entry.context or {},
    }


def node_counts_by_status() -> dict[str, int]:
    """Registered nodes per status (every status present, zeros included), plus
    ``total``, ``connected`` and ``draining``."""
    counts = dict.fromkeys(NodeStatus.values, 0)
    for row in Node.objects.values("status").annotate(n=Count("node_id")):
        counts[row["status"]] = row["n"]
    counts["total"] = sum(counts[status] for status in NodeStatus.values)
    counts["connected"] = Node.objects.exclude(connection_id="").count()
    counts["draining"] = Node.objects.filter(draining=True).count()
    return counts


def node_recent_tasks(*, node_id: str, limit: int = 10) -> list[Task]:
    return list(task_list(node_id=node_id)[:limit])


def _utc_day_start(now: datetime | None = None) -> datetime:
    return (now or timezone.now()).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def node_llm_usage_today(*, node_id: str, recent: int = 10) -> dict[str, Any]:
    """A node's LLM requests and tokens since 00:00 UTC, and its latest requests."""
    from llmproxy.models import LLMRequestLog

    rows = LLMRequestLog.objects.filter(node_id=node_id, created_at__gte=_utc_day_start())
    totals = rows.aggregate(requests=Count("id"), tokens=Sum("total_tokens"))
    return {
        "requests": totals["requests"],
        "tokens": totals["tokens"] or 0,
        "recent": list(LLMRequestLog.objects.filter(node_id=node_id).order_by("-created_at", "-id")[:recent]),
    }


def llm_tokens_today_by_node(*, limit: int = 20) -> list[dict[str, Any]]:
    """Tokens (and requests) per node since 00:00 UTC, biggest users first."""
    from llmproxy.models import LLMRequestLog

    rows = (
        LLMRequestLog.objects.filter(created_at__gte=_utc_day_start())
        .values("node_id")
        .annotate(tokens=Sum("total_tokens"), requests=Count("id"))
        .order_by("-tokens", "node_id")[:limit]
    )
    return [{"nodeId": r["node_id"], "tokens": r["tokens"] or 0, "requests": r["requests"]} for r in rows]


def llm_recent_requests(*, limit: int = 15) -> list[dict[str, Any]]:
    from llmproxy.models import LLMRequestLog

    return [
        {
            "requestId": row.request_id,
            "nodeId": row.node_id,
            "model": row.model,
            "outcome": row.outcome,
            "totalTokens": row.total_tokens,
            "errorCode": row.error_code or None,
            "timestamp": dt_ms(row.created_at),
        }
        for row in LLMRequestLog.objects.order_by("-created_at", "-id")[:limit]
    ]


def tasks_per_minute(*, minutes: int = 30, now: datetime | None = None) -> list[dict[str, Any]]:
    """Tasks created and finished (by outcome) per minute over the last ``minutes``
    minutes, oldest first (the dashboard chart). Bucketed in Python so the same code
    runs on SQLite and PostgreSQL."""
    now = now or timezone.now()
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    buckets = [
        {"minute": dt_ms(start + timedelta(minutes=i)), "queued": 0, "succeeded": 0, "failed": 0}
        for i in range(minutes)
    ]

    def index(moment: datetime) -> int:
        return int((moment - start).total_seconds() // 60)

    for created_at in Task.objects.filter(created_at__gte=start).values_list("created_at", flat=True):
        if 0 <= index(created_at) < minutes:
            buckets[index(created_at)]["queued"] += 1
    finished = Task.objects.filter(finished_at__gte=start).values_list("finished_at", "status")
    for finished_at, status in finished:
        slot = index(finished_at)
        if 0 <= slot < minutes:
            buckets[slot]["succeeded" if status == TaskStatus.SUCCEEDED else "failed"] += 1
    return buckets


# =====================================================================================
# task selectors
# =====================================================================================


_TASK = PreparedQuery(lambda: Task.objects.filter(pk=Param("task_id"))[:1])


def task_get(*, task_id: str) -> Task | None:
    """One task (read several times per task: by ``?wait=`` and the submit view)."""
    return _TASK.first(task_id=task_id)


def task_list(
    *, status: str | None = None, node_id: str | None = None, tool_name: str | None = None
) -> QuerySet[Task]:
    """Tasks, newest first. ``node_id`` matches the node that runs (or last ran) the
    task and tasks pinned to it."""
    queryset = Task.objects.all()
    if status:
        queryset = queryset.filter(status=status)
    if node_id:
        queryset = queryset.filter(Q(assigned_node_id=node_id) | Q(node_id=node_id))
    if tool_name:
        queryset = queryset.filter(tool_name=tool_name)
    return queryset.order_by("-created_at", "task_id")


def task_list_pending() -> QuerySet[Task]:
    """Queued tasks in dispatch order: priority 10 first, oldest first within one."""
    return Task.objects.filter(status=TaskStatus.QUEUED).order_by("-priority", "created_at", "task_id")


def task_counts_by_status() -> dict[str, int]:
    """Tasks per status, every status present (zeros included)."""
    counts = dict.fromkeys(TaskStatus.values, 0)
    rows = Task.objects.values_list("status").annotate(n=Count("task_id")).values_list("status", "n")
    for status, n in rows:
        counts[status] = n
    return counts


def node_active_task_counts(node_ids) -> dict[str, int]:
    """Tasks in flight (``assigned``) per node id; every asked id present."""
    node_ids = list(node_ids)
    counts = dict.fromkeys(node_ids, 0)
    rows = (
        Task.objects.filter(status=TaskStatus.ASSIGNED, assigned_node_id__in=node_ids)
        .values_list("assigned_node_id")
        .annotate(n=Count("task_id"))
        .values_list("assigned_node_id", "n")
    )
    for node_id, n in rows:
        counts[node_id] = n
    return counts
