"""``/api/admin/nodes…``: list and filters, detail, stats, logs, tasks, control,
heartbeat check and delete (PROTOCOL §6)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.utils import timezone

from nodes.models import Node, NodeLog, Task
from nodes.services import node_log_add
from tests.api.test_admin_auth import assert_error

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(make_node):
    make_node("w1", type="worker", capabilities=["echo", "sha256"], tags=["gpu", "eu"])
    make_node("w2", type="worker", capabilities=["echo"], tags=["eu"], status="busy")
    make_node(
        "c1",
        type="companion",
        name="Ada companion",
        capabilities=["chat"],
        tags=[],
        status="offline",
        connection_id="",
        channel_name="",
    )
    make_node("x1", type="worker", capabilities=["sha256x"], tags=["gpu-old"])


def ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True
    return [node["nodeId"] for node in body["nodes"]]


def new_channel() -> str:
    return async_to_sync(get_channel_layer().new_channel)()


def receive(channel: str) -> dict:
    async def get():
        import asyncio

        return await asyncio.wait_for(get_channel_layer().receive(channel), 2)

    return async_to_sync(get)()


def nothing_on(channel: str) -> bool:
    layer = get_channel_layer()
    return layer.channels.get(channel) is None or layer.channels[channel].empty()


# --- list ----------------------------------------------------------------------------
def test_list_returns_every_node_with_node_info(staff_client, fleet):
    response = staff_client.get("/api/admin/nodes")
    assert ids(response) == ["c1", "w1", "w2", "x1"]
    body = response.json()
    assert body["total"] == 4
    w1 = next(node for node in body["nodes"] if node["nodeId"] == "w1")
    assert w1["status"] == "online" and w1["type"] == "worker" and w1["connected"] is True
    assert w1["config"]["tags"] == ["gpu", "eu"] and w1["capabilities"] == ["echo", "sha256"]
    assert isinstance(w1["lastHeartbeat"], int)


@pytest.mark.parametrize(
    "query,expected",
    [
        ("type=companion", ["c1"]),
        ("type=worker", ["w1", "w2", "x1"]),
        ("status=busy", ["w2"]),
        ("status=offline", ["c1"]),
        ("capability=echo", ["w1", "w2"]),
        # exact list membership, not a substring of the JSON text
        ("capability=sha256", ["w1"]),
        ("capability=sha", []),
        ("tag=gpu", ["w1"]),
        ("tag=eu", ["w1", "w2"]),
        ("search=ada", ["c1"]),
        ("search=W", ["w1", "w2"]),
        ("type=worker&capability=echo&tag=gpu", ["w1"]),
    ],
)
def test_list_filters(staff_client, fleet, query, expected):
    response = staff_client.get(f"/api/admin/nodes?{query}")
    assert ids(response) == expected
    assert response.json()["total"] == len(expected)


def test_list_pagination_keeps_the_total(staff_client, fleet):
    response = staff_client.get("/api/admin/nodes?limit=2&offset=1")
    assert ids(response) == ["w1", "w2"]
    assert response.json()["total"] == 4
    assert ids(staff_client.get("/api/admin/nodes?offset=10")) == []


def test_list_accepts_a_trailing_slash(staff_client, fleet):
    assert ids(staff_client.get("/api/admin/nodes/?status=busy")) == ["w2"]


@pytest.mark.parametrize(
    "query,field",
    [
        ("type=robot", "type"),
        ("status=sleeping", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
    ],
)
def test_list_bad_parameters_are_400(staff_client, fleet, query, field):
    body = assert_error(staff_client.get(f"/api/admin/nodes?{query}"), 400, "invalid_payload")
    assert field in body["error"]["message"]


# --- one node --------------------------------------------------------------------------
def test_detail(staff_client, fleet):
    response = staff_client.get("/api/admin/nodes/w1")
    assert response.status_code == 200
    assert response.json()["success"] is True
    assert response.json()["node"]["name"] == "w1"
    assert staff_client.get("/api/admin/nodes/w1/").json()["node"]["nodeId"] == "w1"


def test_node_ids_with_dots_and_colons(staff_client, make_node):
    make_node("vcp-host.lan:1")
    assert staff_client.get("/api/admin/nodes/vcp-host.lan:1").json()["node"]["nodeId"] == "vcp-host.lan:1"


@pytest.mark.parametrize(
    "method,path",
    [
        ("get", "/api/admin/nodes/ghost"),
        ("get", "/api/admin/nodes/ghost/stats"),
        ("get", "/api/admin/nodes/ghost/logs"),
        ("get", "/api/admin/nodes/ghost/tasks"),
        ("post", "/api/admin/nodes/ghost/heartbeat-check"),
        ("delete", "/api/admin/nodes/ghost"),
        ("get", "/api/admin/quotas/ghost"),
    ],
)
def test_unknown_node_is_404(staff_client, method, path):
    assert_error(getattr(staff_client, method)(path), 404, "node_not_found")


def test_control_of_unknown_node_is_404(staff_client):
    response = staff_client.post("/api/admin/nodes/ghost/control", {"action": "drain"}, format="json")
    assert_error(response, 404, "node_not_found")


def test_stats(staff_client, make_node):
    connected = timezone.now() - timedelta(minutes=5)
    make_node(
        "n1",
        total_tasks=10,
        completed_tasks=8,
        failed_tasks=1,
        total_response_time_ms=800,
        connected_at=connected,
    )
    Task.objects.create(task_id="t-run", tool_name="echo", status="assigned", assigned_node_id="n1")
    stats = staff_client.get("/api/admin/nodes/n1/stats").json()["stats"]
    assert stats["totalTasks"] == 10 and stats["completedTasks"] == 8 and stats["failedTasks"] == 1
    assert stats["activeTasks"] == 1
    assert stats["averageResponseTime"] == 100
    assert 5 * 60_000 <= stats["uptime"] < 6 * 60_000
    assert isinstance(stats["lastHeartbeat"], int)


def test_stats_uptime_is_zero_when_offline(staff_client, make_node):
    make_node("n1", status="offline", connection_id="")
    assert staff_client.get("/api/admin/nodes/n1/stats").json()["stats"]["uptime"] == 0


# --- logs ------------------------------------------------------------------------------
def test_logs_newest_first_with_level_and_limit(staff_client, make_node):
    make_node("n1")
    for i in range(5):
        node_log_add(node_id="n1", message=f"info {i}", level="info", event="node_log", context={"i": i})
    node_log_add(node_id="n1", message="disk full", level="error", event="node_log")
    node_log_add(node_id="other", message="not mine", level="error")

    logs = staff_client.get("/api/admin/nodes/n1/logs").json()["logs"]
    assert [entry["message"] for entry in logs] == [
        "disk full",
        "info 4",
        "info 3",
        "info 2",
        "info 1",
        "info 0",
    ]
    assert set(logs[0]) == {"timestamp", "level", "event", "message", "context"}
    assert logs[1]["context"] == {"i": 4}

    errors = staff_client.get("/api/admin/nodes/n1/logs?level=error").json()["logs"]
    assert [entry["message"] for entry in errors] == ["disk full"]
    assert len(staff_client.get("/api/admin/nodes/n1/logs?limit=2").json()["logs"]) == 2


def test_logs_default_limit_is_100(staff_client, make_node):
    make_node("n1")
    NodeLog.objects.bulk_create(NodeLog(node_id="n1", message=str(i)) for i in range(120))
    assert len(staff_client.get("/api/admin/nodes/n1/logs").json()["logs"]) == 100
    assert len(staff_client.get("/api/admin/nodes/n1/logs?limit=1000").json()["logs"]) == 120


@pytest.mark.parametrize("query", ["limit=1001", "limit=0", "level=loud"])
def test_logs_bad_parameters_are_400(staff_client, make_node, query):
    make_node("n1")
    assert_error(staff_client.get(f"/api/admin/nodes/n1/logs?{query}"), 400, "invalid_payload")


# --- tasks of a node --------------------------------------------------------------------
def test_node_tasks_with_status_filter(staff_client, make_node):
    make_node("n1")
    Task.objects.create(task_id="t1", tool_name="echo", status="succeeded", assigned_node_id="n1")
    Task.objects.create(task_id="t2", tool_name="echo", status="assigned", assigned_node_id="n1")
    Task.objects.create(task_id="t3", tool_name="echo", status="queued", node_id="n1")
    Task.objects.create(task_id="t4", tool_name="echo", status="succeeded", assigned_node_id="n2")
    body = staff_client.get("/api/admin/nodes/n1/tasks").json()
    assert body["success"] is True and body["total"] == 3
    assert {task["taskId"] for task in body["tasks"]} == {"t1", "t2", "t3"}
    done = staff_client.get("/api/admin/nodes/n1/tasks?status=succeeded").json()
    assert [task["taskId"] for task in done["tasks"]] == ["t1"] and done["total"] == 1
    assert_error(staff_client.get("/api/admin/nodes/n1/tasks?status=done"), 400)


# --- control ----------------------------------------------------------------------------
def test_drain_and_resume_send_node_control(staff_client, make_node, django_capture_on_commit_callbacks):
    channel = new_channel()
    make_node("n1", channel_name=channel)

    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post(
            "/api/admin/nodes/n1/control", {"action": "drain", "reason": "maintenance"}, format="json"
        )
    assert response.status_code == 200
    assert response.json()["success"] is True and response.json()["node"]["draining"] is True
    assert Node.objects.get(pk="n1").draining is True
    message = receive(channel)
    assert message["type"] == "node.send" and message["nodeId"] == "n1"
    assert json.loads(message["frame"]) == {
        "type": "node_control",
        "data": {"action": "drain", "reason": "maintenance"},
    }
    assert NodeLog.objects.filter(node_id="n1", event="node_control", message__contains="drain").exists()

    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post("/api/admin/nodes/n1/control", {"action": "resume"}, format="json")
    assert response.json()["node"]["draining"] is False
    assert json.loads(receive(channel)["frame"])["data"] == {"action": "resume", "reason": ""}


def test_restart_sends_control_but_keeps_taking_tasks(
    staff_client, make_node, django_capture_on_commit_callbacks
):
    channel = new_channel()
    make_node("n1", channel_name=channel)
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post("/api/admin/nodes/n1/control", {"action": "restart"}, format="json")
    assert response.json()["node"]["draining"] is False
    assert json.loads(receive(channel)["frame"])["data"]["action"] == "restart"


def test_shutdown_drains(staff_client, make_node, django_capture_on_commit_callbacks):
    channel = new_channel()
    make_node("n1", channel_name=channel)
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post("/api/admin/nodes/n1/control", {"action": "shutdown"}, format="json")
    assert response.json()["node"]["draining"] is True
    assert json.loads(receive(channel)["frame"])["data"]["action"] == "shutdown"


def test_drain_of_an_offline_node_is_recorded(staff_client, make_node):
    make_node("n1", status="offline", connection_id="", channel_name="")
    response = staff_client.post("/api/admin/nodes/n1/control", {"action": "drain"}, format="json")
    assert response.status_code == 200 and response.json()["node"]["draining"] is True


def test_restart_of_a_disconnected_node_is_409(staff_client, make_node):
    make_node("n1", status="offline", connection_id="", channel_name="")
    response = staff_client.post("/api/admin/nodes/n1/control", {"action": "restart"}, format="json")
    assert_error(response, 409, "node_not_connected")


@pytest.mark.parametrize("body", [{}, {"action": "explode"}, {"action": "drain", "reason": "x" * 600}])
def test_control_bad_body_is_400(staff_client, make_node, body):
    make_node("n1")
    response = staff_client.post("/api/admin/nodes/n1/control", body, format="json")
    assert_error(response, 400, "invalid_payload")
    assert Node.objects.get(pk="n1").draining is False


# --- heartbeat check --------------------------------------------------------------------
def test_heartbeat_check_pings_a_live_node(staff_client, make_node, django_capture_on_commit_callbacks):
    channel = new_channel()
    make_node("n1", channel_name=channel)
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post("/api/admin/nodes/n1/heartbeat-check")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is True and body["status"] == "online" and isinstance(body["lastHeartbeat"], int)
    frame = json.loads(receive(channel)["frame"])
    assert frame["type"] == "ping" and isinstance(frame["data"]["timestamp"], int)


def test_heartbeat_check_marks_a_silent_node_offline_now(
    staff_client, make_node, settings, django_capture_on_commit_callbacks
):
    channel = new_channel()
    silent_since = timezone.now() - timedelta(milliseconds=settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS + 5000)
    make_node("n1", channel_name=channel, last_heartbeat=silent_since)
    with django_capture_on_commit_callbacks(execute=True):
        body = staff_client.post("/api/admin/nodes/n1/heartbeat-check").json()
    assert body["status"] == "offline"
    assert Node.objects.get(pk="n1").status == "offline"
    messages = [receive(channel), receive(channel)]
    assert {m["type"] for m in messages} == {"node.send", "node.status"}


# --- delete -----------------------------------------------------------------------------
def test_delete_unregisters_and_closes_the_connection(
    staff_client, make_node, django_capture_on_commit_callbacks
):
    channel = new_channel()
    make_node("n1", channel_name=channel)
    Task.objects.create(task_id="t-old", tool_name="echo", status="succeeded", assigned_node_id="n1")
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.delete("/api/admin/nodes/n1")
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Node unregistered successfully"}
    assert not Node.objects.filter(pk="n1").exists()
    assert receive(channel) == {"type": "node.close", "code": 4003}
    # the node is gone from the API, its finished history stays
    assert_error(staff_client.get("/api/admin/nodes/n1"), 404)
    assert Task.objects.filter(pk="t-old").exists()
    assert staff_client.get("/api/admin/tasks?nodeId=n1").json()["total"] == 1


def test_delete_of_a_disconnected_node_sends_nothing(
    staff_client, make_node, django_capture_on_commit_callbacks
):
    make_node("n1", status="offline", connection_id="", channel_name="")
    with django_capture_on_commit_callbacks(execute=True):
        assert staff_client.delete("/api/admin/nodes/n1/").status_code == 200
    assert not Node.objects.exists()
