"""Retention: deleting ``LLMRequestLog`` rows and finished tasks past their age limit.

``APEXBRIDGE_LLM_LOG_RETENTION_DAYS`` and ``APEXBRIDGE_TASK_RETENTION_DAYS`` set the
limits (0 keeps rows forever). Rows go in short DELETE statements of ``batch_size``
rows, each committed on its own, so a large backlog never holds one long
transaction. Every hub process runs this from its sweep: a row that another process
deleted first is simply not counted again.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from llmproxy.models import LLMRequestLog
from nodes.models import FINAL_TASK_STATUSES, Task

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000


def prune_expired(
    now: datetime | None = None, *, batch_size: int = BATCH_SIZE, max_seconds: float | None = None
) -> dict[str, int]:
    """Delete LLM request logs and finished tasks older than their retention; return
    how many rows of each kind went.

    ``max_seconds`` bounds the work of one call per kind (at least one batch is always
    done), so the hub's sweep catches up with a backlog over several passes instead of
    holding its database thread; ``None`` runs until nothing expired is left.
    """
    now = now or timezone.now()
    counts = {
        "llm_request_logs": _prune_llm_request_logs(
            _cutoff(now, settings.APEXBRIDGE_LLM_LOG_RETENTION_DAYS), batch_size, max_seconds
        ),
        "tasks": _prune_tasks(_cutoff(now, settings.APEXBRIDGE_TASK_RETENTION_DAYS), batch_size, max_seconds),
    }
    if any(counts.values()):
        logger.info(
            "retention: pruned %d LLM request log(s) older than %d days and %d finished task(s) "
            "older than %d days",
            counts["llm_request_logs"],
            settings.APEXBRIDGE_LLM_LOG_RETENTION_DAYS,
            counts["tasks"],
            settings.APEXBRIDGE_TASK_RETENTION_DAYS,
        )
    return counts


def _cutoff(now: datetime, days: int) -> datetime | None:
    # A negative value is read as "forever" too: a typo must not delete everything.
    return now - timedelta(days=days) if days > 0 else None


def _prune_llm_request_logs(cutoff: datetime | None, batch_size: int, max_seconds: float | None) -> int:
    if cutoff is None:
        return 0
    expired = LLMRequestLog.objects.filter(created_at__lt=cutoff)
    deleted = 0
    started = time.monotonic()
    while True:
        ids = list(expired.order_by("created_at", "id").values_list("id", flat=True)[:batch_size])
        if not ids:
            break
        # Counted from the DELETE itself: rows another process removed first are not ours.
        deleted += expired.filter(pk__in=ids).delete()[0]
        if len(ids) < batch_size or _out_of_time(started, max_seconds):
            break
    return deleted


def _prune_tasks(cutoff: datetime | None, batch_size: int, max_seconds: float | None) -> int:
    if cutoff is None:
        return 0
    # ``created_at`` (indexed) narrows the scan to old rows: a task cannot end before
    # it was created. A final task without ``finished_at`` falls back to its age.
    expired = Task.objects.filter(status__in=FINAL_TASK_STATUSES, created_at__lt=cutoff).filter(
        Q(finished_at__lt=cutoff) | Q(finished_at__isnull=True)
    )
    deleted = 0
    after: tuple[datetime, str] | None = None
    started = time.monotonic()
    while True:
        # Walk forward by (created_at, task_id) so kept rows are not looked at again.
        page = expired.order_by("created_at", "task_id")
        if after is not None:
            page = page.filter(Q(created_at__gt=after[0]) | Q(created_at=after[0], task_id__gt=after[1]))
        rows = list(page.values_list("created_at", "task_id")[:batch_size])
        if not rows:
            break
        after = rows[-1]
        ids = {task_id for _, task_id in rows} - _task_ids_still_needed()
        if ids:
            # The filter is checked again in the DELETE: a task re-queued since the
            # SELECT is no longer final and stays.
            deleted += expired.filter(pk__in=ids).delete()[0]
        if len(rows) < batch_size or _out_of_time(started, max_seconds):
            break
    return deleted


def _task_ids_still_needed() -> set[str]:
    """Ids that a queued or assigned task lists in ``depends_on``: deleting one would
    make that task fail as "dependency did not succeed: … (missing)"."""
    needed: set[str] = set()
    for depends_on in (
        Task.objects.exclude(status__in=FINAL_TASK_STATUSES)
        .exclude(depends_on=[])
        .values_list("depends_on", flat=True)
        .iterator(chunk_size=2000)
    ):
        needed.update(depends_on or [])
    return needed


def _out_of_time(started: float, max_seconds: float | None) -> bool:
    return max_seconds is not None and time.monotonic() - started >= max_seconds
