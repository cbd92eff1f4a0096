"""The task state machine (PROTOCOL §3.1, §3.4) at the service level: submission and
its refusals, idempotency, dependencies, claims, retries and back-off, time-outs,
cancel and requeue, node statistics, events and selectors."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from nodes import events, selectors, task_queue, task_result_services, task_services
from nodes.models import Node, Task
from nodes.protocol import ProtocolError

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def task_settings(settings):
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS = 1000
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MAX_MS = 30000
    return settings


@pytest.fixture
def published(monkeypatch):
    """Events as they leave the hub (after commit)."""
    sent: list[dict] = []
    monkeypatch.setattr(events, "_send_now", sent.append)
    return sent


def make_node(node_id="n1", **fields) -> Node:
    values = {
        "name": node_id,
        "status": "online",
        "connection_id": f"c-{node_id}",
        "channel_name": f"ch-{node_id}",
    }
    values.update(fields)
    return Node.objects.create(node_id=node_id, **values)


def submit(tool_name="echo", **fields) -> Task:
    return task_services.task_submit(tool_name=tool_name, **fields).task


def frames(outgoing):
    return [(channel, message["nodeId"], json.loads(message["frame"])) for channel, message in outgoing]


def reload(task: Task) -> Task:
    return Task.objects.get(pk=task.pk)


# --- submission ----------------------------------------------------------------------------------
def test_submit_uses_the_configured_defaults(settings):
    settings.APEXBRIDGE_TASK_DEFAULT_TIMEOUT_MS = 1234
    settings.APEXBRIDGE_TASK_MAX_RETRIES = 7
    task = submit(tool_args={"a": 1})
    assert task.task_id.startswith("t-") and task.status == "queued" and task.priority == 5
    assert (task.timeout_ms, task.max_retries, task.attempts) == (1234, 7, 0)


def test_idempotency_key_returns_the_first_task():
    first = task_services.task_submit(tool_name="echo", idempotency_key="k-1")
    second = task_services.task_submit(tool_name="other", idempotency_key="k-1")
    assert first.created and not second.created
    assert second.task.task_id == first.task.task_id and Task.objects.count() == 1


def test_unknown_dependency_is_refused_and_nothing_is_created():
    with pytest.raises(task_services.TaskValidationError, match="unknown task id"):
        submit(depends_on=["t-missing"])
    assert not Task.objects.exists()


def test_dependency_cycle_is_refused():
    Task.objects.create(task_id="t-a", tool_name="echo", depends_on=["t-b"], dependencies_pending=True)
    with pytest.raises(task_services.TaskValidationError, match="cycle"):
        task_services.task_submit(tool_name="echo", task_id="t-b", depends_on=["t-a"])
    with pytest.raises(task_services.TaskValidationError, match="itself"):
        task_services.task_submit(tool_name="echo", task_id="t-c", depends_on=["t-c"])
    assert list(Task.objects.values_list("task_id", flat=True)) == ["t-a"]


# --- dispatch and claims ---------------------------------------------------------------------------
def test_dispatch_assigns_and_records_the_attempt():
    make_node("n1")
    task = submit(timeout_ms=5000)
    outgoing = task_services.task_dispatch_pending()
    [(channel, node_id, frame)] = frames(outgoing)
    assert channel == "ch-n1" and node_id == "n1" and frame["type"] == "task_assign"
    task = reload(task)
    assert task.status == "assigned" and task.attempts == 1 and task.assigned_connection_id == "c-n1"
    assert task.deadline_at == task.assigned_at + timedelta(milliseconds=5000)
    assert task.tried_node_ids == ["n1"] and task.waiting_reason == ""
    node = Node.objects.get(pk="n1")
    assert node.total_tasks == 1 and node.last_assigned_at == task.assigned_at
    assert task_services.task_dispatch_pending() == []


def test_a_task_is_never_claimed_twice():
    make_node("a")
    make_node("b")
    task = submit()
    assert task_queue.claim_task(task.task_id, "a").assigned is not None
    second = task_queue.claim_task(task.task_id, "b")
    assert second.assigned is None and second.task_gone
    assert reload(task).assigned_node_id == "a"


def test_a_claim_rechecks_the_node_under_its_lock():
    # Given a dispatcher whose view of node "a" is out of date (another process
    # already filled it)
    make_node("a", max_concurrent_tasks=1)
    other = submit()
    task_queue.claim_task(other.task_id, "a")
    task = submit()
    # When it tries to claim for the full node, the claim is refused with fresh figures
    claim = task_queue.claim_task(task.task_id, "a")
    assert claim.assigned is None and claim.in_flight == 1
    assert reload(task).status == "queued"


def test_waiting_reason_is_kept_up_to_date():
    task = submit(capability="gpu")
    task_services.task_dispatch_pending()
    assert reload(task).waiting_reason == "no node is connected"
    make_node("n1", capabilities=["cpu"])
    task_services.task_dispatch_pending()
    assert reload(task).waiting_reason == "no connected node has capability 'gpu'"


def test_a_long_queue_behind_a_full_node_is_explained_in_a_few_queries(django_assert_max_num_queries):
    # Given a node at its limit and a long queue behind it, some tasks needing a GPU
    make_node("n1", max_concurrent_tasks=1)
    task_queue.claim_task(submit().task_id, "n1")
    waiting = [submit(capability="gpu" if i % 10 == 0 else "") for i in range(60)]
    # When a pass runs, every task gets its reason, in a number of queries that does
    # not grow with the queue (one UPDATE per distinct reason)
    with django_assert_max_num_queries(12):
        assert task_services.task_dispatch_pending() == []
    reasons = {task.task_id: reload(task).waiting_reason for task in waiting}
    for i, task in enumerate(waiting):
        expected = (
            "no connected node has capability 'gpu'"
            if i % 10 == 0
            else "node 'n1' is at its limit of 1 task(s)"
        )
        assert reasons[task.task_id] == expected
    # And a new task joining the full queue is explained by the next pass too
    late = submit()
    with django_assert_max_num_queries(12):
        task_services.task_dispatch_pending()
    assert reload(late).waiting_reason == "node 'n1' is at its limit of 1 task(s)"


def test_a_freed_slot_goes_to_the_oldest_task_of_a_long_queue():
    make_node("n1", max_concurrent_tasks=1)
    running = submit()
    task_queue.claim_task(running.task_id, "n1")
    waiting = [submit() for _ in range(5)]
    task_services.task_dispatch_pending()
    Task.objects.filter(pk=running.pk).update(status="succeeded")
    [(_, _, frame)] = frames(task_services.task_dispatch_pending())
    assert frame["data"]["taskId"] == waiting[0].task_id
    assert [reload(t).status for t in waiting] == ["assigned"] + ["queued"] * 4
    assert reload(waiting[1]).waiting_reason == "node 'n1' is at its limit of 1 task(s)"


def test_a_pass_reads_past_the_first_page_of_a_queue_nobody_can_run():
    # Given 70 older tasks no node can run (a page is 50) before one that n1 can
    make_node("n1", max_concurrent_tasks=1)
    gpu = [submit(capability="gpu", priority=7) for _ in range(70)]
    runnable = submit(priority=7)
    # When a pass runs, the runnable task is found and assigned; the rest say why
    [(_, _, frame)] = frames(task_services.task_dispatch_pending())
    assert frame["data"]["taskId"] == runnable.task_id
    assert {reload(t).waiting_reason for t in gpu} == {"no connected node has capability 'gpu'"}


def test_vcp_nodes_get_execute_tool():
    make_node("vcp-x", protocol="vcp", tools=["Calc"], capabilities=["Calc"])
    task = submit("Calc", tool_args={"e": "1+1"})
    [(_, _, frame)] = frames(task_services.task_dispatch_pending())
    assert frame == {
        "type": "execute_tool",
        "data": {"requestId": task.task_id, "toolName": "Calc", "toolArgs": {"e": "1+1"}},
    }


# --- results -------------------------------------------------------------------------------------
def assigned_task(node_id="n1", **fields) -> Task:
    if not Node.objects.filter(pk=node_id).exists():
        make_node(node_id)
    task = submit(**fields)
    task_queue.claim_task(task.task_id, node_id)
    return reload(task)


def test_success_updates_node_statistics():
    task = assigned_task()
    Task.objects.filter(pk=task.pk).update(assigned_at=timezone.now() - timedelta(milliseconds=500))
    task_result_services.task_complete(
        task_id=task.task_id, node_id="n1", connection_id="c-n1", success=True, result=5
    )
    node = Node.objects.get(pk="n1")
    assert node.completed_tasks == 1 and 400 <= node.total_response_time_ms < 5000
    done = reload(task)
    assert done.status == "succeeded" and done.result == 5 and done.execution_time_ms >= 400


def test_result_refusals():
    task = assigned_task()
    make_node("n2")
    complete = task_result_services.task_complete
    with pytest.raises(ProtocolError) as unknown:
        complete(task_id="t-none", node_id="n1", connection_id="c-n1", success=True)
    assert unknown.value.code == "unknown_task"
    with pytest.raises(ProtocolError) as foreign:
        complete(task_id=task.task_id, node_id="n2", connection_id="c-n2", success=True)
    assert foreign.value.code == "node_mismatch"
    with pytest.raises(ProtocolError) as old_connection:
        complete(task_id=task.task_id, node_id="n1", connection_id="c-old", success=True)
    assert old_connection.value.code == "stale_result"
    assert reload(task).status == "assigned"


def result(
    task_id: str, node_id: str = "n1", success: bool = True, **fields
) -> task_result_services.TaskResult:
    return task_result_services.TaskResult(task_id, node_id, f"c-{node_id}", success, **fields)


def test_a_batch_of_results_applies_each_and_refuses_only_the_bad_ones(django_capture_on_commit_callbacks):
    for node_id in ("n1", "n2", "n3"):
        make_node(node_id, max_concurrent_tasks=5)
    done_1, done_2 = assigned_task("n1"), assigned_task("n1")
    failed, retried = assigned_task("n2", max_retries=0), assigned_task("n2", max_retries=3)
    elsewhere = assigned_task("n3")
    batch = [
        result(done_1.task_id, result={"n": 1}, execution_time_ms=40),
        result("t-none"),
        result(failed.task_id, "n2", False, error={"code": "boom", "message": "no"}),
        result(done_2.task_id, result=None),
        result(elsewhere.task_id, "n1"),  # not this node's task
        result(retried.task_id, "n2", False, error={"code": "busy", "message": "later", "retryable": True}),
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        outcomes = task_result_services.task_complete_many(results=batch)
    sent: list[dict] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(events, "_send_now", sent.append)
        for callback in callbacks:
            callback()

    codes = [o.code if isinstance(o, ProtocolError) else o.status for o in outcomes]
    assert codes == ["succeeded", "unknown_task", "failed", "succeeded", "node_mismatch", "queued"]
    assert reload(done_1).result == {"n": 1} and reload(done_1).execution_time_ms == 40
    assert reload(done_2).status == "succeeded" and reload(done_2).result is None
    assert reload(failed).error == {"code": "boom", "message": "no"} and reload(failed).finished_at
    assert reload(retried).status == "queued" and reload(retried).attempts == 1
    assert reload(elsewhere).status == "assigned"  # the refused result changed nothing
    n1, n2, n3 = (Node.objects.get(pk=node_id) for node_id in ("n1", "n2", "n3"))
    assert (n1.completed_tasks, n1.failed_tasks) == (2, 0)
    assert (n2.completed_tasks, n2.failed_tasks) == (0, 2)
    assert (n3.completed_tasks, n3.failed_tasks) == (0, 0)
    assert 0 <= n1.total_response_time_ms < 5000 and n2.total_response_time_ms == 0
    # One event per applied result, in the batch's order; none for the refused ones
    assert [(e["event"], e["data"]["task"]["taskId"]) for e in sent if e["event"].startswith("task_")] == [
        ("task_succeeded", done_1.task_id),
        ("task_failed", failed.task_id),
        ("task_succeeded", done_2.task_id),
        ("task_retried", retried.task_id),
    ]


def test_a_batch_of_results_costs_one_update_per_task(django_assert_max_num_queries):
    for i in range(4):
        make_node(f"n{i}", max_concurrent_tasks=5)
    tasks = [assigned_task(f"n{i % 4}") for i in range(20)]
    # node lock + task read + 20 task UPDATEs + 4 node statistics UPDATEs (+ the
    # transaction's own statements); one by one it was ~5 queries per result.
    with django_assert_max_num_queries(28):
        outcomes = task_result_services.task_complete_many(
            results=[result(task.task_id, f"n{i % 4}") for i, task in enumerate(tasks)]
        )
    assert [o.status for o in outcomes] == ["succeeded"] * 20
    assert sum(Node.objects.values_list("completed_tasks", flat=True)) == 20


def test_a_batch_locks_its_nodes_before_its_tasks_each_in_id_order():
    """The lock order every writer keeps (node first, then task; each kind in id
    order), so two hub processes' batches cannot deadlock."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    if not connection.features.has_select_for_update:
        pytest.skip("SQLite has no row locks: BEGIN IMMEDIATE lets one writer in")
    for node_id in ("n1", "n2"):
        make_node(node_id, max_concurrent_tasks=5)
    tasks = [assigned_task("n2"), assigned_task("n1")]
    with CaptureQueriesContext(connection) as queries:
        task_result_services.task_complete_many(
            results=[result(tasks[0].task_id, "n2"), result(tasks[1].task_id)]
        )
    locks = [query["sql"] for query in queries if "FOR UPDATE" in query["sql"]]
    assert len(locks) == 2
    assert '"nodes_node"' in locks[0] and "ORDER BY" in locks[0]
    assert '"nodes_task"' in locks[1] and "ORDER BY" in locks[1]


def test_a_batch_names_each_task_once():
    task = assigned_task()
    with pytest.raises(ValueError):
        task_result_services.task_complete_many(results=[result(task.task_id), result(task.task_id)])
    assert reload(task).status == "assigned"


def test_retryable_failure_backs_off_exponentially(task_settings):
    task = assigned_task(max_retries=5)
    before = timezone.now()
    task_result_services.task_complete(
        task_id=task.task_id,
        node_id="n1",
        connection_id="c-n1",
        success=False,
        error={"code": "busy", "message": "later", "retryable": True},
    )
    queued = reload(task)
    assert queued.status == "queued" and queued.error["code"] == "busy"
    assert timedelta(milliseconds=900) < queued.not_before - before < timedelta(milliseconds=1500)
    assert task_services.task_dispatch_pending() == []  # still backing off


def test_backoff_doubles_and_is_capped(task_settings):
    assert [task_services.retry_backoff_ms(n) for n in (1, 2, 3, 4)] == [1000, 2000, 4000, 8000]
    task_settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MAX_MS = 5000
    assert task_services.retry_backoff_ms(10) == 5000


# --- time-outs and lost nodes ----------------------------------------------------------------------
def expire(task: Task) -> None:
    Task.objects.filter(pk=task.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))


def test_timeout_retries_while_attempts_le_max_retries():
    task = assigned_task(max_retries=1)
    expire(task)
    outgoing = task_services.task_sweep_timeouts()
    assert [f["type"] for _, _, f in frames(outgoing)] == ["task_cancel"]
    retried = reload(task)
    assert retried.status == "queued" and retried.error["code"] == "timeout" and retried.not_before
    Task.objects.filter(pk=task.pk).update(not_before=None)
    task_services.task_dispatch_pending()
    expire(task)
    task_services.task_sweep_timeouts()
    ended = reload(task)
    assert ended.status == "timed_out" and ended.attempts == 2 and ended.finished_at
    assert Node.objects.get(pk="n1").failed_tasks == 2


def test_release_node_attempts_only_touches_that_connection():
    task = assigned_task()
    assert task_services.task_release_node_attempts(node_id="n1", connection_id="c-other", reason="x") == 0
    assert reload(task).status == "assigned"
    assert task_services.task_release_node_attempts(node_id="n1", connection_id="c-n1", reason="x") == 1
    assert reload(task).status == "queued" and reload(task).error["code"] == "node_lost"


def test_node_lost_without_retries_fails():
    task = assigned_task(max_retries=0)
    task_services.task_release_node_attempts(node_id="n1", connection_id=None, reason="node_disconnected")
    failed = reload(task)
    assert failed.status == "failed" and failed.error["code"] == "node_lost" and failed.finished_at


def test_sweep_releases_attempts_of_vanished_connections():
    task = assigned_task()
    Node.objects.filter(pk="n1").update(connection_id="c-new")
    task_services.task_sweep_timeouts()
    assert reload(task).status == "queued"
    other = assigned_task("n2")
    Node.objects.filter(pk="n2").delete()
    task_services.task_sweep_timeouts()
    assert reload(other).status == "queued"


# --- cancel and requeue ----------------------------------------------------------------------------
def test_cancel_and_its_refusals():
    task = submit()
    cancelled = task_services.task_cancel(task_id=task.task_id, reason="stop")
    assert cancelled.status == "cancelled" and cancelled.error == {"code": "cancelled", "message": "stop"}
    with pytest.raises(task_services.TaskStateError):
        task_services.task_cancel(task_id=task.task_id, reason="again")
    with pytest.raises(Task.DoesNotExist):
        task_services.task_cancel(task_id="t-none", reason="x")


def test_requeue_resets_a_failed_task():
    task = assigned_task(max_retries=0)
    task_services.task_release_node_attempts(node_id="n1", connection_id=None, reason="x")
    requeued = task_services.task_requeue(task_id=task.task_id)
    assert requeued.status == "queued" and requeued.attempts == 0 and requeued.error is None
    assert requeued.tried_node_ids == [] and requeued.finished_at is None
    with pytest.raises(task_services.TaskStateError):
        task_services.task_requeue(task_id=task.task_id)
    with pytest.raises(Task.DoesNotExist):
        task_services.task_requeue(task_id="t-none")


def test_dependency_outcomes():
    first = submit()
    waiting = submit(depends_on=[first.task_id])
    assert waiting.dependencies_pending and "waiting for dependencies" in waiting.waiting_reason
    task_services.task_cancel(task_id=first.task_id, reason="no")
    task_services.task_dispatch_pending()
    ended = reload(waiting)
    assert ended.status == "cancelled" and ended.error["code"] == "dependency_failed"
    assert first.task_id in ended.error["message"]


# --- events and selectors --------------------------------------------------------------------------
def test_every_task_event_has_the_task_summary(published, django_capture_on_commit_callbacks, settings):
    settings.APEXBRIDGE_TASK_RETRY_BACKOFF_MS = 0
    with django_capture_on_commit_callbacks(execute=True):
        make_node("n1")
        a = submit(max_retries=1)
        task_services.task_dispatch_pending()
        task_services.task_release_node_attempts(node_id="n1", connection_id=None, reason="x")
        task_services.task_dispatch_pending()
        task_result_services.task_complete(
            task_id=a.task_id, node_id="n1", connection_id="c-n1", success=True
        )
        b = submit(max_retries=0)
        task_services.task_dispatch_pending()
        task_result_services.task_complete(
            task_id=b.task_id, node_id="n1", connection_id="c-n1", success=False, error={"code": "x"}
        )
        c = submit(max_retries=0)
        task_services.task_dispatch_pending()
        expire(c)
        task_services.task_sweep_timeouts()
        d = submit()
        task_services.task_cancel(task_id=d.task_id, reason="r")
    types = [m["event"] for m in published]
    for expected in (
        "task_queued", "task_assigned", "task_retried", "task_succeeded", "task_failed", "task_timed_out",
        "task_cancelled",
    ):  # fmt: skip
        assert expected in types
    for message in published:
        assert message["type"] == "hub.event"
        assert set(message["data"]) == {"task", "timestamp"} and isinstance(message["data"]["timestamp"], int)
        assert {"taskId", "status", "attempts", "waitingReason"} <= set(message["data"]["task"])
    statuses = {m["event"]: m["data"]["task"]["status"] for m in published}
    assert statuses["task_retried"] == "queued" and statuses["task_timed_out"] == "timed_out"


def test_selectors():
    make_node("n1")
    make_node("n2")
    a = assigned_task("n1", tool_name="echo")
    submit(tool_name="sleep", node_id="n2")
    assert selectors.task_counts_by_status() == {
        "queued": 1, "assigned": 1, "succeeded": 0, "failed": 0, "timed_out": 0, "cancelled": 0,
    }  # fmt: skip
    assert selectors.node_active_task_counts(["n1", "n2", "n3"]) == {"n1": 1, "n2": 0, "n3": 0}
    assert [t.task_id for t in selectors.task_list(node_id="n1")] == [a.task_id]
    assert selectors.task_list(node_id="n2").count() == 1
    assert selectors.task_list(status="queued", tool_name="sleep").count() == 1
    assert selectors.task_list(tool_name="nope").count() == 0


# --- several dispatchers at once -----------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_concurrent_dispatchers_never_overfill_a_node_or_assign_twice():
    # Given three nodes of two slots each and forty queued tasks
    import threading

    from django.db import connection

    for name in ("a", "b", "c"):
        make_node(name, max_concurrent_tasks=2)
    for _ in range(40):
        Task.objects.create(task_id=task_services.new_task_id(), tool_name="echo")
    sent: list[str] = []
    errors: list[BaseException] = []

    def dispatcher():
        try:
            for _ in range(5):
                sent.extend(
                    json.loads(m["frame"])["data"]["taskId"] for _, m in task_services.task_dispatch_pending()
                )
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    # When four dispatch passes run at the same time, as in four hub processes
    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then exactly six tasks went out, each once, two per node
    assert not errors
    assert len(sent) == 6 and len(set(sent)) == 6
    assert selectors.node_active_task_counts(["a", "b", "c"]) == {"a": 2, "b": 2, "c": 2}
    assert set(Task.objects.filter(attempts__gt=0).values_list("attempts", flat=True)) == {1}
