"""Management commands: nodes, create_node_key, revoke_node_key, sweep."""

from __future__ import annotations

import re
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from nodes.auth import authenticate_key, hash_key, node_key_create
from nodes.models import Node, NodeKey

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_nodes_table_and_filters(make_node):
    make_node("w1", capabilities=["echo", "sha256"])
    make_node("c1", type="companion", status="offline", connection_id="", capabilities=["chat"])
    out = run("nodes")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "NAME",
        "TYPE",
        "STATUS",
        "CONNECTED",
        "DRAINING",
        "CAPABILITIES",
        "LAST",
        "HEARTBEAT",
    ]
    assert any(line.split()[:4] == ["w1", "w1", "worker", "online"] for line in lines)
    assert "2 node(s)" in out
    assert "c1" not in run("nodes", "--status", "online")
    assert "w1" not in run("nodes", "--type", "companion")
    filtered = run("nodes", "--capability", "sha256")
    assert "w1" in filtered and "c1" not in filtered and "1 node(s)" in filtered
    assert '"nodeId": "w1"' in run("nodes", "--json")


def test_nodes_rejects_a_bad_status(db):
    with pytest.raises(CommandError):
        call_command("nodes", "--status", "sleeping")


def test_create_node_key_prints_the_key_once_and_the_url(db):
    out = run(
        "create_node_key",
        "--name",
        "lab",
        "--node-id",
        "lab-1",
        "--capability",
        "echo",
        "--capability",
        "sha256",
    )
    key_line = re.search(r"^key: (\S+)$", out, re.M).group(1)
    url = re.search(r"^url: (\S+)$", out, re.M).group(1)
    assert url == f"ws://127.0.0.1:8000/abp-distributed-server/VCP_Key={key_line}"
    key = NodeKey.objects.get()
    assert (
        key.key_hash == hash_key(key_line)
        and key.node_id == "lab-1"
        and key.capabilities == ["echo", "sha256"]
    )
    identity = authenticate_key(key_line)
    assert identity.node_id == "lab-1" and identity.capabilities == ("echo", "sha256")


def test_create_node_key_accepts_several_capabilities_at_once(db):
    run("create_node_key", "--name", "lab", "--capability", "a", "b")
    assert NodeKey.objects.get().capabilities == ["a", "b"]


def test_create_node_key_refuses_a_bad_node_id(db):
    with pytest.raises(CommandError):
        call_command("create_node_key", "--name", "x", "--node-id", "bad id/with slash", stdout=StringIO())


@pytest.mark.parametrize("how", ["prefix", "id", "key"])
def test_revoke_node_key(db, how):
    key, plain = node_key_create(name="k")
    wanted = {"prefix": key.prefix, "id": str(key.pk), "key": plain}[how]
    assert "Revoked" in run("revoke_node_key", wanted)
    assert authenticate_key(plain) is None
    assert "already revoked" in run("revoke_node_key", wanted)


def test_revoke_unknown_key(db):
    with pytest.raises(CommandError):
        call_command("revoke_node_key", "nope", stdout=StringIO())


def test_sweep_marks_silent_nodes_offline(make_node, settings):
    silent = timezone.now() - timedelta(milliseconds=settings.APEXBRIDGE_HEARTBEAT_TIMEOUT_MS + 1000)
    make_node("silent", last_heartbeat=silent)
    make_node("fresh")
    out = run("sweep")
    assert "nodes marked offline: 1 (silent)" in out
    assert Node.objects.get(pk="silent").status == "offline"
    assert Node.objects.get(pk="fresh").status == "online"
    assert "nodes marked offline: 0" in run("sweep")
