"""Hub events on ``/ws/admin/events/`` (PROTOCOL §5): who may listen, and the shape of
every event type."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token

from nodes import events, services
from nodes.auth import node_key_create
from tests.conftest import close_communicator

pytestmark = pytest.mark.django_db(transaction=True)


def make_user(username: str, *, staff: bool, active: bool = True) -> tuple[str, str]:
    """Create a user; returns (API token, session id)."""
    user = get_user_model().objects.create_user(
        username=username, password="pw-123456789", is_staff=staff, is_active=active
    )
    token = Token.objects.create(user=user).key
    client = Client()
    client.force_login(user)
    return token, client.cookies[django_settings.SESSION_COOKIE_NAME].value


async def user(username: str = "staff", *, staff: bool = True, active: bool = True) -> tuple[str, str]:
    return await database_sync_to_async(make_user)(username, staff=staff, active=active)


class AdminSocket:
    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator

    async def next(self, event_type: str | None = None, timeout: float = 3) -> dict:
        while True:
            message = await self.communicator.receive_json_from(timeout)
            if event_type is None or message["type"] == event_type:
                return message

    async def all(self, timeout: float = 0.3) -> list[dict]:
        received = []
        while not await self.communicator.receive_nothing(timeout):
            received.append(await self.communicator.receive_json_from())
        return received


@pytest.fixture
async def admin_events():
    """Factory: open an admin events socket; returns (connected, AdminSocket)."""
    from apexbridge.asgi import application

    opened: list[WebsocketCommunicator] = []

    async def open_socket(query: str = "", headers=None) -> tuple[bool, AdminSocket]:
        path = "/ws/admin/events/" + (f"?{query}" if query else "")
        communicator = WebsocketCommunicator(application, path, headers=headers or [])
        connected, _ = await communicator.connect()
        if connected:
            opened.append(communicator)
        return connected, AdminSocket(communicator)

    yield open_socket
    for communicator in opened:
        await close_communicator(communicator)


@pytest.fixture
async def staff_events(admin_events):
    token, _session = await user()
    connected, socket = await admin_events(f"token={token}")
    assert connected
    return socket


# --- who may listen --------------------------------------------------------------------------
async def test_staff_token_and_staff_session_are_accepted(admin_events):
    token, session = await user()
    assert (await admin_events(f"token={token}"))[0]
    cookie = f"{django_settings.SESSION_COOKIE_NAME}={session}".encode()
    assert (await admin_events(headers=[(b"cookie", cookie)]))[0]
    assert (await admin_events(f"token={token}", headers=[(b"origin", b"http://localhost:8000")]))[0]


async def test_others_are_refused(admin_events):
    staff_token, _ = await user("staff")
    plain_token, plain_session = await user("plain", staff=False)
    retired_token, _ = await user("retired", staff=True, active=False)
    _key, node_key = await database_sync_to_async(node_key_create)(name="k")

    assert not (await admin_events())[0]
    assert not (await admin_events("token="))[0]
    assert not (await admin_events("token=not-a-token"))[0]
    assert not (await admin_events(f"token={plain_token}"))[0]
    assert not (await admin_events(f"token={retired_token}"))[0]
    assert not (await admin_events(f"token={node_key}"))[0]
    cookie = f"{django_settings.SESSION_COOKIE_NAME}={plain_session}".encode()
    assert not (await admin_events(headers=[(b"cookie", cookie)]))[0]
    for origin in (b"http://evil.example.com", b"https://localhost.evil.example.com", b"null"):
        assert not (await admin_events(f"token={staff_token}", headers=[(b"origin", origin)]))[0]


async def test_a_refused_listener_hears_nothing(admin_events, node_socket):
    connected, socket = await admin_events("token=wrong")
    assert not connected
    node = await node_socket()
    await node.register("quiet")
    assert await socket.communicator.receive_nothing(0.3)


# --- node events -----------------------------------------------------------------------------
async def test_node_registered_and_status_changed_shapes(staff_events, node_socket):
    node = await node_socket()
    await node.register("ev-1", capabilities=["echo"], tools=["echo"], config={"tags": ["gpu"]})

    registered = await staff_events.next("node_registered")
    assert set(registered["data"]) == {"node", "timestamp"}
    assert isinstance(registered["data"]["timestamp"], int)
    info = registered["data"]["node"]
    assert info["nodeId"] == info["id"] == "ev-1"
    assert info["name"] == "ev-1" and info["type"] == "worker" and info["protocol"] == "abp"
    assert info["status"] == "online" and info["connected"] is True
    assert info["capabilities"] == ["echo"] and info["tools"] == ["echo"]
    assert info["config"]["tags"] == ["gpu"] and info["config"]["maxConcurrentTasks"] == 1
    assert isinstance(info["registeredAt"], int) and isinstance(info["lastHeartbeat"], int)
    assert set(info["stats"]) >= {"totalTasks", "completedTasks", "failedTasks", "averageResponseTime"}

    changed = await staff_events.next("node_status_changed")
    assert changed["data"] == {
        "nodeId": "ev-1",
        "oldStatus": "offline",
        "newStatus": "online",
        "timestamp": changed["data"]["timestamp"],
    }
    assert isinstance(changed["data"]["timestamp"], int)


async def test_status_events_for_busy_and_disconnect(staff_events, node_socket):
    node = await node_socket()
    await node.register("ev-2")
    await staff_events.all()
    await node.request("heartbeat", {"status": "busy"})
    changed = await staff_events.next("node_status_changed")
    assert (changed["data"]["oldStatus"], changed["data"]["newStatus"]) == ("online", "busy")

    await node.close()
    changed = await staff_events.next("node_status_changed")
    assert changed["data"]["nodeId"] == "ev-2"
    assert (changed["data"]["oldStatus"], changed["data"]["newStatus"]) == ("busy", "offline")


async def test_plain_heartbeats_publish_nothing(staff_events, node_socket):
    node = await node_socket()
    await node.register("ev-3")
    await staff_events.all()
    for _ in range(3):
        await node.request("heartbeat", {})
    assert await staff_events.all() == []


async def test_node_unregistered_shape(staff_events, node_socket):
    node = await node_socket()
    await node.register("ev-4")
    await staff_events.all()
    await node.request("node_unregister", {"reason": "maintenance"})
    gone = await staff_events.next("node_unregistered")
    assert set(gone["data"]) == {"nodeId", "reason", "timestamp"}
    assert gone["data"]["nodeId"] == "ev-4" and gone["data"]["reason"] == "maintenance"
    assert isinstance(gone["data"]["timestamp"], int)


async def test_heartbeat_timeout_status_event(staff_events, node_socket):
    node = await node_socket()
    await node.register("ev-5")
    await staff_events.all()
    later = timezone.now() + timedelta(milliseconds=django_settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS + 1000)
    await database_sync_to_async(services.node_sweep_heartbeat_timeouts)(now=later)
    changed = await staff_events.next("node_status_changed")
    assert changed["data"]["nodeId"] == "ev-5"
    assert (changed["data"]["oldStatus"], changed["data"]["newStatus"]) == ("online", "offline")


async def test_a_refused_registration_publishes_nothing(staff_events, node_socket):
    _key, plain = await database_sync_to_async(node_key_create)(name="bound", node_id="only-me")
    node = await node_socket(f"/abp-distributed-server/VCP_Key={plain}")
    reply = await node.request("node_register", {"nodeId": "not-me", "name": "x", "capabilities": []})
    assert reply["data"]["error"]["code"] == "forbidden"
    assert await staff_events.all() == []


# --- every event type: the envelope ------------------------------------------------------------
OTHER_EVENT_TYPES = sorted(
    events.EVENT_TYPES
    - events.NOT_SENT_TO_ADMIN
    - {"node_registered", "node_unregistered", "node_status_changed"}
)


@pytest.mark.parametrize("event_type", OTHER_EVENT_TYPES)
async def test_every_event_type_reaches_staff_with_a_timestamp(staff_events, event_type):
    if event_type.startswith("task_"):
        data = {"task": {"taskId": "t-1", "status": event_type.removeprefix("task_")}}
    else:
        data = {"requestId": "r-1", "nodeId": "n-1", "model": "m", "usage": {"totalTokens": 3}}

    def publish_in_a_transaction() -> None:
        with transaction.atomic():
            events.publish(event_type, data)

    await database_sync_to_async(publish_in_a_transaction)()
    message = await staff_events.next()
    assert message["type"] == event_type
    assert isinstance(message["data"].pop("timestamp"), int)
    assert message["data"] == data


async def test_apublish_and_the_stream_chunk_event(staff_events):
    await events.apublish("llm_proxy_stream_chunk", {"requestId": "r-1", "nodeId": "n", "chunk": "x"})
    await events.apublish("llm_proxy_completed", {"requestId": "r-2", "nodeId": "n", "model": "m"})
    messages = await staff_events.all()
    assert [m["type"] for m in messages] == ["llm_proxy_completed"]
    assert messages[0]["data"]["requestId"] == "r-2"


async def test_nothing_is_published_for_a_rolled_back_change(staff_events):
    def rolled_back() -> None:
        try:
            with transaction.atomic():
                events.publish("node_unregistered", {"nodeId": "ghost", "reason": "x"})
                raise RuntimeError("roll back")
        except RuntimeError:
            pass

    await database_sync_to_async(rolled_back)()
    assert await staff_events.all() == []


def test_unknown_event_type_is_a_programming_error():
    with pytest.raises(ValueError):
        events.publish("node_exploded", {})
    with pytest.raises(ValueError):
        asyncio.run(events.apublish("node_exploded", {}))


async def test_events_reach_every_listener(admin_events, node_socket):
    token, _ = await user()
    sockets = [(await admin_events(f"token={token}"))[1] for _ in range(2)]
    node = await node_socket()
    await node.register("ev-6")
    for socket in sockets:
        assert (await socket.next("node_registered"))["data"]["node"]["nodeId"] == "ev-6"
    assert json.dumps(await sockets[0].all(), default=str)  # the rest arrives as JSON


# --- in a hub process: events leave through one sender task on the hub's loop ---------------
async def _until_sent(sent: list[str], count: int, timeout: float = 1.0) -> None:
    """Give the sender task up to ``timeout`` seconds to hand ``count`` events to the layer."""
    for _ in range(int(timeout / 0.01)):
        if len(sent) >= count:
            return
        await asyncio.sleep(0.01)


async def test_in_a_hub_process_the_publishing_thread_does_not_wait_and_order_is_kept(monkeypatch):
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(events, "_hub_loop", lambda: loop)
    layer_may_answer = asyncio.Event()
    sent: list[str] = []

    async def slow_layer(message):
        await layer_may_answer.wait()  # a channel layer that has not answered yet
        sent.extend(event["data"]["nodeId"] for event in events.unbundle(message))

    monkeypatch.setattr(events, "_group_send", slow_layer)

    def publish_three() -> None:
        with transaction.atomic():
            for node_id in ("a", "b", "c"):
                events.publish("node_unregistered", {"nodeId": node_id, "reason": "x"})

    # Returns although the layer has sent nothing: the thread did not wait for it.
    await asyncio.wait_for(database_sync_to_async(publish_three)(), 5)
    await events.apublish("llm_proxy_completed", {"nodeId": "d", "requestId": "r", "model": "m"})
    assert sent == []
    layer_may_answer.set()
    await _until_sent(sent, 4)
    assert sent == ["a", "b", "c", "d"]


async def test_a_hung_channel_layer_drops_the_oldest_events_with_a_warning(monkeypatch, caplog):
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(events, "_hub_loop", lambda: loop)
    monkeypatch.setattr(events, "MAX_PENDING", 3)
    monkeypatch.setattr(events, "_dropped", 0)
    hung = asyncio.Event()
    sent: list[str] = []

    async def hung_layer(message):
        sent.extend(event["data"]["nodeId"] for event in events.unbundle(message))
        await hung.wait()

    monkeypatch.setattr(events, "_group_send", hung_layer)

    def deliver(node_id: str) -> None:
        events._deliver(events._layer_message("node_unregistered", {"nodeId": node_id, "reason": "x"}))

    deliver("a")
    await asyncio.sleep(0.05)  # the sender took "a" and hangs on it
    assert sent == ["a"]
    for node_id in ("b", "c", "d", "e", "f"):
        deliver(node_id)
    assert [m["data"]["nodeId"] for m in events._pending] == ["d", "e", "f"]  # b and c dropped
    assert "channel layer too slow for hub events: 1 event(s) dropped so far" in caplog.text
    hung.set()
    await _until_sent(sent, 4)
    assert sent == ["a", "d", "e", "f"]


def test_an_event_published_while_the_hub_loop_stops_is_dropped_without_error(monkeypatch, caplog):
    stopped = asyncio.new_event_loop()
    stopped.close()
    monkeypatch.setattr(events, "_hub_loop", lambda: stopped)
    caplog.set_level("INFO", logger="nodes.events")
    events._deliver(events._layer_message("node_unregistered", {"nodeId": "late", "reason": "x"}))
    assert "event node_unregistered not published: the hub's event loop has stopped" in caplog.text


async def test_events_that_queue_up_leave_together_and_arrive_one_frame_each_in_order(
    staff_events, monkeypatch
):
    from channels.layers import get_channel_layer

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(events, "_hub_loop", lambda: loop)
    layer = get_channel_layer()
    layer_messages: list[int] = []
    real_group_send = layer.group_send

    async def counted(group, message):
        layer_messages.append(len(events.unbundle(message)))
        await real_group_send(group, message)

    monkeypatch.setattr(layer, "group_send", counted)
    # A burst published on the hub's loop (a registration storm): queued before the
    # sender task gets to run.
    for n in range(150):
        events._deliver(events._layer_message("node_unregistered", {"nodeId": f"burst-{n}", "reason": "x"}))
    received = [(await staff_events.next("node_unregistered"))["data"] for _ in range(150)]
    assert [data["nodeId"] for data in received] == [f"burst-{n}" for n in range(150)]
    assert all(set(data) == {"nodeId", "reason", "timestamp"} for data in received)
    assert layer_messages == [100, 50]  # two layer messages, not 150
