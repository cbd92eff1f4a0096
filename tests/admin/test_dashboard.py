"""The live dashboard page and its snapshot endpoint (staff only)."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from llmproxy.models import LLMRequestLog
from nodes.models import Task

pytestmark = pytest.mark.django_db


def test_dashboard_renders_a_snapshot_and_its_assets(client_admin, make_node):
    make_node("n1")
    make_node("n2", status="offline", connection_id="")
    Task.objects.create(task_id="t1", tool_name="echo", status="assigned", assigned_node_id="n1")
    LLMRequestLog.objects.create(node_id="n1", request_id="r1", outcome="succeeded", total_tokens=21)

    response = client_admin.get(reverse("admin-dashboard"))
    assert response.status_code == 200
    page = response.content.decode()
    for asset in (
        "apexbridge/vendor/chartjs/chart.umd.min.js",
        "apexbridge/dashboard.js",
        "apexbridge/dashboard.css",
    ):
        assert asset in page
    assert "cdn" not in page.lower()
    snapshot = response.context["snapshot"]
    assert [node["nodeId"] for node in snapshot["nodes"]] == ["n1", "n2"]
    assert snapshot["nodes"][0]["activeTasks"] == 1
    assert snapshot["nodeCounts"]["online"] == 1 and snapshot["nodeCounts"]["offline"] == 1
    assert snapshot["taskCounts"]["assigned"] == 1
    assert snapshot["tokensByNode"] == [{"nodeId": "n1", "tokens": 21, "requests": 1}]
    assert snapshot["llm"]["tokens"] == 21
    assert len(snapshot["tasksPerMinute"]) == 30
    assert sum(bucket["queued"] for bucket in snapshot["tasksPerMinute"]) == 1
    assert 'id="dashboard-snapshot"' in page


def test_snapshot_endpoint(client_admin, make_node):
    make_node("n1")
    now = timezone.now()
    Task.objects.create(task_id="t1", tool_name="echo", status="succeeded", finished_at=now)
    Task.objects.create(task_id="t2", tool_name="echo", status="failed", finished_at=now)
    body = json.loads(client_admin.get(reverse("admin-dashboard-data")).content)
    assert body["nodes"][0]["nodeId"] == "n1"
    last = body["tasksPerMinute"][-1]
    assert last["succeeded"] == 1 and last["failed"] == 1
    assert [task["taskId"] for task in body["recentTasks"]] == ["t2", "t1"]


@pytest.mark.parametrize("name", ["admin-dashboard", "admin-dashboard-data"])
def test_dashboard_is_staff_only(client, db, name):
    response = client.get(reverse(name))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    client.force_login(get_user_model().objects.create_user("plain", password="x-password-1"))
    response = client.get(reverse(name))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_vendored_chart_library_is_served(client_admin):
    response = client_admin.get("/static/apexbridge/vendor/chartjs/chart.umd.min.js")
    assert response.status_code == 200
    assert b"Chart.js v4" in b"".join(response.streaming_content)[:200]
