"""The thread pool HTTP requests run in (apexbridge/threads.py): every call runs at
once however many are busy (a request waiting with ``?wait`` must not hold up
others), idle threads are reused, and threads idle for a while end."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from asgiref.sync import sync_to_async

from apexbridge.threads import ElasticThreadPool


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_call_returns_its_result_or_raises_its_exception():
    pool = ElasticThreadPool("t")
    assert pool.submit(lambda a, b: a + b, 2, b=3).result(timeout=5) == 5
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=5)


def test_every_call_runs_at_once_however_many_are_busy():
    pool = ElasticThreadPool("t")
    calls = 60
    everyone = threading.Barrier(calls + 1, timeout=10)  # only passes when all run together
    futures = [pool.submit(everyone.wait) for _ in range(calls)]
    everyone.wait()
    for future in futures:
        future.result(timeout=5)
    assert pool.threads == calls


def test_an_idle_thread_is_reused_rather_than_another_started():
    pool = ElasticThreadPool("t")
    names = set()
    for _ in range(20):
        names.add(pool.submit(lambda: threading.current_thread().name).result(timeout=5))
        assert wait_until(lambda: pool._idle == 1)  # the thread is back, waiting
    assert len(names) == 1
    assert pool.threads == 1


def test_threads_idle_for_a_while_end_and_new_calls_still_run():
    pool = ElasticThreadPool("t", idle_s=0.05)
    release = threading.Event()
    futures = [pool.submit(release.wait, 5) for _ in range(5)]
    assert wait_until(lambda: pool.threads == 5)
    release.set()
    assert all(future.result(timeout=5) for future in futures)
    assert wait_until(lambda: pool.threads == 0)
    assert pool.submit(lambda: "again").result(timeout=5) == "again"


def test_no_call_is_taken_after_shutdown():
    pool = ElasticThreadPool("t")
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(print)


def test_a_thread_that_ends_runs_the_exit_hook_in_itself():
    ended = []
    pool = ElasticThreadPool("t", idle_s=0.05, on_exit=lambda: ended.append(threading.current_thread().name))
    worker = pool.submit(lambda: threading.current_thread().name).result(timeout=5)
    assert wait_until(lambda: pool.threads == 0)
    assert ended == [worker]


def test_back_to_back_calls_from_one_caller_need_one_thread():
    """A call's thread is idle again before its caller hears the result, so the
    caller's next call does not start another thread (each would hold a database
    connection with persistent connections)."""
    pool = ElasticThreadPool("t")
    call = sync_to_async(lambda: None, thread_sensitive=False, executor=pool)  # as the handler calls

    async def one_after_another() -> None:
        for _ in range(2000):
            await call()

    asyncio.run(one_after_another())
    assert pool.threads == 1
