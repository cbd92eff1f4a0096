"""A ``task_assign`` the channel layer refuses (Redis down) never reached its node: the
attempt goes back to the queue at once, uncounted, and dispatch waits for the layer."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync

from nodes import runtime as runtime_module
from nodes import task_services
from nodes.models import Node, Task
from nodes.service_health import layer_health

pytestmark = pytest.mark.django_db(transaction=True)


class BrokenLayer:
    """A channel layer whose server is gone."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.up = False

    async def send(self, channel: str, message: dict) -> None:
        if not self.up:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")
        self.sent.append((channel, message))

    async def group_send(self, group: str, message: dict) -> None:
        await self.send(group, message)

    def connection(self, index: int):
        layer = self

        class Client:
            async def ping(self) -> bool:
                if not layer.up:
                    raise ConnectionError("Error 111 connecting to 127.0.0.1:6379")
                return True

        return Client()


@pytest.fixture
def broken_layer(monkeypatch):
    layer = BrokenLayer()
    monkeypatch.setattr(runtime_module, "get_channel_layer", lambda: layer)
    monkeypatch.setattr("nodes.events.get_channel_layer", lambda: layer)
    yield layer
    layer_health.recovered()


@pytest.fixture
def node():
    return Node.objects.create(
        node_id="n1", name="n1", status="online", connection_id="c-n1", channel_name="ch-n1"
    )


def test_an_assign_that_cannot_be_sent_goes_back_to_the_queue_uncounted(broken_layer, node, caplog):
    # Given a queued task and a node, while the channel layer is down
    task = task_services.task_submit(tool_name="echo", node_id="n1").task
    # When a dispatch pass assigns it and the notice cannot be sent
    async_to_sync(runtime_module.runtime.dispatch)()
    # Then (the first failure is only discovered by sending) the task is queued
    # again, its attempt not counted, saying why it waits
    task = Task.objects.get(pk=task.pk)
    assert task.status == "queued"
    assert task.attempts == 0
    assert task.assigned_node_id == ""
    assert task.waiting_reason.startswith("could not notify node n1 (channel layer: ConnectionError")
    assert Node.objects.get(pk="n1").total_tasks == 0
    assert "channel layer unavailable" in caplog.text

    # And while the layer stays down, further passes leave the task queued
    async_to_sync(runtime_module.runtime.dispatch)()
    assert Task.objects.get(pk=task.pk).status == "queued"
    assert Task.objects.get(pk=task.pk).attempts == 0

    # When the layer is back, the next pass delivers attempt 1
    broken_layer.up = True
    async_to_sync(runtime_module.runtime.dispatch)()
    task = Task.objects.get(pk=task.pk)
    assert (task.status, task.attempts) == ("assigned", 1)
    assigns = [m for _, m in broken_layer.sent if m.get("type") == "node.send"]
    assert len(assigns) == 1 and '"task_assign"' in assigns[0]["frame"]
    assert "channel layer available again" in caplog.text


def test_only_the_attempt_that_was_sent_is_put_back(node):
    # Given a task whose attempt 1 has since been answered
    task = task_services.task_submit(tool_name="echo", node_id="n1").task
    Task.objects.filter(pk=task.pk).update(status="succeeded", attempts=1)
    # When a late failure report for attempt 1 arrives
    returned = task_services.task_return_undelivered([(task.task_id, 1)], "channel layer: test")
    # Then nothing changes
    assert returned == 0
    assert Task.objects.get(pk=task.pk).status == "succeeded"


def test_a_failed_cancel_notice_changes_no_task(broken_layer, node):
    # Given an assigned task
    task = task_services.task_submit(tool_name="echo", node_id="n1").task
    broken_layer.up = True
    async_to_sync(runtime_module.runtime.dispatch)()
    broken_layer.up = False
    # When a message that assigns nothing cannot be sent
    asyncio.run(
        runtime_module.send_all([("ch-n1", {"type": "node.status", "nodeId": "n1", "status": "offline"})])
    )
    # Then the task keeps its attempt
    task = Task.objects.get(pk=task.pk)
    assert (task.status, task.attempts) == ("assigned", 1)
