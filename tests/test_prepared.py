"""Prepared statements (apexbridge/db/prepared.py): the ORM builds a query's SQL once,
each run fills in new values. Every answer must be the one the plain queryset gives,
on SQLite (pass 1) and PostgreSQL (pass 2)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import Count, F
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from apexbridge.db.prepared import Param, PreparedQuery, PreparedUpdate, insert, save_fields
from nodes.models import Node, Task, TaskStatus

pytestmark = pytest.mark.django_db

NOT_BEFORE = Task._meta.get_field("not_before")


def fields_of(instance) -> dict:
    return {field.attname: getattr(instance, field.attname) for field in type(instance)._meta.concrete_fields}


def make_tasks() -> list[Task]:
    now = timezone.now()
    return [
        Task.objects.create(
            task_id="t-json",
            tool_name="echo",
            tool_args={"text": "héllo", "nested": [1, {"a": None}]},
            tried_node_ids=["n1", "n2"],
            dependencies_pending=True,
            not_before=now - timedelta(seconds=5),
            result=None,
        ),
        Task.objects.create(
            task_id="t-later",
            tool_name="echo",
            priority=9,
            not_before=now + timedelta(hours=1),
            status=TaskStatus.ASSIGNED,
            assigned_node_id="n1",
            result=[1, 2],
            error={"code": "x"},
        ),
    ]


def test_a_prepared_query_answers_what_its_queryset_answers_for_each_value():
    make_tasks()
    by_id = PreparedQuery(lambda: Task.objects.filter(pk=Param("task_id"))[:1])
    for task_id in ("t-json", "t-later"):
        prepared = by_id.first(task_id=task_id)
        assert fields_of(prepared) == fields_of(Task.objects.get(pk=task_id))
        assert prepared._state.adding is False  # a loaded row: save() updates it
    assert by_id.first(task_id="missing") is None


def test_values_lists_flat_lists_and_annotations_come_back_in_the_querysets_order():
    make_tasks()
    Task.objects.create(task_id="t-3", tool_name="echo", status=TaskStatus.ASSIGNED, assigned_node_id="n1")

    def counts():
        return (
            Task.objects.filter(status=Param("status"))
            .values_list("assigned_node_id")
            .annotate(n=Count("pk"))
        )

    prepared = PreparedQuery(lambda: counts().order_by())
    assert prepared.all(status=TaskStatus.ASSIGNED) == list(
        Task.objects.filter(status=TaskStatus.ASSIGNED)
        .values_list("assigned_node_id")
        .annotate(n=Count("pk"))
    )
    assert prepared.all(status=TaskStatus.ASSIGNED) == [("n1", 2)]
    pending = PreparedQuery(
        lambda: Task.objects.filter(dependencies_pending=Param("pending")).values_list("task_id", flat=True)
    )
    assert pending.all(pending=True) == ["t-json"]
    assert sorted(pending.all(pending=False)) == ["t-3", "t-later"]


def test_a_datetime_value_is_compared_as_the_orm_would():
    make_tasks()
    ready = PreparedQuery(
        lambda: Task.objects.filter(not_before__lte=Param("now", NOT_BEFORE)).values_list(
            "task_id", flat=True
        )
    )
    now = timezone.now()
    assert ready.all(now=now) == ["t-json"]
    assert sorted(ready.all(now=now + timedelta(hours=2))) == ["t-json", "t-later"]
    assert ready.all(now=now - timedelta(minutes=1)) == []


@pytest.mark.django_db(transaction=True)
def test_a_locking_read_outside_a_transaction_is_refused_where_the_orm_refuses_it():
    make_tasks()
    locked = PreparedQuery(lambda: Task.objects.select_for_update().filter(pk=Param("task_id")))

    def error_of(read) -> type | None:
        try:
            read()
        except TransactionManagementError as error:
            return type(error)
        return None

    refused = error_of(lambda: locked.all(task_id="t-json"))
    assert refused is error_of(lambda: list(Task.objects.select_for_update().filter(pk="t-json")))
    if connection.features.has_select_for_update:  # PostgreSQL; SQLite locks the database instead
        assert refused is TransactionManagementError
    with transaction.atomic():
        assert [task.task_id for task in locked.all(task_id="t-json")] == ["t-json"]


def test_a_missing_value_or_a_shape_it_cannot_give_is_a_clear_error():
    by_id = PreparedQuery(lambda: Task.objects.filter(pk=Param("task_id")))
    with pytest.raises(TypeError, match="no value for 'task_id'"):
        by_id.all(id="t-json")
    as_dicts = PreparedQuery(lambda: Task.objects.filter(pk=Param("task_id")).values("task_id"))
    with pytest.raises(TypeError, match="ValuesIterable results are not supported"):
        as_dicts.all(task_id="t-json")


def test_raw_rows_of_ids_and_counts_are_what_the_queryset_gives_and_other_shapes_are_refused():
    make_tasks()
    Task.objects.create(task_id="t-2", tool_name="echo", status=TaskStatus.ASSIGNED, assigned_node_id="n1")
    counts = PreparedQuery(
        lambda: (
            Task.objects.filter(status=Param("status"))
            .values_list("assigned_node_id")
            .annotate(n=Count("task_id"))
            .order_by()
        )
    )
    queryset = (
        Task.objects.filter(status=TaskStatus.ASSIGNED)
        .values_list("assigned_node_id")
        .annotate(n=Count("task_id"))
    )
    assert dict(counts.raw_rows(status=TaskStatus.ASSIGNED)) == dict(queryset.order_by()) == {"n1": 2}
    assert counts.raw_rows(status=TaskStatus.SUCCEEDED) == []
    instances = PreparedQuery(lambda: Task.objects.filter(pk=Param("task_id")))
    with pytest.raises(ValueError, match="values_list"):
        instances.raw_rows(task_id="t-2")  # model rows need the ORM's conversions


def test_a_prepared_update_changes_only_the_matching_rows_and_counts_them():
    Node.objects.create(node_id="n1", name="one", total_tasks=3)
    Node.objects.create(node_id="n2", name="two", total_tasks=7)
    stamp = Node._meta.get_field("last_assigned_at")
    assigned = PreparedUpdate(
        lambda: (
            Node.objects.filter(pk=Param("node_id")),
            {"total_tasks": F("total_tasks") + Param("n"), "last_assigned_at": Param("now", stamp)},
        )
    )
    now = timezone.now()
    assert assigned.run(node_id="n1", n=2, now=now) == 1
    assert assigned.run(node_id="n1", n=1, now=now) == 1
    assert assigned.run(node_id="nobody", n=1, now=now) == 0
    one, two = Node.objects.get(pk="n1"), Node.objects.get(pk="n2")
    assert (one.total_tasks, one.last_assigned_at) == (6, now)
    assert (two.total_tasks, two.last_assigned_at) == (7, None)


def test_save_fields_writes_the_named_fields_json_and_null_included():
    task, other = make_tasks()
    task.result = {"answer": [42, "x"]}
    task.error = None
    task.status = TaskStatus.SUCCEEDED
    task.tool_name = "not-saved"
    save_fields(task, ("result", "error", "status"))
    again = Task.objects.get(pk="t-json")
    assert (again.result, again.error, again.status, again.tool_name) == (
        {"answer": [42, "x"]},
        None,
        TaskStatus.SUCCEEDED,
        "echo",
    )
    assert fields_of(Task.objects.get(pk="t-later")) == fields_of(other)  # untouched


def test_save_fields_of_a_row_that_is_gone_raises_as_save_does():
    task, _ = make_tasks()
    Task.objects.filter(pk=task.pk).delete()
    task.status = TaskStatus.SUCCEEDED
    with pytest.raises(DatabaseError, match="did not affect any rows"):
        save_fields(task, ("status",))


def test_insert_writes_every_field_as_create_would():
    task = insert(
        Task(
            task_id="t-new",
            tool_name="echo",
            tool_args={"k": ["v", 1.5, None]},
            depends_on=["a"],
            not_before=timezone.now(),
            idempotency_key="key-1",
        )
    )
    assert task._state.adding is False
    assert fields_of(Task.objects.get(pk="t-new")) == fields_of(task)


def test_insert_of_a_duplicate_fails_and_writes_nothing():
    insert(Task(task_id="t-1", tool_name="echo", idempotency_key="same"))
    with pytest.raises(IntegrityError), transaction.atomic():
        insert(Task(task_id="t-2", tool_name="echo", idempotency_key="same"))
    assert list(Task.objects.values_list("task_id", flat=True)) == ["t-1"]


def test_a_failed_prepared_write_inside_an_atomic_block_rolls_the_block_back_as_the_orm_does():
    with transaction.atomic():
        insert(Task(task_id="t-1", tool_name="echo", idempotency_key="same"))
        with pytest.raises(IntegrityError):
            insert(Task(task_id="t-2", tool_name="echo", idempotency_key="same"))
        assert connection.needs_rollback  # no partial work can be committed
    assert not Task.objects.exists()
