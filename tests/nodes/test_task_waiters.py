"""``?wait=`` requests are woken when their task ends in this process, and fall back to
re-reading the database (a task may end in another hub process)."""

from __future__ import annotations

import threading
import time

from nodes import task_waiters


def test_a_waiter_is_woken_when_its_task_ends(monkeypatch):
    monkeypatch.setattr(task_waiters, "RECHECK_S", 60)  # no polling: only the wake-up helps
    state = {"final": False}

    def finish_later():
        time.sleep(0.2)
        state["final"] = True
        task_waiters.task_ended("t-1")

    threading.Thread(target=finish_later).start()
    started = time.monotonic()
    result = task_waiters.wait_until_final("t-1", 60, load=lambda: dict(state), is_final=lambda s: s["final"])
    assert result == {"final": True}
    assert time.monotonic() - started < 30  # woken, not timed out after 60 s
    assert task_waiters._waiting == {}  # nothing left behind


def test_a_task_that_ends_elsewhere_is_seen_by_rereading(monkeypatch):
    monkeypatch.setattr(task_waiters, "RECHECK_S", 0.01)
    loads = iter([False, False, False, True])
    result = task_waiters.wait_until_final("t-2", 30, load=lambda: next(loads), is_final=bool)
    assert result is True


def test_the_wait_runs_out_with_the_task_as_it_is():
    result = task_waiters.wait_until_final("t-3", 0.05, load=lambda: "running", is_final=lambda s: False)
    assert result == "running"
    assert task_waiters._waiting == {}


def test_a_woken_waiter_reads_the_task_once_per_wake_up(monkeypatch):
    """Each read is a database query on the request's thread: one to start, one when
    woken (the waiter registers before it reads, so an end in between still wakes it)."""
    monkeypatch.setattr(task_waiters, "RECHECK_S", 60)
    state = {"final": False, "loads": 0}

    def load():
        state["loads"] += 1
        return state["final"]

    def finish_later():
        while not (state["loads"] and "t-4" in task_waiters._waiting):
            time.sleep(0.01)
        time.sleep(0.2)  # the waiter is asleep now
        state["final"] = True
        task_waiters.task_ended("t-4")

    threading.Thread(target=finish_later).start()
    assert task_waiters.wait_until_final("t-4", 60, load=load, is_final=bool) is True
    assert state["loads"] == 2
