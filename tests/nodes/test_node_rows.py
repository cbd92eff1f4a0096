"""The connected-node rows a dispatch pass starts from may be kept from an earlier
pass of this process (nodes/node_rows.py): a pass soon after another does not read
every node again, yet nothing is assigned to a node that cannot take it, no task waits
because of old rows, and a node saved in this process is seen at once."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from nodes import task_queue, task_services
from nodes.models import Task
from tests.nodes.test_tasks_services import make_node

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def keep_rows(settings):
    settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS = 60_000  # kept for the whole test unless dropped
    return settings


def queue() -> Task:
    return Task.objects.create(task_id=task_services.new_task_id(), tool_name="echo")


def dispatch_pass() -> tuple[list[str], int]:
    """The node each assignment went to, and how many times the pass read the rows."""
    with CaptureQueriesContext(connection) as queries:
        outgoing = task_queue.task_dispatch_pending()
    reads = sum(1 for q in queries if "capabilities_text" in q["sql"])
    return [message["nodeId"] for _, message in outgoing], reads


def from_another_process(sql: str, params: list) -> None:
    """A change no signal of this process sees (another hub process made it; its
    writers stamp ``dispatch_changed_at``, as this process's do)."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_a_pass_soon_after_another_starts_from_the_rows_that_one_read():
    make_node("n1", max_concurrent_tasks=5)
    queue()
    assert dispatch_pass() == (["n1"], 1)
    queue()
    assert dispatch_pass() == (["n1"], 0)


def test_with_a_zero_age_every_pass_reads_the_rows(settings):
    settings.APEXBRIDGE_DISPATCH_NODE_ROWS_MS = 0
    make_node("n1", max_concurrent_tasks=5)
    queue()
    assert dispatch_pass() == (["n1"], 1)
    queue()
    assert dispatch_pass() == (["n1"], 1)


def test_a_node_saved_in_this_process_is_seen_by_the_next_pass():
    make_node("n1", max_concurrent_tasks=5)
    queue()
    assert dispatch_pass()[0] == ["n1"]
    make_node("n2", max_concurrent_tasks=5)  # fewer tasks in flight than n1: preferred
    queue()
    assert dispatch_pass()[0] == ["n2"]


def test_a_node_that_left_in_another_process_is_not_given_the_task():
    make_node("n1", max_concurrent_tasks=5)
    make_node("n2", max_concurrent_tasks=5)
    queue()
    first, _ = dispatch_pass()
    other = "n2" if first == ["n1"] else "n1"  # preferred next: nothing in flight
    from_another_process(
        "UPDATE nodes_node SET status = 'offline', connection_id = '', "
        "dispatch_changed_at = CURRENT_TIMESTAMP WHERE node_id = %s",
        [other],
    )
    task = queue()
    assert dispatch_pass()[0] == first  # the kept row sent the claim to `other`; refused there
    assert Task.objects.get(pk=task.pk).assigned_node_id == first[0]


def test_no_task_waits_because_of_kept_rows():
    """Every node full in the kept rows: the pass reads them again before it says no
    node can take the task, and finds the node another process has just registered."""
    make_node("n1", max_concurrent_tasks=1)
    make_node("n2", status="offline", connection_id="", channel_name="")
    queue()
    assert dispatch_pass() == (["n1"], 1)
    from_another_process(
        "UPDATE nodes_node SET status = 'online', connection_id = 'c-n2', channel_name = 'ch-n2', "
        "dispatch_changed_at = CURRENT_TIMESTAMP WHERE node_id = %s",
        ["n2"],
    )
    task = queue()
    assert dispatch_pass() == (["n2"], 1)
    assert Task.objects.get(pk=task.pk).waiting_reason == ""


def test_a_retry_is_not_sent_back_to_the_node_it_ran_on_because_of_kept_rows():
    """PROTOCOL §3.4: a retry goes to a different node when one is eligible, also
    when that node connected in another process after the rows were read."""
    make_node("n1", max_concurrent_tasks=5)
    make_node("n2", status="offline", connection_id="", channel_name="", max_concurrent_tasks=5)
    queue()
    assert dispatch_pass()[0] == ["n1"]
    from_another_process(
        "UPDATE nodes_node SET status = 'online', connection_id = 'c-n2', channel_name = 'ch-n2', "
        "dispatch_changed_at = CURRENT_TIMESTAMP WHERE node_id = %s",
        ["n2"],
    )
    Task.objects.create(
        task_id=task_services.new_task_id(), tool_name="echo", tried_node_ids=["n1"], attempts=1
    )
    assert dispatch_pass() == (["n2"], 1)


def test_a_kept_row_out_of_date_costs_one_refused_claim_then_the_task_goes_elsewhere():
    """Another process lowered n1's limit (a re-registration there): the kept row
    still shows a free slot, the claim under the row lock refuses, the pass reads the
    rows again and the task goes to n2 in the same pass, on its first attempt."""
    make_node("n1", max_concurrent_tasks=2)
    make_node("n2", max_concurrent_tasks=2, status="busy")  # less preferred than n1
    queue()
    assert dispatch_pass()[0] == ["n1"]
    from_another_process(
        "UPDATE nodes_node SET max_concurrent_tasks = 1, dispatch_changed_at = CURRENT_TIMESTAMP "
        "WHERE node_id = %s",
        ["n1"],
    )
    task = queue()
    assert dispatch_pass() == (["n2"], 1)
    assert Task.objects.get(pk=task.pk).attempts == 1


def test_a_disconnect_in_this_process_removes_the_node_from_the_kept_rows(django_capture_on_commit_callbacks):
    from nodes import services

    make_node("n1", max_concurrent_tasks=5)
    make_node("n2", max_concurrent_tasks=5)
    queue()
    first, _ = dispatch_pass()
    other = "n2" if first == ["n1"] else "n1"  # preferred next: nothing in flight
    with django_capture_on_commit_callbacks(execute=True):
        assert services.node_disconnected(node_id=other, connection_id=f"c-{other}")
    queue()
    assert dispatch_pass() == (first, 0)  # no claim refused there, no second read of the rows


def test_a_late_row_from_a_pass_does_not_overwrite_rows_read_after_it():
    from nodes.node_rows import node_rows

    make_node("n1")
    _, _, first = node_rows.get(fresh=True)
    rows, _, second = node_rows.get(fresh=True)  # another pass read them again
    node_rows.put(first, "n1", None)  # the first pass learns (late) that n1 was gone
    assert "n1" in node_rows.get()[0]
    node_rows.put(second, "n1", None)
    assert "n1" not in node_rows.get()[0]


def test_the_next_pass_takes_the_index_of_the_last_one_and_sees_tasks_that_ended_elsewhere(monkeypatch):
    """The index over the node rows (one look at every node) is kept for the next
    pass, which updates the nodes whose in-flight count changed: a task that ended in
    another process frees its node without the rows being read or an index built."""
    from nodes import dispatch

    make_node("n1", max_concurrent_tasks=1)
    make_node("n2", max_concurrent_tasks=1, status="busy")  # less preferred than n1
    first = queue()
    assert dispatch_pass() == (["n1"], 1)
    built = []
    original = dispatch.FreeNodeIndex.__init__
    monkeypatch.setattr(
        dispatch.FreeNodeIndex, "__init__", lambda self, *a, **kw: built.append(1) or original(self, *a, **kw)
    )
    from_another_process("UPDATE nodes_task SET status = 'succeeded' WHERE task_id = %s", [first.task_id])
    queue()
    assert dispatch_pass() == (["n1"], 0)  # n1 again (online, nothing in flight), not n2
    assert built == []


def test_a_full_fleet_reads_only_the_rows_changed_since_and_finds_a_node_another_process_revived():
    """Every node full in the kept rows: before the pass says no node can take the
    task it reads the rows stamped since the kept ones were read (not every row), and
    finds the node another process has just brought back online."""
    from datetime import UTC, datetime

    from nodes.models import Node

    make_node("n1", max_concurrent_tasks=1)
    make_node("n2", status="offline", connection_id="", channel_name="")
    Node.objects.update(dispatch_changed_at=datetime(2026, 1, 1, tzinfo=UTC))  # long before
    queue()
    assert dispatch_pass() == (["n1"], 1)  # every row read
    from_another_process(
        "UPDATE nodes_node SET status = 'online', connection_id = 'c-n2', channel_name = 'ch-n2', "
        "dispatch_changed_at = CURRENT_TIMESTAMP WHERE node_id = %s",
        ["n2"],
    )
    task = queue()
    with CaptureQueriesContext(connection) as queries:
        outgoing = task_queue.task_dispatch_pending()
    assert [message["nodeId"] for _, message in outgoing] == ["n2"]
    reads = [q["sql"] for q in queries if "capabilities_text" in q["sql"]]
    assert len(reads) == 1
    assert "dispatch_changed_at" in reads[0]  # the changed rows only
    assert Task.objects.get(pk=task.pk).waiting_reason == ""
