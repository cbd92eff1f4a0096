"""HTTP requests through the hub's own ASGI application (apexbridge/asgi.py), whose
handler runs a request's signals, middleware and view in one hop to a pooled thread:
every middleware must still do its job, the API's token check must still be exact,
and each request must still finish (its database connection closed) in its thread."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from channels.db import database_sync_to_async
from channels.testing import HttpCommunicator
from django.contrib.auth import get_user_model
from django.core.signals import request_finished, request_started
from django.db import connection, connections
from django.db.backends.signals import connection_created
from django.http import StreamingHttpResponse
from rest_framework.authtoken.models import Token

from apexbridge.asgi import REQUEST_THREADS, OneHopASGIHandler, application
from apexbridge.threads import ElasticThreadPool
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


@pytest.fixture
def request_signals():
    """Which thread ``request_started`` and ``request_finished`` ran in, and whether
    that thread still held a database connection when the request finished."""
    seen = {"started": [], "connected": [], "finished": []}

    def started(**kwargs):
        seen["started"].append(threading.get_ident())

    def connected(**kwargs):
        seen["connected"].append(threading.get_ident())

    def finished(**kwargs):  # connected after Django's close_old_connections: runs after it
        seen["finished"].append((threading.get_ident(), connection.connection is None))

    request_started.connect(started)
    connection_created.connect(connected)
    request_finished.connect(finished)
    yield seen
    request_started.disconnect(started)
    connection_created.disconnect(connected)
    request_finished.disconnect(finished)


async def test_a_request_starts_and_finishes_in_the_thread_that_used_the_database(
    staff_token, request_signals
):
    key = await database_sync_to_async(staff_token)()
    headers = [(b"authorization", f"Token {key}".encode())]
    request_signals["connected"].clear()  # the token's creation

    for _ in range(2):
        status, _, answer = await request("GET", "/api/tasks/no-such-task", headers=headers)
        assert status == 404, answer  # the token and the task were looked up in the database

    # Each request's connection was closed where it was opened (CONN_MAX_AGE = 0), not
    # left open in a thread that a later request would pick up
    seen = request_signals
    assert len(seen["started"]) == len(seen["connected"]) == len(seen["finished"]) == 2
    threads = zip(seen["started"], seen["connected"], seen["finished"], strict=True)
    for started_in, connected_in, (finished_in, closed) in threads:
        assert started_in == connected_in == finished_in
        assert closed


async def test_a_request_that_cannot_be_decoded_is_refused_and_still_finished(request_signals):
    communicator = HttpCommunicator(application, "GET", "/api/schema/", headers=[(b"host", b"localhost")])
    communicator.scope["query_string"] = b"format=\xff"  # not UTF-8
    response = await communicator.get_response(timeout=10)
    assert response["status"] == 400
    assert len(request_signals["finished"]) == 1


async def test_a_streaming_response_is_sent_whole_then_closed_and_its_views_connection_too(
    request_signals, monkeypatch
):
    closed = []
    handler = OneHopASGIHandler()

    async def parts():
        yield b"first,"
        yield b"second"

    used = []

    def stream(request):  # a view that reads the database, then streams
        assert Task.objects.count() == 0
        used.append(connections["default"])  # this thread's connection (not the proxy)
        response = StreamingHttpResponse(parts(), content_type="text/plain")
        response._resource_closers.append(lambda: closed.append(True))
        return response

    monkeypatch.setattr(handler, "get_response", stream)
    communicator = HttpCommunicator(handler, "GET", "/anything", headers=[(b"host", b"localhost")])
    await communicator.send_input({"type": "http.request", "body": b""})
    start = await communicator.receive_output(timeout=10)
    assert start["status"] == 200
    body = b""
    while True:
        message = await communicator.receive_output(timeout=10)
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await communicator.wait(timeout=10)
    assert body == b"first,second"
    assert closed == [True]
    assert len(request_signals["finished"]) == 1
    assert used[0].connection is None  # the view's connection was closed in its thread


def test_importing_the_application_in_a_set_up_process_keeps_its_logging():
    """Tests and management commands set Django up before they import the ASGI
    application: importing it then must not configure logging anew (that dropped the
    handlers a test had added, so a test's log capture saw nothing)."""
    script = (
        "import logging, django\n"
        "django.setup()\n"
        "handler = logging.NullHandler()\n"
        "logging.getLogger().addHandler(handler)\n"
        "import apexbridge.asgi\n"
        "print(handler in logging.getLogger().handlers)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "apexbridge.settings"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"


async def test_a_request_waiting_for_its_task_does_not_hold_up_other_requests(staff_token):
    key = await database_sync_to_async(staff_token)()
    headers = [(b"authorization", f"Token {key}".encode()), (b"content-type", b"application/json")]
    body = json.dumps({"toolName": "echo"}).encode()  # no node: it stays queued
    waiting = asyncio.create_task(request("POST", "/api/tasks?wait=3", body=body, headers=headers))
    await asyncio.sleep(0.3)  # it has submitted and is waiting now
    others = await asyncio.gather(*(request("GET", "/api/tasks/none", headers=headers) for _ in range(3)))
    assert [status for status, _, _ in others] == [404, 404, 404]
    assert not waiting.done()  # the others were answered while it waited
    status, _, answer = await waiting
    assert status == 201
    assert json.loads(answer)["task"]["status"] == "queued"


def test_a_request_thread_that_ends_closes_its_database_connection():
    """With persistent connections a request thread keeps its connection between
    requests; when the thread ends (idle), the connection must close with it, not
    wait for a garbage collection (a Django connection is in a reference cycle)."""
    pool = ElasticThreadPool("t", idle_s=0.05, on_exit=REQUEST_THREADS.on_exit)

    def query():
        Task.objects.exists()
        return connections["default"]  # this thread's

    used = pool.submit(query).result(timeout=5)
    assert used.connection is not None  # open, as a kept connection would be
    deadline = time.monotonic() + 5
    while pool.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.threads == 0
    assert used.connection is None
