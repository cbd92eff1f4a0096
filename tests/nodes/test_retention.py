"""Retention (nodes/retention.py): LLM request logs and finished tasks older than
APEXBRIDGE_LLM_LOG_RETENTION_DAYS / APEXBRIDGE_TASK_RETENTION_DAYS are deleted by the
hub's sweep and by ``manage.py sweep``; everything else stays."""

from __future__ import annotations

import logging
from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from llmproxy.models import LLMRequestLog
from nodes import retention, task_queue, task_services
from nodes.models import Task
from nodes.runtime import runtime

pytestmark = pytest.mark.django_db

FINAL = ["succeeded", "failed", "timed_out", "cancelled"]


@pytest.fixture(autouse=True)
def retention_settings(settings):
    settings.APEXBRIDGE_LLM_LOG_RETENTION_DAYS = 30
    settings.APEXBRIDGE_TASK_RETENTION_DAYS = 30
    return settings


@pytest.fixture
def staff() -> APIClient:
    client = APIClient()
    user = get_user_model().objects.create_user("staff", is_staff=True)
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def days_ago(days: float):
    return timezone.now() - timedelta(days=days)


def llm_log(request_id: str, age_days: float) -> LLMRequestLog:
    return LLMRequestLog.objects.create(
        node_id="n1", request_id=request_id, outcome="succeeded", created_at=days_ago(age_days)
    )


def task(
    task_id: str, status: str, age_days: float, finished_days_ago: float | None = None, **fields
) -> Task:
    """A task created ``age_days`` ago; a final one finished ``finished_days_ago`` days
    ago (by default right when it was created)."""
    finished = None
    if status in FINAL:
        finished = days_ago(age_days if finished_days_ago is None else finished_days_ago)
    return Task.objects.create(
        task_id=task_id,
        tool_name="echo",
        status=status,
        created_at=days_ago(age_days),
        finished_at=finished,
        **fields,
    )


def llm_request_ids() -> set[str]:
    return set(LLMRequestLog.objects.values_list("request_id", flat=True))


def task_ids() -> set[str]:
    return set(Task.objects.values_list("task_id", flat=True))


def test_old_llm_logs_and_finished_tasks_go_recent_ones_stay(staff):
    llm_log("r-old", 31)
    llm_log("r-recent", 29)
    for status in FINAL:
        task(f"t-old-{status}", status, 31)
    task("t-recent", "succeeded", 29)

    counts = retention.prune_expired()

    assert counts == {"llm_request_logs": 1, "tasks": 4}
    assert llm_request_ids() == {"r-recent"}
    assert task_ids() == {"t-recent"}
    # What a script sees: the old task is gone from the API, the recent one is not.
    assert staff.get("/api/tasks/t-old-succeeded").status_code == 404
    assert staff.get("/api/tasks/t-recent").status_code == 200


@pytest.mark.parametrize("status", ["queued", "assigned"])
def test_unfinished_tasks_stay_whatever_their_age(status):
    task("t-ancient", status, 400)

    assert retention.prune_expired() == {"llm_request_logs": 0, "tasks": 0}
    assert Task.objects.get(pk="t-ancient").status == status


def test_a_task_ages_from_when_it_finished_not_when_it_was_submitted():
    task("t-long-wait", "succeeded", 60, finished_days_ago=1)
    task("t-done-long-ago", "failed", 60, finished_days_ago=31)

    assert retention.prune_expired()["tasks"] == 1
    assert task_ids() == {"t-long-wait"}


@pytest.mark.parametrize("days", [0, -1])
def test_zero_keeps_everything_forever(retention_settings, days):
    retention_settings.APEXBRIDGE_LLM_LOG_RETENTION_DAYS = days
    retention_settings.APEXBRIDGE_TASK_RETENTION_DAYS = days
    llm_log("r-ancient", 3650)
    task("t-ancient", "succeeded", 3650)

    assert retention.prune_expired() == {"llm_request_logs": 0, "tasks": 0}
    assert llm_request_ids() == {"r-ancient"}
    assert task_ids() == {"t-ancient"}


def test_each_kind_has_its_own_retention(retention_settings):
    retention_settings.APEXBRIDGE_LLM_LOG_RETENTION_DAYS = 0
    retention_settings.APEXBRIDGE_TASK_RETENTION_DAYS = 7
    llm_log("r-old", 100)
    task("t-week-old", "succeeded", 8)
    task("t-day-old", "succeeded", 1)

    assert retention.prune_expired() == {"llm_request_logs": 0, "tasks": 1}
    assert llm_request_ids() == {"r-old"}
    assert task_ids() == {"t-day-old"}


def test_a_backlog_larger_than_one_batch_is_deleted_completely():
    for i in range(5):
        llm_log(f"r-{i}", 40 + i)
        task(f"t-{i}", "succeeded", 40 + i)
    llm_log("r-recent", 1)
    task("t-recent", "succeeded", 1)

    assert retention.prune_expired(batch_size=2) == {"llm_request_logs": 5, "tasks": 5}
    assert llm_request_ids() == {"r-recent"}
    assert task_ids() == {"t-recent"}


def test_a_time_budget_spreads_a_backlog_over_several_calls():
    # Given a backlog of 5 rows of each kind and batches of 2
    for i in range(5):
        llm_log(f"r-{i}", 40 + i)
        task(f"t-{i}", "succeeded", 40 + i)

    # When each call may only start one batch (the hub's sweep bounds its work this way)
    runs = [retention.prune_expired(batch_size=2, max_seconds=0) for _ in range(4)]

    # Then the backlog shrinks batch by batch, oldest first, and is gone in the end
    assert [run["llm_request_logs"] for run in runs] == [2, 2, 1, 0]
    assert [run["tasks"] for run in runs] == [2, 2, 1, 0]
    assert not llm_request_ids() and not task_ids()


def test_a_task_that_a_waiting_task_depends_on_is_kept_until_that_task_ends():
    # Given an old finished task that a queued task still waits for, and other old tasks
    task("t-dep", "succeeded", 90)
    task("t-other-1", "succeeded", 80)
    task("t-other-2", "failed", 70)
    task("t-waiting", "queued", 1, depends_on=["t-dep"], dependencies_pending=True)

    # When retention runs in batches of one (the kept task must not stop the others)
    assert retention.prune_expired(batch_size=1)["tasks"] == 2

    # Then the dependency is still there, and the waiting task is released, not
    # cancelled as "dependency did not succeed: t-dep (missing)"
    assert task_ids() == {"t-dep", "t-waiting"}
    task_queue._settle_dependencies()
    waiting = Task.objects.get(pk="t-waiting")
    assert waiting.status == "queued" and not waiting.dependencies_pending and waiting.error is None

    # Once the dependent has ended too and aged out, both go
    Task.objects.filter(pk="t-waiting").update(
        status="succeeded", created_at=days_ago(32), finished_at=days_ago(31)
    )
    assert retention.prune_expired()["tasks"] == 2
    assert not task_ids()


def test_an_idempotency_key_is_remembered_as_long_as_its_task():
    first = task("t-first", "succeeded", 31, idempotency_key="nightly-report")

    retention.prune_expired()
    again = task_services.task_submit(tool_name="echo", idempotency_key="nightly-report")

    assert again.created is True and again.task.task_id != first.task_id


def test_one_info_line_when_something_was_pruned(caplog):
    caplog.set_level(logging.INFO, logger="nodes.retention")
    llm_log("r-old", 31)
    task("t-old", "cancelled", 31)

    retention.prune_expired()
    retention.prune_expired()  # nothing left: silent

    lines = [r.getMessage() for r in caplog.records if r.name == "nodes.retention"]
    assert lines == [
        "retention: pruned 1 LLM request log(s) older than 30 days and 1 finished task(s) older than 30 days"
    ]


def test_manage_sweep_reports_what_it_pruned():
    llm_log("r-old-1", 31)
    llm_log("r-old-2", 45)
    llm_log("r-recent", 1)
    task("t-old", "timed_out", 31)
    task("t-queued", "queued", 31)

    out = StringIO()
    call_command("sweep", stdout=out)

    assert "log lines pruned: 0; LLM request logs pruned: 2; finished tasks pruned: 1" in out.getvalue()
    assert llm_request_ids() == {"r-recent"}
    assert task_ids() == {"t-queued"}
    again = StringIO()
    call_command("sweep", stdout=again)
    assert "LLM request logs pruned: 0; finished tasks pruned: 0" in again.getvalue()


def test_the_hub_sweep_prunes_once_a_minute(monkeypatch):
    llm_log("r-old", 31)
    task("t-old", "succeeded", 31)
    monkeypatch.setattr(runtime, "_last_log_prune", 0.0)  # the minute has passed

    runtime._sweep_sync(first=False)

    assert not llm_request_ids() and not task_ids()
    # Within the same minute a new expired row waits for the next prune.
    llm_log("r-old-2", 31)
    runtime._sweep_sync(first=False)
    assert llm_request_ids() == {"r-old-2"}
