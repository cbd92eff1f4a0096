"""Every write of a field the dispatch pass decides by stamps the node's
``dispatch_changed_at``, in whatever process makes it: a pass that starts from rows
kept in memory reads only the rows stamped since they were read before it says no
node can take a task (nodes/node_rows.py). A write that forgot the stamp would
leave that pass blind to the change until the kept rows age out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from nodes import registration_services, services
from nodes.models import Node, NodeStatus
from tests.nodes.test_registry_services import SHARED, conn, payload

pytestmark = pytest.mark.django_db

LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


def node(**fields) -> Node:
    values = {"name": "n1", "status": "online", "connection_id": "c-1", "channel_name": "chan-1"}
    values.update(fields)
    made = Node.objects.create(node_id="n1", **values)
    Node.objects.filter(pk="n1").update(dispatch_changed_at=LONG_AGO)
    return made


def stamp() -> datetime | None:
    return Node.objects.get(pk="n1").dispatch_changed_at


def just_now(value: datetime | None) -> bool:
    return value is not None and timezone.now() - value < timedelta(seconds=30)


def test_a_registration_stamps_the_node():
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    assert just_now(stamp())
    Node.objects.filter(pk="n1").update(dispatch_changed_at=LONG_AGO)
    registration_services.node_register(
        payload=payload(maxConcurrentTasks=5), connection=conn(2), identity=SHARED
    )
    assert just_now(stamp())  # a takeover, with a new limit


def test_a_status_change_stamps_the_node_and_a_repeated_status_does_not():
    node(status=NodeStatus.OFFLINE)
    services.node_set_status(node_id="n1", connection_id="c-1", status=NodeStatus.ONLINE)
    assert just_now(stamp())
    Node.objects.filter(pk="n1").update(dispatch_changed_at=LONG_AGO)
    services.node_set_status(node_id="n1", connection_id="c-1", status=NodeStatus.ONLINE)
    assert stamp() == LONG_AGO


def test_a_heartbeat_stamps_only_a_node_it_brings_back_online():
    node(status=NodeStatus.OFFLINE)
    at = timezone.now()
    services.node_flush_heartbeats([services.HeartbeatRecord("n1", "c-1", at)])
    assert just_now(stamp())
    Node.objects.filter(pk="n1").update(dispatch_changed_at=LONG_AGO)
    services.node_flush_heartbeats([services.HeartbeatRecord("n1", "c-1", at)])
    assert stamp() == LONG_AGO  # heartbeats alone change nothing the pass decides by


def test_a_disconnect_and_the_liveness_sweep_stamp_the_node():
    node()
    services.node_disconnected(node_id="n1", connection_id="c-1")
    assert just_now(stamp())
    Node.objects.filter(pk="n1").update(
        status=NodeStatus.ONLINE, connection_id="c-2", last_heartbeat=LONG_AGO, dispatch_changed_at=LONG_AGO
    )
    assert services.node_sweep_heartbeat_timeouts()
    assert just_now(stamp())


def test_draining_resuming_and_new_tools_stamp_the_node():
    node()
    services.node_set_draining(node_id="n1", draining=True)
    assert just_now(stamp())
    Node.objects.filter(pk="n1").update(dispatch_changed_at=LONG_AGO)
    services.node_set_draining(node_id="n1", draining=False)
    assert just_now(stamp())
    Node.objects.filter(pk="n1").update(dispatch_changed_at=LONG_AGO)
    services.node_set_tools(node_id="n1", connection_id="c-1", tools=["read"], manifests=None)
    assert just_now(stamp())


def test_a_save_stamps_only_when_it_writes_a_dispatch_field():
    made = node()
    made.refresh_from_db()
    made.name = "renamed"
    made.save(update_fields=["name"])
    assert stamp() == LONG_AGO
    made.max_concurrent_tasks = 4  # as the admin's change form
    made.save()
    assert just_now(stamp())
