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

It also keeps a few closed connections open for the next use (``IdleConnections``).
With ``CONN_MAX_AGE = 0`` Django closes the connection after every request and every
database hop, and opening one costs more than the queries of a hop: Django registers
some 40 SQL functions and runs the ``PRAGMA``s on each (py-spy: ~8 % of a hub's CPU
under the task benchmark). A connection goes back only outside a transaction, and is
reused only for the same database file (by inode: a test database deleted and made
again is a new file) with the same options.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from django.db.backends.sqlite3 import base

_WRITE_LOCK = threading.Lock()


class IdleConnections:
    """Open ``sqlite3`` connections nobody uses, per database file and options."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._idle: dict[tuple, list[sqlite3.Connection]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(conn_params: dict[str, Any], init_commands: list[str]) -> tuple | None:
        """What a connection must share to be reused; ``None``: never kept (an
        in-memory or URI database, or a file that is not there)."""
        name = str(conn_params.get("database", ""))
        if not name or name == ":memory:" or name.startswith("file:"):
            return None
        try:
            stat = os.stat(name)
        except OSError:
            return None
        options = tuple(sorted((k, repr(v)) for k, v in conn_params.items()))
        return (stat.st_dev, stat.st_ino, options, tuple(init_commands))

    def take(self, key: tuple | None) -> sqlite3.Connection | None:
        if key is None:
            return None
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def give(self, key: tuple | None, conn: sqlite3.Connection) -> bool:
        """Keep ``conn`` for the next ``take`` (``False``: the caller closes it)."""
        if key is None:
            return False
        try:
            if conn.in_transaction:
                conn.rollback()
        except sqlite3.Error:
            return False
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) >= self.keep:
                return False
            idle.append(conn)
            return True

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for conn in connections:
                conn.close()


# Enough for the database thread, the background loops and a burst of API requests.
idle_connections = IdleConnections(keep=16)


class DatabaseWrapper(base.DatabaseWrapper):
    _holds_write_lock = False
    _idle_key: tuple | None = None

    def get_new_connection(self, conn_params):
        key = IdleConnections.key(conn_params, self.init_commands)
        conn = idle_connections.take(key)
        if conn is None:
            conn = super().get_new_connection(conn_params)
            key = IdleConnections.key(conn_params, self.init_commands)  # the file exists now
        self._idle_key = key
        return conn

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
            if self.connection is not None and idle_connections.give(self._idle_key, self.connection):
                return None
            return super()._close()
        finally:
            self._release_write_lock()
