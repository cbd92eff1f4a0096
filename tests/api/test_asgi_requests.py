"""HTTP requests through the hub's own ASGI application (apexbridge/asgi.py), whose
handler runs a request's middleware and view in one thread hop: every middleware
must still do its job, and the API's token check must still be exact."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

from apexbridge.asgi import application
from nodes.models import Task

pytestmark = pytest.mark.django_db(transaction=True)


async def request(method: str, path: str, body: bytes = b"", headers=()) -> tuple[int, dict, bytes]:
    headers = [(b"host", b"localhost"), (b"content-length", str(len(body)).encode()), *headers]
    communicator = HttpCommunicator(application, method, path, body=body, headers=headers)
    response = await communicator.get_response(timeout=10)
    named = {}
    for name, value in response["headers"]:
        named.setdefault(name.decode().lower(), []).append(value.decode())
    return response["status"], named, response["body"]


@pytest.fixture
def staff_token(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

    def make() -> str:
        user = get_user_model().objects.create_user("asgi-staff", password="pw-asgi-123456", is_staff=True)
        return Token.objects.create(user=user).key

    return make


async def test_the_middleware_still_sets_its_headers_and_the_csrf_cookie():
    status, headers, _ = await request("GET", "/admin/login/")
    assert status == 200
    assert headers["x-frame-options"] == ["DENY"]
    assert headers["x-content-type-options"] == ["nosniff"]
    assert any(cookie.startswith("csrftoken=") for cookie in headers["set-cookie"])


async def test_a_form_post_without_its_csrf_token_is_refused():
    status, _, _ = await request(
        "POST",
        "/admin/login/",
        body=b"username=a&password=b",
        headers=[(b"content-type", b"application/x-www-form-urlencoded")],
    )
    assert status == 403


async def test_a_task_submitted_by_token_is_queued_and_a_deleted_token_is_refused_at_once(staff_token):
    key = await database_sync_to_async(staff_token)()
    headers = [(b"authorization", f"Token {key}".encode()), (b"content-type", b"application/json")]
    body = json.dumps({"toolName": "echo", "toolArgs": {"text": "hi"}}).encode()

    status, _, answer = await request("POST", "/api/tasks", body=body, headers=headers)
    assert status == 201, answer
    task_id = json.loads(answer)["task"]["taskId"]
    assert await Task.objects.filter(pk=task_id, created_by="asgi-staff").aexists()

    # When the token is deleted, the very next request with it is refused
    await Token.objects.filter(key=key).adelete()
    status, _, answer = await request("POST", "/api/tasks", body=body, headers=headers)
    assert status == 401
    assert await Task.objects.acount() == 1  # nothing more was queued
