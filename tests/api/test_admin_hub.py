"""Hub-wide admin endpoints: ``/api/admin/stats``, ``/api/admin/tasks``,
``/api/admin/quotas/<nodeId>``."""

from __future__ import annotations

import pytest
from django.utils import timezone

from llmproxy.models import LLMRequestLog
from nodes.models import Task
from quotas.models import QuotaPolicy
from tests.api.test_admin_auth import assert_error

pytestmark = pytest.mark.django_db


def test_stats_counts_nodes_tasks_and_llm_today(staff_client, make_node):
    make_node("a")
    make_node("b", status="busy", draining=True)
    make_node("c", status="offline", connection_id="")
    Task.objects.create(task_id="t1", tool_name="echo", status="queued")
    Task.objects.create(task_id="t2", tool_name="echo", status="succeeded")
    Task.objects.create(task_id="t3", tool_name="echo", status="succeeded")
    LLMRequestLog.objects.create(
        node_id="a",
        request_id="r1",
        outcome="succeeded",
        prompt_tokens=9,
        completion_tokens=4,
        total_tokens=13,
    )
    LLMRequestLog.objects.create(node_id="a", request_id="r2", outcome="rate_limited")
    LLMRequestLog.objects.create(
        node_id="a",
        request_id="old",
        outcome="succeeded",
        total_tokens=1000,
        created_at=timezone.now() - timezone.timedelta(days=2),
    )

    body = staff_client.get("/api/admin/stats").json()
    assert body["success"] is True
    assert body["nodes"] == {
        "online": 1,
        "busy": 1,
        "offline": 1,
        "unknown": 0,
        "total": 3,
        "connected": 2,
        "draining": 1,
    }
    assert body["tasks"]["queued"] == 1 and body["tasks"]["succeeded"] == 2 and body["tasks"]["total"] == 3
    assert body["tasks"]["failed"] == 0
    assert body["llm"]["requests"] == 2 and body["llm"]["tokens"] == 13 and body["llm"]["rateLimited"] == 1
    assert isinstance(body["timestamp"], int)


@pytest.fixture
def tasks(db):
    Task.objects.create(task_id="t1", tool_name="echo", status="succeeded", assigned_node_id="n1")
    Task.objects.create(task_id="t2", tool_name="sha256", status="failed", assigned_node_id="n1")
    Task.objects.create(task_id="t3", tool_name="echo", status="queued")
    Task.objects.create(task_id="t4", tool_name="echo", status="assigned", assigned_node_id="n2")


def task_ids(response) -> set[str]:
    assert response.status_code == 200, response.content
    return {task["taskId"] for task in response.json()["tasks"]}


@pytest.mark.parametrize(
    "query,expected",
    [
        ("", {"t1", "t2", "t3", "t4"}),
        ("status=queued", {"t3"}),
        ("nodeId=n1", {"t1", "t2"}),
        ("toolName=echo", {"t1", "t3", "t4"}),
        ("toolName=echo&nodeId=n1", {"t1"}),
        ("status=failed&toolName=echo", set()),
    ],
)
def test_tasks_filters(staff_client, tasks, query, expected):
    response = staff_client.get(f"/api/admin/tasks?{query}")
    assert task_ids(response) == expected
    assert response.json()["total"] == len(expected)


def test_tasks_pagination_and_shape(staff_client, tasks):
    response = staff_client.get("/api/admin/tasks?limit=2&offset=0")
    body = response.json()
    assert body["success"] is True and body["total"] == 4 and len(body["tasks"]) == 2
    assert {"taskId", "toolName", "status", "assignedNodeId", "createdAt"} <= set(body["tasks"][0])
    rest = staff_client.get("/api/admin/tasks/?limit=2&offset=2").json()["tasks"]
    assert {t["taskId"] for t in body["tasks"]} | {t["taskId"] for t in rest} == {"t1", "t2", "t3", "t4"}


@pytest.mark.parametrize("query", ["status=done", "limit=0", "limit=5000", "offset=-3", "limit=x"])
def test_tasks_bad_parameters_are_400(staff_client, query):
    assert_error(staff_client.get(f"/api/admin/tasks?{query}"), 400, "invalid_payload")


def test_quota_of_a_node(staff_client, make_node, settings):
    make_node("n1", tags=["gpu"])
    QuotaPolicy.objects.create(scope="tag", target="gpu", max_tokens_per_day=5000)
    body = staff_client.get("/api/admin/quotas/n1").json()
    assert body["success"] is True and body["nodeId"] == "n1"
    assert body["limits"]["maxTokensPerDay"] == 5000
    assert body["limits"]["maxRequestsPerMinute"] == settings.APEXBRIDGE_QUOTA_MAX_REQUESTS_PER_MINUTE
    assert body["usage"]["tokensToday"] == 0
    assert body["policySources"]["maxTokensPerDay"] == "tag:gpu"
