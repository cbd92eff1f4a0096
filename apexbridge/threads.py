"""A thread pool that grows as needed: the threads HTTP requests run in
(``apexbridge/asgi.py``).

A call runs on an idle thread, or on a new one when every thread is busy: there is
no limit, as there was none when each request started a thread of its own (a
``?wait`` request holds its thread while it waits, so a cap would let waiting
requests hold up every other request). A thread idle for ``idle_s`` ends, so a burst
of waiting requests does not leave its threads behind. ``concurrent.futures``'
``ThreadPoolExecutor`` reuses idle threads too, but never ends them and queues
every call past ``max_workers``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class ElasticThreadPool(Executor):
    """``on_exit`` runs in each thread as it ends (the HTTP pool closes the thread's
    database connections there: a thread's Django connection is in a reference cycle,
    so it would stay open until a garbage collection)."""

    def __init__(self, name: str, *, idle_s: float = 60.0, on_exit: Callable[[], None] | None = None) -> None:
        self._name = name
        self._idle_s = idle_s
        self.on_exit = on_exit
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Threads not running a call, less the calls queued for them: a call is put in
        # the queue for an idle thread when there is one, else a thread is started.
        self._idle = 0
        self._threads = 0
        self._started = 0
        self._shut_down = False

    @property
    def threads(self) -> int:
        """Threads alive now (running a call or idle)."""
        return self._threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._shut_down:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._calls.put((future, fn, args, kwargs))
            if self._idle:
                self._idle -= 1
                return future
            self._threads += 1
            self._started += 1
            name = f"{self._name}_{self._started}"
        # Daemon threads, as asgiref's: a process that exits does not wait for a
        # request still waiting for its task.
        threading.Thread(target=self._work, name=name, daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; idle threads end within ``idle_s`` (queued calls still run)."""
        with self._lock:
            self._shut_down = True

    def _work(self) -> None:
        try:
            self._take_calls()
        finally:
            if self.on_exit is not None:
                self.on_exit()

    def _take_calls(self) -> None:
        while True:
            try:
                future, fn, args, kwargs = self._calls.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._calls.empty():  # no call was queued for this thread meanwhile
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            if not future.set_running_or_notify_cancel():
                with self._lock:
                    self._idle += 1
                continue
            try:
                result, error = fn(*args, **kwargs), None
            except BaseException as exc:  # the caller gets it, as from ThreadPoolExecutor
                result, error = None, exc
            # Idle before the caller hears of it: its next call finds this thread.
            with self._lock:
                self._idle += 1
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            del future, fn, args, kwargs, result, error  # nothing of the call outlives it
