"""The live dashboard inside the admin (``/admin/dashboard/``), staff only.

The page renders a snapshot of the hub, then ``static/apexbridge/dashboard.js``
keeps it current from ``/ws/admin/events/`` (PROTOCOL §5). Events are at-most-once,
so the page also re-reads the snapshot (``/admin/dashboard/data``) after bursts of
events and every 30 seconds.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import admin
from django.http import JsonResponse
from django.template.response import TemplateResponse
from django.urls import path

from llmproxy.selectors import llm_stats_today
from nodes import selectors
from nodes.protocol import node_info_data, now_ms

MAX_NODES_SHOWN = 1000


def _task_summary(task) -> dict[str, Any]:
    return {
        "taskId": task.task_id,
        "toolName": task.tool_name,
        "status": task.status,
        "assignedNodeId": task.assigned_node_id or None,
        "attempts": task.attempts,
        "executionTime": task.execution_time_ms,
        "createdAt": int(task.created_at.timestamp() * 1000),
        "finishedAt": int(task.finished_at.timestamp() * 1000) if task.finished_at else None,
    }


def dashboard_snapshot() -> dict[str, Any]:
    nodes = list(selectors.node_list()[:MAX_NODES_SHOWN])
    in_flight = selectors.node_active_task_counts(node.node_id for node in nodes)
    node_rows = []
    for node in nodes:
        info = node_info_data(node)
        info["activeTasks"] = in_flight.get(node.node_id, 0)
        node_rows.append(info)
    return {
        "serverTime": now_ms(),
        "heartbeatTimeout": settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS,
        "nodes": node_rows,
        "nodeCounts": selectors.node_counts_by_status(),
        "taskCounts": selectors.task_counts_by_status(),
        "tasksPerMinute": selectors.tasks_per_minute(minutes=30),
        "recentTasks": [_task_summary(task) for task in selectors.task_list()[:15]],
        "llm": llm_stats_today(),
        "tokensByNode": selectors.llm_tokens_today_by_node(limit=15),
        "recentLlm": selectors.llm_recent_requests(limit=15),
    }


def dashboard(request):
    context = {
        **admin.site.each_context(request),
        "title": "Live dashboard",
        "snapshot": dashboard_snapshot(),
    }
    return TemplateResponse(request, "admin/dashboard.html", context)


def dashboard_data(request):
    return JsonResponse(dashboard_snapshot())


# Mounted at admin/dashboard/ by apexbridge/urls.py; admin_view means staff only.
dashboard_urlpatterns = [
    path("", admin.site.admin_view(dashboard), name="admin-dashboard"),
    path("data", admin.site.admin_view(dashboard_data), name="admin-dashboard-data"),
]
