"""The task API for scripts (PROTOCOL §6): ``POST /api/tasks``, ``GET /api/tasks/<id>``,
``POST /api/tasks/<id>/cancel``, with ``wait``, permissions and the error envelope;
and the ``submit_task`` management command."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from nodes import selectors, task_result_services, task_services, task_waiters
from nodes.models import Node, Task


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def staff(db):
    return client_for(get_user_model().objects.create_user("staff", is_staff=True))


@pytest.fixture
def submitter(db):
    user = get_user_model().objects.create_user("script")
    user.user_permissions.add(Permission.objects.get(codename="add_task", content_type__app_label="nodes"))
    return client_for(user)


@pytest.fixture
def plain(db):
    return client_for(get_user_model().objects.create_user("plain"))


def make_node(node_id="n1", **fields) -> Node:
    values = {
        "name": node_id,
        "status": "online",
        "connection_id": f"c-{node_id}",
        "channel_name": f"ch-{node_id}",
    }
    values.update(fields)
    return Node.objects.create(node_id=node_id, **values)


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code and body["error"]["message"]


# --- submit ------------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_submit_returns_201_with_the_task(staff):
    response = staff.post(
        "/api/tasks",
        {
            "toolName": "echo",
            "toolArgs": {"x": 1},
            "capability": "c",
            "priority": 9,
            "timeout": 500,
            "maxRetries": 0,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    task = body["task"]
    assert body["success"] is True and task["status"] == "queued" and task["taskId"].startswith("t-")
    assert (task["toolArgs"], task["capability"], task["priority"], task["timeout"], task["maxRetries"]) == (
        {"x": 1}, "c", 9, 500, 0,
    )  # fmt: skip
    assert task["waitingReason"] == "no node is connected"
    assert Task.objects.get(pk=task["taskId"]).created_by == "staff"


@pytest.mark.django_db(transaction=True)
def test_submit_dispatches_at_once_to_an_idle_node(staff):
    make_node("n1")
    task = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]
    assert task["status"] == "assigned" and task["assignedNodeId"] == "n1" and task["attempts"] == 1


@pytest.mark.django_db
def test_users_with_add_task_may_submit_others_may_not(submitter, plain):
    assert submitter.post("/api/tasks", {"toolName": "echo"}, format="json").status_code == 201
    assert_error(plain.post("/api/tasks", {"toolName": "echo"}, format="json"), 403, "forbidden")
    assert_error(
        APIClient().post("/api/tasks", {"toolName": "echo"}, format="json"), 401, "not_authenticated"
    )
    assert Task.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        {},
        {"toolName": ""},
        {"toolName": 5},
        {"toolName": "echo", "toolArgs": [1, 2]},
        {"toolName": "echo", "priority": 11},
        {"toolName": "echo", "priority": -1},
        {"toolName": "echo", "timeout": 0},
        {"toolName": "echo", "maxRetries": -1},
        {"toolName": "echo", "nodeId": "bad id!"},
        {"toolName": "echo", "dependsOn": "t-1"},
        {"toolName": "echo", "dependsOn": ["t-unknown"]},
        {"toolName": "echo", "toolArgs": {"blob": "x" * 2_000_000}},
    ],
    ids=lambda body: ",".join(body) or "empty",
)
def test_bad_input_is_400_and_creates_nothing(staff, body):
    assert_error(staff.post("/api/tasks", body, format="json"), 400, "invalid_payload")
    assert not Task.objects.exists()


@pytest.mark.django_db
def test_bad_wait_is_400(staff):
    assert_error(
        staff.post("/api/tasks?wait=61", {"toolName": "echo"}, format="json"), 400, "invalid_payload"
    )
    assert_error(
        staff.post("/api/tasks?wait=soon", {"toolName": "echo"}, format="json"), 400, "invalid_payload"
    )
    assert not Task.objects.exists()


@pytest.mark.django_db
def test_idempotency_key_returns_the_first_task_with_200(staff):
    first = staff.post("/api/tasks", {"toolName": "echo", "idempotencyKey": "job-42"}, format="json")
    again = staff.post("/api/tasks", {"toolName": "echo", "idempotencyKey": "job-42"}, format="json")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["task"]["taskId"] == first.json()["task"]["taskId"] and Task.objects.count() == 1


@pytest.mark.django_db
def test_depends_on_is_accepted(staff):
    first = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]
    second = staff.post("/api/tasks", {"toolName": "echo", "dependsOn": [first["taskId"]]}, format="json")
    assert second.status_code == 201 and second.json()["task"]["dependsOn"] == [first["taskId"]]


# --- wait ------------------------------------------------------------------------------------------
def finish_later(task_id: str, delay: float) -> threading.Thread:
    def run():
        from django.db import connection

        time.sleep(delay)
        try:
            task_result_services.task_complete(
                task_id=task_id, node_id="n1", connection_id="c-n1", success=True, result={"done": True}
            )
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_submit_with_wait_returns_200_with_the_result(staff):
    make_node("n1")
    # The node answers while the request waits.
    original = task_services.task_submit
    threads = []

    def submit_and_finish(**kwargs):
        result = original(**kwargs)
        threads.append(finish_later(result.task.task_id, 0.3))
        return result

    task_services.task_submit = submit_and_finish
    try:
        response = staff.post("/api/tasks?wait=10", {"toolName": "echo"}, format="json")
    finally:
        task_services.task_submit = original
        for thread in threads:
            thread.join()
    assert response.status_code == 200, response.content
    assert response.json()["task"]["status"] == "succeeded" and response.json()["task"]["result"] == {
        "done": True
    }


@pytest.mark.django_db(transaction=True)
def test_get_with_wait_returns_when_the_task_ends(staff):
    make_node("n1")
    task_id = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]["taskId"]
    thread = finish_later(task_id, 0.3)
    response = staff.get(f"/api/tasks/{task_id}?wait=10")
    thread.join()
    assert response.status_code == 200 and response.json()["task"]["status"] == "succeeded"


@pytest.mark.django_db
def test_wait_that_runs_out_answers_with_the_current_state(staff):
    started = time.monotonic()
    response = staff.post("/api/tasks?wait=0.3", {"toolName": "echo"}, format="json")
    assert response.status_code == 201 and response.json()["task"]["status"] == "queued"
    assert time.monotonic() - started >= 0.3


# --- get and cancel -----------------------------------------------------------------------------------
@pytest.mark.django_db
def test_get_and_unknown_task(staff, submitter):
    task_id = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]["taskId"]
    response = submitter.get(f"/api/tasks/{task_id}")
    assert response.status_code == 200 and response.json()["task"]["taskId"] == task_id
    assert staff.get(f"/api/tasks/{task_id}/").status_code == 200
    assert_error(staff.get("/api/tasks/t-nope"), 404, "task_not_found")


@pytest.mark.django_db
def test_cancel_then_cancel_again_is_409(staff):
    task_id = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]["taskId"]
    response = staff.post(f"/api/tasks/{task_id}/cancel", {"reason": "changed my mind"}, format="json")
    assert response.status_code == 200
    task = response.json()["task"]
    assert task["status"] == "cancelled" and task["error"] == {
        "code": "cancelled",
        "message": "changed my mind",
    }
    assert_error(staff.post(f"/api/tasks/{task_id}/cancel"), 409, "task_finished")
    assert_error(staff.post("/api/tasks/t-nope/cancel"), 404, "task_not_found")


@pytest.mark.django_db
def test_cancel_without_a_reason_names_the_user(staff):
    task_id = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]["taskId"]
    task = staff.post(f"/api/tasks/{task_id}/cancel").json()["task"]
    assert task["error"]["message"] == "cancelled by staff"


@pytest.mark.django_db
def test_schema_documents_the_task_api(staff):
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    create = schema["paths"]["/api/tasks"]["post"]
    assert {"201", "200", "400", "401", "403"} <= set(create["responses"])
    assert create["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/TaskSubmit")
    assert "409" in schema["paths"]["/api/tasks/{task_id}/cancel"]["post"]["responses"]
    assert any(p["name"] == "wait" for p in schema["paths"]["/api/tasks/{task_id}"]["get"]["parameters"])


# --- submit_task command ----------------------------------------------------------------------------
@pytest.mark.django_db
def test_submit_task_command_prints_the_task(capsys):
    call_command("submit_task", "echo", "--args", '{"x": 1}', "--capability", "c", "--priority", "8")
    task = json.loads(capsys.readouterr().out)
    assert task["toolArgs"] == {"x": 1} and task["capability"] == "c" and task["priority"] == 8
    assert Task.objects.filter(pk=task["taskId"], status="queued").exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [["--args", "{bad"], ["--args", "[1]"], ["--priority", "11"], ["--timeout", "0"], ["--wait", "61"]],
)
def test_submit_task_command_refuses_bad_arguments(args):
    with pytest.raises(CommandError):
        call_command("submit_task", "echo", *args)
    assert not Task.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_submit_task_command_exits_non_zero_when_the_task_failed(capsys):
    first = task_services.task_submit(tool_name="echo").task
    task_services.task_cancel(task_id=first.task_id, reason="no")
    with pytest.raises(SystemExit) as exited:
        call_command("submit_task", "echo", "--depends-on", first.task_id, "--wait", "5")
    assert exited.value.code == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "dependency_failed"


@pytest.mark.django_db
def test_get_with_wait_reads_the_task_only_while_registered_to_be_woken(staff, monkeypatch):
    """A read made before the request registers to be woken would miss a task that
    ends between that read and the wait (and costs a read): every read of a waiting
    GET happens while it is registered."""
    task_id = staff.post("/api/tasks", {"toolName": "echo"}, format="json").json()["task"]["taskId"]
    reads = []
    original = selectors.task_get

    def counted(**kwargs):
        reads.append((kwargs["task_id"], kwargs["task_id"] in task_waiters._waiting))
        return original(**kwargs)

    monkeypatch.setattr(selectors, "task_get", counted)
    response = staff.get(f"/api/tasks/{task_id}?wait=0.05")  # still queued when it runs out
    missing = staff.get("/api/tasks/t-nope?wait=10")
    assert response.status_code == 200 and response.json()["task"]["status"] == "queued"
    assert reads and all(registered for _, registered in reads), reads
    assert reads[-1] == ("t-nope", True) and [r for r in reads if r[0] == "t-nope"] == [("t-nope", True)]
    assert_error(missing, 404, "task_not_found")
    assert "t-nope" not in task_waiters._waiting  # the 404 left nothing registered
