"""The embedded SQLite backend keeps closed connections open for the next use
(apexbridge/db/sqlite3/base.py): a reused connection must never carry anything over
from its last use, and never point at another database file."""

from __future__ import annotations

import os
import sqlite3

import pytest
from django.db import connection

from apexbridge.db.sqlite3.base import IdleConnections

PARAMS = {"detect_types": 0, "check_same_thread": False}


def params_for(path) -> dict:
    return {"database": str(path), **PARAMS}


def open_with_table(path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False)
    conn.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
    conn.commit()
    return conn


def test_a_connection_given_back_is_taken_again_for_the_same_file_and_options(tmp_path):
    idle = IdleConnections(keep=4)
    conn = open_with_table(tmp_path / "a.sqlite3")
    key = IdleConnections.key(params_for(tmp_path / "a.sqlite3"), [])
    assert idle.give(key, conn)
    other_options = IdleConnections.key({**params_for(tmp_path / "a.sqlite3"), "timeout": 1}, [])
    assert idle.take(other_options) is None
    assert idle.take(IdleConnections.key(params_for(tmp_path / "a.sqlite3"), ["PRAGMA x"])) is None
    assert idle.take(key) is conn
    assert idle.take(key) is None  # one user at a time


def test_a_connection_left_in_a_transaction_comes_back_rolled_back(tmp_path):
    idle = IdleConnections(keep=4)
    conn = open_with_table(tmp_path / "a.sqlite3")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES ('not committed')")
    key = IdleConnections.key(params_for(tmp_path / "a.sqlite3"), [])
    assert idle.give(key, conn)
    again = idle.take(key)
    assert not again.in_transaction
    assert again.execute("SELECT count(*) FROM t").fetchone() == (0,)
    # and another connection can write at once: the write lock was let go
    other = sqlite3.connect(str(tmp_path / "a.sqlite3"), timeout=0)
    other.execute("INSERT INTO t VALUES ('x')")
    other.commit()


def test_a_database_file_made_again_never_gets_the_old_files_connection(tmp_path):
    idle = IdleConnections(keep=4)
    path = tmp_path / "a.sqlite3"
    old = open_with_table(path)
    old.execute("INSERT INTO t VALUES ('old file')")
    old.commit()
    assert idle.give(IdleConnections.key(params_for(path), []), old)
    os.remove(path)
    open_with_table(path).close()  # a new, empty database under the same name
    assert idle.take(IdleConnections.key(params_for(path), [])) is None


def test_memory_databases_and_missing_files_are_never_kept(tmp_path):
    assert IdleConnections.key(params_for(":memory:"), []) is None
    assert IdleConnections.key(params_for("file:memorydb?mode=memory&cache=shared"), []) is None
    assert IdleConnections.key(params_for(tmp_path / "not-there.sqlite3"), []) is None


def test_no_more_than_keep_connections_stay_open(tmp_path):
    idle = IdleConnections(keep=2)
    conns = [open_with_table(tmp_path / "a.sqlite3") for _ in range(3)]
    key = IdleConnections.key(params_for(tmp_path / "a.sqlite3"), [])
    assert [idle.give(key, conn) for conn in conns] == [True, True, False]


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the embedded SQLite backend's own behaviour")
@pytest.mark.django_db(transaction=True)
def test_djangos_connection_reuses_the_raw_connection_and_starts_clean():
    from nodes.models import Node

    connection.ensure_connection()
    raw = connection.connection
    connection.close()
    connection.ensure_connection()
    assert connection.connection is raw  # no new connection opened
    assert connection.get_autocommit() and not connection.in_atomic_block
    Node.objects.create(node_id="after-reuse", name="n")
    assert Node.objects.filter(pk="after-reuse").exists()


def test_the_limit_is_for_all_files_together(tmp_path):
    idle = IdleConnections(keep=2)
    keys, conns = [], []
    for name in ("a", "b", "c"):
        conns.append(open_with_table(tmp_path / f"{name}.sqlite3"))
        keys.append(IdleConnections.key(params_for(tmp_path / f"{name}.sqlite3"), []))
    assert [idle.give(key, conn) for key, conn in zip(keys, conns, strict=True)] == [True, True, False]


def test_connections_to_a_deleted_file_are_closed_not_kept(tmp_path):
    idle = IdleConnections(keep=4)
    path = tmp_path / "a.sqlite3"
    old = open_with_table(path)
    assert idle.give(IdleConnections.key(params_for(path), []), old)
    os.remove(path)
    open_with_table(path).close()
    # the next use of the path finds the old file's connection stale and closes it
    assert idle.take(IdleConnections.key(params_for(path), [])) is None
    with pytest.raises(sqlite3.ProgrammingError):
        old.execute("SELECT 1")
    # and a test database is let go before it is deleted
    kept = open_with_table(path)
    assert idle.give(IdleConnections.key(params_for(path), []), kept)
    idle.forget_file(str(path))
    with pytest.raises(sqlite3.ProgrammingError):
        kept.execute("SELECT 1")


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the embedded SQLite backend's own behaviour")
@pytest.mark.django_db(transaction=True)
def test_a_reused_connection_gets_what_a_new_one_gets_whatever_its_last_user_changed():
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA foreign_keys = OFF")
    raw = connection.connection
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA foreign_keys")
        assert cursor.fetchone() == (1,)
    assert connection.connection is raw


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the embedded SQLite backend's own behaviour")
@pytest.mark.django_db(transaction=True)
def test_a_connection_closed_inside_an_atomic_block_is_not_handed_to_anyone_else():
    from django.db import transaction

    from apexbridge.db.sqlite3.base import idle_connections

    idle_connections.close_all()
    with transaction.atomic():
        connection.ensure_connection()
        raw = connection.connection
        connection.close()
        assert idle_connections.take(connection._idle_key) is None
    connection.close()
    assert idle_connections.take(connection._idle_key) is not raw
