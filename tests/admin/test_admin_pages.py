"""The Django admin of the nodes app: pages render, actions call the services."""

from __future__ import annotations

import json

import pytest
from django.contrib.admin.utils import quote
from django.urls import reverse

from llmproxy.models import LLMRequestLog
from nodes.auth import authenticate_key, hash_key, node_key_create
from nodes.models import HubProcess, Node, NodeKey, NodeLog, Task
from nodes.services import node_log_add
from tests.admin.conftest import received

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("model", ["node", "nodekey", "task", "nodelog", "hubprocess"])
def test_changelists_render_with_filters_and_search(client_admin, make_node, model):
    make_node("n1")
    node_key_create(name="k1")
    Task.objects.create(task_id="t1", tool_name="echo", assigned_node_id="n1", status="succeeded")
    node_log_add(node_id="n1", message="hello")
    HubProcess.objects.create(process_id="hub-1", hostname="h", pid=1)
    url = reverse(f"admin:nodes_{model}_changelist")
    assert client_admin.get(url).status_code == 200
    assert client_admin.get(url, {"q": "n1"}).status_code == 200


def test_node_changelist_filters(client_admin, make_node):
    make_node("on-1")
    make_node("off-1", status="offline", connection_id="", channel_name="")
    page = client_admin.get(reverse("admin:nodes_node_changelist"), {"status": "offline"}).content.decode()
    assert "off-1" in page and "on-1" not in page
    page = client_admin.get(reverse("admin:nodes_node_changelist"), {"connected": "yes"}).content.decode()
    assert "on-1" in page and "off-1" not in page


def test_node_change_page_shows_status_tasks_log_and_llm_usage(client_admin, make_node):
    make_node("n:1", tags=["gpu"])
    Task.objects.create(task_id="t-recent", tool_name="sha256", assigned_node_id="n:1", status="succeeded")
    node_log_add(node_id="n:1", message="warming up", level="warn")
    LLMRequestLog.objects.create(
        node_id="n:1", request_id="r1", model="m1", outcome="succeeded", total_tokens=42
    )

    response = client_admin.get(reverse("admin:nodes_node_change", args=[quote("n:1")]))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'data-live-status="n:1"' in page and ">online<" in page
    assert "t-recent" in page and "sha256" in page
    assert "warming up" in page
    assert "<strong>42</strong> tokens" in page
    for action in ("drain", "resume", "restart", "shutdown"):
        assert f'data-control="{action}"' in page
    assert "apexbridge/admin_live.js" in page
    # the hub owns every field: nothing is editable
    assert 'name="name"' not in page and 'name="draining"' not in page


def test_nodes_cannot_be_added_by_hand(client_admin):
    assert client_admin.get(reverse("admin:nodes_node_add")).status_code == 403


def test_drain_action_records_and_tells_the_node(
    client_admin, make_node, channel, django_capture_on_commit_callbacks
):
    make_node("n1", channel_name=channel)
    make_node("n2", status="offline", connection_id="", channel_name="")
    with django_capture_on_commit_callbacks(execute=True):
        response = client_admin.post(
            reverse("admin:nodes_node_changelist"),
            {"action": "drain_nodes", "_selected_action": ["n1", "n2"]},
            follow=True,
        )
    assert response.status_code == 200
    assert set(Node.objects.filter(draining=True).values_list("node_id", flat=True)) == {"n1", "n2"}
    frames = [json.loads(message["frame"]) for message in received(channel)]
    assert frames == [{"type": "node_control", "data": {"action": "drain", "reason": "drain from the admin"}}]


def test_restart_action_skips_disconnected_nodes(
    client_admin, make_node, channel, django_capture_on_commit_callbacks
):
    make_node("n1", channel_name=channel)
    make_node("n2", status="offline", connection_id="", channel_name="")
    with django_capture_on_commit_callbacks(execute=True):
        response = client_admin.post(
            reverse("admin:nodes_node_changelist"),
            {"action": "restart_nodes", "_selected_action": ["n1", "n2"]},
            follow=True,
        )
    page = response.content.decode()
    assert "skipped n2 (not connected)" in page
    assert [json.loads(m["frame"])["data"]["action"] for m in received(channel)] == ["restart"]


def test_resume_button_on_the_change_page(
    client_admin, make_node, channel, django_capture_on_commit_callbacks
):
    make_node("n1", channel_name=channel, draining=True)
    url = reverse("admin:nodes_node_control", args=[quote("n1"), "resume"])
    assert client_admin.get(url).status_code == 405
    with django_capture_on_commit_callbacks(execute=True):
        response = client_admin.post(url)
    assert response.status_code == 302
    assert Node.objects.get(pk="n1").draining is False
    assert [json.loads(m["frame"])["data"]["action"] for m in received(channel)] == ["resume"]


def test_heartbeat_check_button(client_admin, make_node, channel, django_capture_on_commit_callbacks):
    make_node("n1", channel_name=channel)
    with django_capture_on_commit_callbacks(execute=True):
        response = client_admin.post(reverse("admin:nodes_node_heartbeat_check", args=["n1"]), follow=True)
    assert "Heartbeat check: n1 is online" in response.content.decode()
    assert json.loads(received(channel)[0]["frame"])["type"] == "ping"


def test_unregister_action_closes_the_connection(
    client_admin, make_node, channel, django_capture_on_commit_callbacks
):
    make_node("n1", channel_name=channel)
    with django_capture_on_commit_callbacks(execute=True):
        client_admin.post(
            reverse("admin:nodes_node_changelist"), {"action": "unregister_nodes", "_selected_action": ["n1"]}
        )
    assert not Node.objects.exists()
    assert received(channel) == [{"type": "node.close", "code": 4003}]
    assert NodeLog.objects.filter(node_id="n1", event="node_unregistered").exists()


def test_delete_button_unregisters(client_admin, make_node, channel, django_capture_on_commit_callbacks):
    make_node("n1", channel_name=channel)
    with django_capture_on_commit_callbacks(execute=True):
        response = client_admin.post(reverse("admin:nodes_node_delete", args=["n1"]), {"post": "yes"})
    assert response.status_code == 302
    assert not Node.objects.exists()
    assert received(channel) == [{"type": "node.close", "code": 4003}]


def test_plain_delete_action_is_not_offered(client_admin, make_node):
    make_node("n1")
    page = client_admin.get(reverse("admin:nodes_node_changelist")).content.decode()
    assert 'value="delete_selected"' not in page
    assert 'value="unregister_nodes"' in page


# --- node keys ---------------------------------------------------------------------------
def test_create_key_shows_the_plain_key_once(client_admin):
    response = client_admin.post(
        reverse("admin:nodes_nodekey_add"),
        {"name": "lab", "node_id": "lab-1", "capabilities": "echo, sha256"},
    )
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    key = NodeKey.objects.get()
    page = response.content.decode()
    start = page.index('id="plain-key"')
    plain = page[page.index(">", start) + 1 : page.index("<", start)]
    assert plain.startswith(f"abk_{key.prefix}_")
    assert key.key_hash == hash_key(plain)
    assert f"/abp-distributed-server/VCP_Key={plain}" in page
    assert key.capabilities == ["echo", "sha256"] and key.node_id == "lab-1"
    assert authenticate_key(plain).name == "lab"

    # never again: not on the change page, nor the list; the hash is never shown
    for url in (
        reverse("admin:nodes_nodekey_change", args=[key.pk]),
        reverse("admin:nodes_nodekey_changelist"),
    ):
        page = client_admin.get(url).content.decode()
        assert plain not in page and key.key_hash not in page
        # The secret part (it may itself contain "_": split after the prefix, not at
        # the last "_", or a one-character tail turns up in any page by chance)
        assert plain.split("_", 2)[2] not in page


def test_revoke_key_action(client_admin):
    key, plain = node_key_create(name="k")
    client_admin.post(
        reverse("admin:nodes_nodekey_changelist"), {"action": "revoke_keys", "_selected_action": [key.pk]}
    )
    key.refresh_from_db()
    assert key.is_revoked and authenticate_key(plain) is None


def test_edit_key_restrictions(client_admin):
    key, _plain = node_key_create(name="k", capabilities=["a"])
    response = client_admin.post(
        reverse("admin:nodes_nodekey_change", args=[key.pk]),
        {"name": "k2", "node_id": "", "capabilities": "b, c"},
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.name == "k2" and key.capabilities == ["b", "c"]


# --- tasks ---------------------------------------------------------------------------------
def test_cancel_and_requeue_actions(client_admin):
    Task.objects.create(task_id="t-q", tool_name="echo", status="queued")
    Task.objects.create(task_id="t-done", tool_name="echo", status="succeeded")
    url = reverse("admin:nodes_task_changelist")
    response = client_admin.post(
        url, {"action": "cancel_tasks", "_selected_action": ["t-q", "t-done"]}, follow=True
    )
    assert Task.objects.get(pk="t-q").status == "cancelled"
    assert Task.objects.get(pk="t-done").status == "succeeded"
    assert "Not cancelled: t-done" in response.content.decode()

    client_admin.post(url, {"action": "requeue_tasks", "_selected_action": ["t-q"]})
    task = Task.objects.get(pk="t-q")
    assert task.status == "queued" and task.attempts == 0


def test_task_change_page_is_read_only(client_admin):
    Task.objects.create(task_id="t1", tool_name="echo", status="queued", tool_args={"x": 1})
    page = client_admin.get(reverse("admin:nodes_task_change", args=["t1"])).content.decode()
    assert "t1" in page and 'name="tool_name"' not in page


# --- index and dashboard ---------------------------------------------------------------------
def test_index_links_to_the_dashboard(client_admin):
    page = client_admin.get(reverse("admin:index")).content.decode()
    assert f'href="{reverse("admin-dashboard")}"' in page
