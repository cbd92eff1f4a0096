"""Spoofing and auth matrix (PROTOCOL §1, §1.1, §2.5, §6).

Every node message and every API endpoint, against every kind of caller that should
be refused: no key, a wrong or revoked key, a key bound to another node, a key
without the capability, another node's id, a user who is not staff, a node key used
as an API token. Each refusal is exactly what PROTOCOL.md says and creates or
changes nothing. Keys, tokens and ``pluginSpecificEnvConfig`` values never appear in
a log line or an API response.
"""

from __future__ import annotations

import json
import logging

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

import apexbridge.asgi  # noqa: F401  (sets Django up now: doing it mid-test resets logging, and caplog)
from nodes import task_services
from nodes.auth import node_key_create, node_key_revoke
from nodes.models import Node, NodeLog, Task
from nodes.runtime import runtime
from tests.conftest import TEST_SHARED_KEY, open_node_socket

pytestmark = pytest.mark.django_db(transaction=True)

PLUGIN_SECRET = "plugin-secret-value-7f3a9c"


@pytest.fixture(autouse=True)
def _clean(settings):
    # Users are made in almost every test: a fast hasher keeps the matrix quick.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    cache.clear()
    runtime._buffer.clear()
    runtime.vcp_connections.clear()
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS = 0
    yield
    cache.clear()
    runtime._buffer.clear()
    runtime.vcp_connections.clear()


def snapshot() -> str:
    return json.dumps([list(m.objects.order_by("pk").values()) for m in (Node, NodeLog, Task)], default=str)


async def state() -> str:
    return await database_sync_to_async(snapshot)()


def path_with(key: str, prefix: str = "abp-distributed-server", name: str = "VCP_Key") -> str:
    return f"/{prefix}/{name}={key}"


# --- handshake ---------------------------------------------------------------------------------
def _make_revoked_key() -> str:
    key, plain = node_key_create(name="revoked")
    node_key_revoke(key=key)
    return plain


@pytest.mark.parametrize("kind", ["none", "wrong", "wrong-shape", "revoked", "shared-prefix", "too-long"])
@pytest.mark.parametrize("via", ["path", "abp-path", "bearer"])
async def test_refused_handshakes_create_nothing_and_log_no_key(kind, via, caplog):
    caplog.set_level(logging.DEBUG)
    _real, real_plain = await database_sync_to_async(node_key_create)(name="real")
    key = {
        "none": "",
        "wrong": "not-the-key-123",
        "wrong-shape": real_plain[:-4] + "AAAA",
        "revoked": await database_sync_to_async(_make_revoked_key)(),
        "shared-prefix": TEST_SHARED_KEY[:-1],
        "too-long": "k" * 600,
    }[kind]
    before = await state()
    if via == "bearer":
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        _node, connected, code = await open_node_socket("/abp-distributed-server/", headers=headers)
    else:
        name = "ABP_Key" if via == "abp-path" else "VCP_Key"
        _node, connected, code = await open_node_socket(path_with(key, name=name))

    assert not connected  # refused before accept: HTTP 403 on a real server
    assert await state() == before
    if key:
        assert key not in caplog.text
    assert "refused node handshake" in caplog.text, caplog.text


async def test_accepted_keys(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="ok")
    for path in (
        path_with(TEST_SHARED_KEY),
        path_with(plain),
        path_with(plain, prefix="distributed-server", name="ABP_Key"),
        path_with(plain, prefix="vcp-distributed-server"),
    ):
        node = await node_socket(path)
        assert node.ack["type"] == "connection_ack"


async def test_a_key_revoked_while_connected_cannot_connect_again(node_socket):
    key, plain = await database_sync_to_async(node_key_create)(name="soon-revoked")
    await node_socket(path_with(plain))
    await database_sync_to_async(node_key_revoke)(key=key)
    _node, connected, _code = await open_node_socket(path_with(plain))
    assert not connected


# --- key restrictions --------------------------------------------------------------------------
async def test_key_bound_to_another_node_is_forbidden(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="bound", node_id="bound-1")
    node = await node_socket(path_with(plain))
    before = await state()
    for data in (
        {"nodeId": "someone-else", "name": "x", "capabilities": []},
        {"nodeId": "bound-2", "name": "x", "capabilities": []},
    ):
        reply = await node.request("node_register", data)
        assert reply["type"] == "node_registered"
        assert reply["data"]["success"] is False and reply["data"]["error"]["code"] == "forbidden"
    vcp = await node_socket(path_with(plain, prefix="vcp-distributed-server"))
    reply = await vcp.request("register_tools", {"serverName": "x", "tools": ["echo"]})
    assert reply["type"] == "register_ack" and reply["data"]["error"]["code"] == "forbidden"
    assert await state() == before
    # The bound id itself (explicit or implied) is allowed.
    reply = await node.request("node_register", {"name": "x", "capabilities": []})
    assert reply["data"]["success"] is True and reply["data"]["nodeId"] == "bound-1"


async def test_key_without_the_capability_is_forbidden(node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="caps", capabilities=["echo"])
    node = await node_socket(path_with(plain))
    before = await state()
    reply = await node.request(
        "node_register", {"nodeId": "c-1", "name": "x", "capabilities": ["echo", "gpu"]}
    )
    assert reply["data"]["success"] is False and reply["data"]["error"]["code"] == "forbidden"
    assert "gpu" in reply["data"]["error"]["message"]
    assert await state() == before
    assert (await node.request("node_register", {"nodeId": "c-1", "name": "x", "capabilities": ["echo"]}))[
        "data"
    ]["success"]
    # Registering again on the same connection is checked again.
    reply = await node.request("node_register", {"nodeId": "c-1", "name": "x", "capabilities": ["gpu"]})
    assert reply["data"]["error"]["code"] == "forbidden"
    assert (await Node.objects.aget(pk="c-1")).capabilities == ["echo"]


async def test_vcp_register_tools_cannot_widen_a_restricted_key(node_socket):
    """Regression: a second register_tools set a VCP node's capabilities unchecked."""
    _key, plain = await database_sync_to_async(node_key_create)(name="vcp-caps", capabilities=["echo"])
    vcp = await node_socket(path_with(plain, prefix="vcp-distributed-server"))
    reply = await vcp.request("register_tools", {"serverName": "box", "tools": ["echo"]})
    assert reply["data"]["success"] is True
    before = await state()

    reply = await vcp.request("register_tools", {"serverName": "box", "tools": ["echo", "shell"]})

    assert reply["type"] == "register_ack"
    assert reply["data"]["success"] is False and reply["data"]["error"]["code"] == "forbidden"
    assert await state() == before
    node = await Node.objects.aget(pk="vcp-box")
    assert node.capabilities == ["echo"] and node.tools == ["echo"]


# --- another node's id, on every node message ---------------------------------------------------
async def _assigned_task(node_id: str) -> str:
    result = await database_sync_to_async(task_services.task_submit)(
        tool_name="echo", node_id=node_id, tool_args={}
    )
    return result.task.task_id


# (message type, data (victim's ids filled in), expected reply type or "error")
SPOOFED = [
    ("heartbeat", {"nodeId": "victim", "status": "busy"}, "heartbeat_ack"),
    ("node_unregister", {"nodeId": "victim"}, "node_unregistered"),
    ("node_register", {"nodeId": "victim", "name": "x", "capabilities": []}, "node_registered"),
    ("node_log", {"nodeId": "victim", "message": "forged"}, "error"),
    ("unregister_tools", {"nodeId": "victim", "tools": ["echo"]}, "error"),
    ("task_result", {"taskId": "{task}", "nodeId": "victim", "success": True}, "task_result_ack"),
    ("task_result", {"taskId": "{task}", "success": True}, "task_result_ack"),
    ("tool_result", {"requestId": "{task}", "status": "success", "result": 1}, "error"),
    (
        "llm_request",
        {"requestId": "r1", "nodeId": "victim", "messages": [{"role": "user", "content": "x"}]},
        "llm_response",
    ),
    ("llm_cancel", {"requestId": "r1", "nodeId": "victim"}, "error"),
]


@pytest.mark.parametrize("message_type, data, reply_type", SPOOFED)
async def test_another_nodes_id_or_task_is_refused_and_changes_nothing(
    node_socket, message_type, data, reply_type
):
    victim = await node_socket()
    await victim.register("victim", tools=["echo"], capabilities=["echo"])
    task_id = await _assigned_task("victim")
    await victim.receive_type("task_assign")
    attacker = await node_socket()
    await attacker.register("attacker", tools=["echo"])
    before = await state()

    data = json.loads(json.dumps(data).replace("{task}", task_id))
    reply = await attacker.request(message_type, data)

    assert reply["type"] == reply_type, reply
    error = reply["data"] if reply_type == "error" else reply["data"]["error"]
    assert error["code"] == "node_mismatch", reply
    assert await state() == before
    task = await Task.objects.aget(pk=task_id)
    assert task.status == "assigned" and task.assigned_node_id == "victim"
    assert (await victim.request("heartbeat", {}))["data"]["success"] is True


async def test_report_ip_only_touches_the_senders_node(node_socket):
    victim = await node_socket()
    await victim.register("victim")
    attacker = await node_socket()
    await attacker.register("attacker")
    await attacker.send("report_ip", {"serverName": "victim", "nodeId": "victim", "publicIP": "6.6.6.6"})
    assert (await attacker.request("ping"))["type"] == "pong"
    assert (await Node.objects.aget(pk="victim")).ips in ({}, None)
    assert (await Node.objects.aget(pk="attacker")).ips["publicIP"] == "6.6.6.6"


ALL_NODE_MESSAGES = [
    "heartbeat",
    "node_unregister",
    "unregister_tools",
    "node_log",
    "task_result",
    "tool_result",
    "llm_request",
    "llm_cancel",
]


@pytest.mark.parametrize("message_type", ALL_NODE_MESSAGES)
async def test_every_node_message_needs_registration(node_socket, message_type):
    node = await node_socket()
    reply = await node.request(message_type, {"nodeId": "victim", "taskId": "t", "requestId": "r"})
    assert reply["type"] == "error" and reply["data"]["code"] == "not_registered"
    assert await Node.objects.acount() == 0 and await NodeLog.objects.acount() == 0


# --- the HTTP API ------------------------------------------------------------------------------
def _users():
    user_model = get_user_model()
    staff = user_model.objects.create_user("m-staff", password="pw-staff-123456", is_staff=True)
    plain = user_model.objects.create_user("m-plain", password="pw-plain-123456")
    submitter = user_model.objects.create_user("m-submit", password="pw-submit-123456")
    submitter.user_permissions.add(Permission.objects.get(codename="add_task"))
    retired = user_model.objects.create_user("m-retired", password="pw-retired-1234", is_staff=True)
    tokens = {
        name: Token.objects.create(user=u).key
        for name, u in (("staff", staff), ("plain", plain), ("submitter", submitter), ("retired", retired))
    }
    retired.is_active = False
    retired.save()
    _key, node_key = node_key_create(name="as-api-token")
    tokens["node_key"] = node_key
    tokens["shared_key"] = TEST_SHARED_KEY
    tokens["wrong"] = "0" * 40
    return tokens


def _node(node_id: str = "api-n1") -> None:
    Node.objects.create(node_id=node_id, name=node_id, status="offline")


ADMIN_ENDPOINTS = [
    ("get", "/api/admin/nodes"),
    ("get", "/api/admin/nodes/api-n1"),
    ("get", "/api/admin/nodes/api-n1/stats"),
    ("get", "/api/admin/nodes/api-n1/logs"),
    ("get", "/api/admin/nodes/api-n1/tasks"),
    ("post", "/api/admin/nodes/api-n1/heartbeat-check"),
    ("delete", "/api/admin/nodes/api-n1"),
    ("post", "/api/admin/nodes/api-n1/control"),
    ("get", "/api/admin/stats"),
    ("get", "/api/admin/tasks"),
    ("get", "/api/admin/quotas/api-n1"),
]
TASK_ENDPOINTS = [
    ("post", "/api/tasks"),
    ("get", "/api/tasks/{task}"),
    ("post", "/api/tasks/{task}/cancel"),
]
BODIES = {"/control": {"action": "drain"}, "/api/tasks": {"toolName": "echo", "toolArgs": {"a": 1}}}
# caller -> (status for admin endpoints, status for task endpoints); None: allowed (2xx).
CALLERS = {
    "anonymous": (401, 401),
    "wrong": (401, 401),
    "node_key": (401, 401),
    "shared_key": (401, 401),
    "retired": (401, 401),
    "plain": (403, 403),
    "submitter": (403, None),
    "staff": (None, None),
}


def _call(client: APIClient, method: str, path: str):
    body = next((b for suffix, b in BODIES.items() if path.endswith(suffix)), None)
    return getattr(client, method)(path, body, format="json") if body else getattr(client, method)(path)


@pytest.mark.django_db  # no socket here: a plain transaction is enough, and much faster
@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("method, path", ADMIN_ENDPOINTS + TASK_ENDPOINTS)
def test_api_matrix(caller, method, path):
    tokens = _users()
    _node()
    task = task_services.task_submit(tool_name="echo", tool_args={}).task
    path = path.replace("{task}", task.task_id)
    client = APIClient()
    if caller != "anonymous":
        client.credentials(HTTP_AUTHORIZATION=f"Token {tokens[caller]}")
    before = snapshot()

    response = _call(client, method, path)

    admin_status, task_status = CALLERS[caller]
    expected = task_status if path.startswith("/api/tasks") else admin_status
    if expected is None:
        assert 200 <= response.status_code < 300, (response.status_code, response.content[:300])
        return
    assert response.status_code == expected, (response.status_code, response.content[:300])
    body = response.json()
    assert body["success"] is False and body["error"]["code"] and body["error"]["message"]
    assert snapshot() == before  # a refusal creates and changes nothing
    for secret in (tokens["node_key"], TEST_SHARED_KEY, tokens["staff"]):
        assert secret not in response.content.decode()


@pytest.mark.django_db
def test_api_schema_lists_every_endpoint_of_the_matrix():
    from django.test import Client

    schema = Client().get("/api/schema/?format=json")
    assert schema.status_code == 200
    paths = set(json.loads(schema.content)["paths"])
    for _method, path in ADMIN_ENDPOINTS + TASK_ENDPOINTS:
        template = path.replace("api-n1", "{node_id}").replace("{task}", "{task_id}")
        assert any(p.replace("{id}", "{node_id}") == template for p in paths), (path, sorted(paths))


@pytest.mark.django_db
def test_login_throttle_holds_and_a_throttled_right_password_gets_no_token(settings):
    get_user_model().objects.create_user("t-staff", password="right-password-123", is_staff=True)
    client = APIClient()
    statuses = [
        client.post(
            "/api/admin/auth/login", {"username": "t-staff", "password": f"guess-{i}"}, format="json"
        ).status_code
        for i in range(12)
    ]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    response = client.post(
        "/api/admin/auth/login", {"username": "t-staff", "password": "right-password-123"}, format="json"
    )
    assert response.status_code == 429 and "token" not in response.json()


# --- secrets never leak ---------------------------------------------------------------------------
async def test_keys_tokens_and_plugin_secrets_never_reach_logs_or_responses(node_socket, caplog):
    caplog.set_level(logging.DEBUG)
    _key, plain = await database_sync_to_async(node_key_create)(name="leak-check")
    await open_node_socket(path_with(plain + "x"))  # a refused near-miss
    vcp = await node_socket(path_with(plain, prefix="vcp-distributed-server"))
    manifest = {
        "name": "weather",
        "description": "d",
        "basePath": "/opt/secret-path",
        "pluginSpecificEnvConfig": {"API_KEY": PLUGIN_SECRET},
        "capabilities": {"invocationCommands": [{"command": "go"}]},
    }
    reply = await vcp.request("register_tools", {"serverName": "leaky", "tools": [manifest]})
    assert reply["data"]["success"] is True
    await vcp.send("node_log", {"level": "info", "message": "hello", "context": {"k": 1}})
    await vcp.request("ping")

    def api_bodies() -> str:
        tokens = _users()
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {tokens['staff']}")
        bodies = [
            client.get(p).content.decode()
            for p in (
                "/api/admin/nodes",
                "/api/admin/nodes/vcp-leaky",
                "/api/admin/nodes/vcp-leaky/logs",
                "/api/admin/stats",
            )
        ]
        login = APIClient().post(
            "/api/admin/auth/login", {"username": "m-staff", "password": "pw-staff-123456"}, format="json"
        )
        assert login.status_code == 200
        bad = APIClient().post(
            "/api/admin/auth/login", {"username": "m-staff", "password": PLUGIN_SECRET}, format="json"
        )
        assert bad.status_code == 401
        return "\n".join(bodies), tokens

    bodies, tokens = await database_sync_to_async(api_bodies)()
    stored = await database_sync_to_async(snapshot)()
    for secret in (plain, TEST_SHARED_KEY, PLUGIN_SECRET, "/opt/secret-path", tokens["staff"]):
        assert secret not in caplog.text, secret
        assert secret not in bodies, secret
    assert PLUGIN_SECRET not in stored and "/opt/secret-path" not in stored
    assert "weather" in bodies  # the node and its tool are shown, without the secrets
