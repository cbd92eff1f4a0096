"""SQLite backend of the embedded default: Django's, plus an in-process write queue.

SQLite lets one writer in at a time. Django's SQLite backend with
``transaction_mode=IMMEDIATE`` takes the write lock at ``BEGIN IMMEDIATE``; a second
connection waits in SQLite's busy handler, which polls by sleeping 1, 2, 5 … 100 ms.
Under ASGI every HTTP request has its own thread and connection, so 32 concurrent
``POST /api/tasks`` spent most of their time asleep in that handler (py-spy: 87 % of
the busy samples in ``BEGIN IMMEDIATE``; docs/BENCHMARKS.md).

Here the writers of one process queue on a ``threading.Lock`` instead, taken just
before ``BEGIN IMMEDIATE`` and released when the transaction commits, rolls back or
its connection closes: the next writer starts the moment the lock is free. Other
processes (``manage.py`` commands) still meet at SQLite's own lock. The wait on the
process lock is bounded by the busy timeout; past it the transaction goes ahead and
SQLite decides, as without this backend.
"""

from __future__ import annotations

import threading

from django.db.backends.sqlite3 import base

_WRITE_LOCK = threading.Lock()


class DatabaseWrapper(base.DatabaseWrapper):
    _holds_write_lock = False

    def _start_transaction_under_autocommit(self) -> None:
        timeout = float(self.settings_dict.get("OPTIONS", {}).get("timeout", 20))
        acquired = _WRITE_LOCK.acquire(timeout=timeout)
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            if acquired:
                _WRITE_LOCK.release()
            raise
        self._holds_write_lock = acquired

    def _release_write_lock(self) -> None:
        if self._holds_write_lock:
            self._holds_write_lock = False
            _WRITE_LOCK.release()

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._release_write_lock()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._release_write_lock()

    def _close(self):
        try:
            return super()._close()
        finally:
            self._release_write_lock()
