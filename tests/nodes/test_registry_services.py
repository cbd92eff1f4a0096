"""Registry services (PROTOCOL §2) called directly: what a second connection, a
stale connection or a restricted key may and may not change."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from nodes import events, registration_services, services
from nodes.auth import KeyIdentity
from nodes.models import Node, NodeLog
from nodes.protocol import NodeRegisterPayload, ProtocolError, node_info_data

pytestmark = pytest.mark.django_db

SHARED = KeyIdentity(kind="shared", name="shared")


def conn(n: int) -> registration_services.Connection:
    return registration_services.Connection(
        connection_id=f"c-{n}", channel_name=f"chan-{n}", process_id="hub-test"
    )


def payload(node_id: str | None = "n1", **fields) -> NodeRegisterPayload:
    data = {"nodeId": node_id, "name": fields.pop("name", node_id or "anon"), "capabilities": []}
    data.update(fields)
    return NodeRegisterPayload.model_validate({k: v for k, v in data.items() if v is not None})


@pytest.fixture
def published(monkeypatch, django_capture_on_commit_callbacks):
    """Events published after commit, as (type, data) pairs."""
    seen: list[tuple[str, dict]] = []
    monkeypatch.setattr(events, "_send_now", lambda message: seen.append((message["event"], message["data"])))

    class Recorder:
        def __call__(self):
            return django_capture_on_commit_callbacks(execute=True)

        @property
        def events(self):
            return seen

    return Recorder()


def test_register_new_then_takeover(published):
    with published():
        first = registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    assert first.created is True and first.replaced_channel_name == ""
    assert [t for t, _ in published.events] == ["node_registered", "node_status_changed"]

    Node.objects.filter(pk="n1").update(completed_tasks=3, total_response_time_ms=300, total_tasks=3)
    with published():
        second = registration_services.node_register(payload=payload(), connection=conn(2), identity=SHARED)
    assert second.created is False
    assert second.replaced_channel_name == "chan-1"  # the older socket to close with 4000
    row = Node.objects.get(pk="n1")
    assert row.connection_id == "c-2" and row.completed_tasks == 3
    # Online -> online is no status change.
    assert [t for t, _ in published.events][2:] == ["node_registered"]
    assert node_info_data(row)["stats"]["averageResponseTime"] == 100


def test_register_again_on_the_same_connection_replaces_nothing():
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    again = registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    assert again.replaced_channel_name == ""


def test_takeover_of_a_disconnected_node_closes_nothing():
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    assert services.node_disconnected(node_id="n1", connection_id="c-1") is True
    result = registration_services.node_register(payload=payload(), connection=conn(2), identity=SHARED)
    assert result.replaced_channel_name == ""
    assert Node.objects.get(pk="n1").status == "online"


def test_draining_survives_a_reconnect():
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    services.node_set_draining(node_id="n1", draining=True)
    services.node_disconnected(node_id="n1", connection_id="c-1")
    registration_services.node_register(payload=payload(), connection=conn(2), identity=SHARED)
    assert Node.objects.get(pk="n1").draining is True
    assert services.node_set_draining(node_id="missing", draining=True) is None


def test_restricted_keys_refuse_and_roll_back(published):
    bound = KeyIdentity(kind="node", key_id=None, name="k", node_id="only-me")
    with pytest.raises(ProtocolError) as refused:
        with published():
            registration_services.node_register(payload=payload("other"), connection=conn(1), identity=bound)
    assert refused.value.code == "forbidden"
    capped = KeyIdentity(kind="node", key_id=None, name="k", capabilities=("echo",))
    with pytest.raises(ProtocolError) as refused:
        registration_services.node_register(
            payload=payload("n2", capabilities=["echo", "shell"]), connection=conn(1), identity=capped
        )
    assert refused.value.code == "forbidden"
    assert Node.objects.count() == 0 and NodeLog.objects.count() == 0
    assert published.events == []

    result = registration_services.node_register(payload=payload(None), connection=conn(1), identity=bound)
    assert result.node.node_id == "only-me"


def test_node_limit(settings):
    settings.APEXBRIDGE_MAX_NODES = 1
    registration_services.node_register(payload=payload("a"), connection=conn(1), identity=SHARED)
    with pytest.raises(ProtocolError) as refused:
        registration_services.node_register(payload=payload("b"), connection=conn(2), identity=SHARED)
    assert refused.value.code == "node_limit_reached"
    assert list(Node.objects.values_list("pk", flat=True)) == ["a"]


def test_a_stale_connection_changes_nothing():
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    registration_services.node_register(payload=payload(), connection=conn(2), identity=SHARED)  # takeover
    before = Node.objects.values().get(pk="n1")

    assert services.node_set_status(node_id="n1", connection_id="c-1", status="busy") is None
    assert services.node_disconnected(node_id="n1", connection_id="c-1") is False
    assert services.node_unregister(node_id="n1", reason="x", connection_id="c-1") is None
    assert services.node_set_tools(node_id="n1", connection_id="c-1", tools=["x"], manifests=None) is None
    assert services.node_remove_tools(node_id="n1", connection_id="c-1", tools=["x"]) is None
    assert services.node_set_ips(node_id="n1", connection_id="c-1", ips={"publicIP": "1.2.3.4"}) is False
    stale = services.HeartbeatRecord("n1", "c-1", timezone.now() + timedelta(hours=1), {"x": 1})
    assert services.node_flush_heartbeats([stale]) == []

    assert Node.objects.values().get(pk="n1") == before


def test_unregister_removes_the_node_but_keeps_its_log(published):
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    services.node_log_add(node_id="n1", message="hello")
    with published():
        removed = services.node_unregister(node_id="n1", reason="decommissioned")
    assert removed is not None
    assert not Node.objects.filter(pk="n1").exists()
    assert NodeLog.objects.filter(node_id="n1", message="hello").exists()
    assert published.events[-1][0] == "node_unregistered"
    assert published.events[-1][1]["nodeId"] == "n1"
    assert published.events[-1][1]["reason"] == "decommissioned"
    assert services.node_unregister(node_id="n1", reason="again") is None


def test_status_change_is_written_and_published_once(published):
    registration_services.node_register(payload=payload(), connection=conn(1), identity=SHARED)
    with published():
        assert services.node_set_status(node_id="n1", connection_id="c-1", status="busy") == "online"
        assert services.node_set_status(node_id="n1", connection_id="c-1", status="busy") == "busy"
    changes = [d for t, d in published.events if t == "node_status_changed"]
    assert [(d["oldStatus"], d["newStatus"]) for d in changes][-1:] == [("online", "busy")]
    assert len([d for d in changes if d["newStatus"] == "busy"]) == 1
    assert Node.objects.get(pk="n1").status == "busy"


def test_tools_of_abp_and_vcp_nodes():
    registration_services.node_register(
        payload=payload("abp", capabilities=["c"]), connection=conn(1), identity=SHARED
    )
    node = services.node_set_tools(node_id="abp", connection_id="c-1", tools=["a", "b", "a"], manifests=None)
    assert node.tools == ["a", "b"] and node.capabilities == ["c"]
    node = services.node_remove_tools(node_id="abp", connection_id="c-1", tools=["a"])
    assert node.tools == ["b"]

    registration_services.node_register(
        payload=payload("vcp-x", capabilities=["t1", "t2"], tools=["t1", "t2"]),
        connection=conn(2),
        identity=SHARED,
        protocol="vcp",
        tool_manifests=[{"name": "t1"}, {"name": "t2"}],
    )
    node = services.node_remove_tools(node_id="vcp-x", connection_id="c-2", tools=["t1"])
    assert node.tools == ["t2"] and node.capabilities == ["t2"] and node.tool_manifests == [{"name": "t2"}]


def test_logs_are_capped_per_node(settings):
    settings.APEXBRIDGE_NODE_LOG_CAP = 5
    for i in range(12):
        services.node_log_add(node_id="chatty", message=f"m{i}")
    services.node_log_add(node_id="quiet", message="only")
    assert services.node_logs_prune() == 7
    kept = list(NodeLog.objects.filter(node_id="chatty").order_by("id").values_list("message", flat=True))
    assert kept == ["m7", "m8", "m9", "m10", "m11"]
    assert NodeLog.objects.filter(node_id="quiet").count() == 1


def test_long_log_messages_are_truncated():
    services.node_log_add(node_id="n", message="x" * 20000)
    assert len(NodeLog.objects.get(node_id="n").message) == 10000
