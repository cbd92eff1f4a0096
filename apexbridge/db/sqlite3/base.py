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

It also keeps up to 16 closed connections open for the next use (``IdleConnections``).
With ``CONN_MAX_AGE = 0`` Django closes the connection after every request and every
database hop, and opening one costs more than the queries of a hop: Django registers
some 40 SQL functions and runs the ``PRAGMA``s on each (py-spy: ~8 % of a hub's CPU
under the task benchmark). A connection goes back only outside a transaction, and is
reused only for the same database file (by inode: a test database deleted and made
again is a new file) with the same options.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sqlite3
import threading
from typing import Any

from django.db.backends.sqlite3 import base, creation

_WRITE_LOCK = threading.Lock()


class IdleConnections:
    """Open ``sqlite3`` connections nobody uses, per database file and options, at
    most ``keep`` in all. A file deleted or made again drops its connections (they
    would keep the old file, and its ``-wal``, alive); all are closed at exit."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._idle: dict[tuple, list[sqlite3.Connection]] = {}
        self._count = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(conn_params: dict[str, Any], init_commands: list[str]) -> tuple | None:
        """What a connection must share to be reused (the path first); ``None``:
        never kept (an in-memory or URI database, or a file that is not there)."""
        name = str(conn_params.get("database", ""))
        if not name or name == ":memory:" or name.startswith("file:"):
            return None
        try:
            stat = os.stat(name)
        except OSError:
            return None
        options = tuple(sorted((k, repr(v)) for k, v in conn_params.items()))
        return (os.path.abspath(name), stat.st_dev, stat.st_ino, options, tuple(init_commands))

    def take(self, key: tuple | None) -> sqlite3.Connection | None:
        if key is None:
            return None
        with self._lock:
            stale = self._pop_stale(key)
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
            if conn is not None:
                self._count -= 1
        _close_quietly(stale)
        return conn

    def give(self, key: tuple | None, conn: sqlite3.Connection) -> bool:
        """Keep ``conn`` for the next ``take`` (``False``: the caller closes it)."""
        if key is None or not _still_there(key):
            return False
        try:
            if conn.in_transaction:
                conn.rollback()
        except sqlite3.Error:
            return False
        with self._lock:
            stale = self._pop_stale(key)
            kept = self._count < self.keep
            if kept:
                self._idle.setdefault(key, []).append(conn)
                self._count += 1
        _close_quietly(stale)
        return kept

    def forget_file(self, name: str) -> None:
        """Close the connections to ``name`` (before it is deleted)."""
        path = os.path.abspath(name)
        with self._lock:
            stale = [c for k in [k for k in self._idle if k[0] == path] for c in self._pop(k)]
        _close_quietly(stale)

    def close_all(self) -> None:
        with self._lock:
            stale = [c for k in list(self._idle) for c in self._pop(k)]
        _close_quietly(stale)

    def _pop(self, key: tuple) -> list[sqlite3.Connection]:
        connections = self._idle.pop(key, [])
        self._count -= len(connections)
        return connections

    def _pop_stale(self, key: tuple) -> list[sqlite3.Connection]:
        """The connections to an older file at ``key``'s path (deleted or replaced)."""
        path, dev, ino = key[:3]
        stale_keys = [k for k in self._idle if k[0] == path and k[1:3] != (dev, ino)]
        return [c for k in stale_keys for c in self._pop(k)]


def _still_there(key: tuple) -> bool:
    """Whether the key's file is still at its path (a connection to a deleted test
    database, closed late by another thread, is not kept)."""
    try:
        stat = os.stat(key[0])
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) == key[1:3]


def _close_quietly(connections: list[sqlite3.Connection]) -> None:
    for conn in connections:
        try:
            conn.close()
        except sqlite3.Error:
            pass


# Enough for the database thread, the background loops and a burst of API requests.
idle_connections = IdleConnections(keep=16)
atexit.register(idle_connections.close_all)


class DatabaseCreation(creation.DatabaseCreation):
    def _destroy_test_db(self, test_database_name, verbosity):
        """Close the kept connections to the test database, delete it, and its WAL
        files: with a connection of the test run still open somewhere, SQLite would
        leave them behind."""
        idle_connections.forget_file(test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)
        if test_database_name and not self.is_in_memory_db(test_database_name):
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{test_database_name}{suffix}")


class DatabaseWrapper(base.DatabaseWrapper):
    creation_class = DatabaseCreation
    _holds_write_lock = False
    _idle_key: tuple | None = None

    def get_new_connection(self, conn_params):
        key = IdleConnections.key(conn_params, self.init_commands)
        conn = idle_connections.take(key)
        if conn is None:
            conn = super().get_new_connection(conn_params)
            key = IdleConnections.key(conn_params, self.init_commands)  # the file exists now
        else:  # what a new connection gets, in case its last user changed it
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA legacy_alter_table = OFF")
            for init_command in self.init_commands:
                if init_command := init_command.strip():
                    conn.execute(init_command)
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
            # Inside an atomic block Django keeps the connection until the block
            # ends (``closed_in_transaction``): it is not free for anyone else yet.
            if (
                self.connection is not None
                and not self.in_atomic_block
                and idle_connections.give(self._idle_key, self.connection)
            ):
                return None
            return super()._close()
        finally:
            self._release_write_lock()
