"""Wake ``?wait=`` requests the moment their task ends in this process.

``POST /api/tasks?wait=`` and ``GET /api/tasks/<id>?wait=`` block a request thread
until the task is final. The database stays the truth: a waiter re-reads the task
whenever it is woken and at least every ``RECHECK_S`` (a task may end in another hub
process, which cannot wake it). A task that ends here wakes its waiters right after
the change commits (``publish_task``), instead of at the next poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from apexbridge.db.pool import release_pooled_connection

RECHECK_S = 0.1

T = TypeVar("T")

_lock = threading.Lock()
_waiting: dict[str, list[threading.Event]] = {}


def task_ended(task_id: str) -> None:
    """Wake every request waiting for this task (call after the change committed)."""
    with _lock:
        events = _waiting.pop(task_id, [])
    for event in events:
        event.set()


def wait_until_final(task_id: str, wait_s: float, load: Callable[[], T], is_final: Callable[[T], bool]) -> T:
    """``load()`` until ``is_final`` or ``wait_s`` ran out; woken by ``task_ended``.

    One read per wake-up: the waiter registers before it reads, so a task that ends
    between the read and the wait still wakes it."""
    deadline = time.monotonic() + wait_s
    while True:
        event = threading.Event()
        with _lock:
            _waiting.setdefault(task_id, []).append(event)
        try:
            current = load()
            remaining = deadline - time.monotonic()
            if is_final(current) or remaining <= 0:
                return current
            release_pooled_connection()
            event.wait(min(RECHECK_S, remaining))
        finally:
            with _lock:
                events = _waiting.get(task_id)
                if events is not None and event in events:
                    events.remove(event)
                    if not events:
                        del _waiting[task_id]
