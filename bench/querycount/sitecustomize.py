"""Count the SQL statements a benchmark hub runs (``profile_hub.py --count-queries``).

On the hub's ``PYTHONPATH`` only when ``APEXBRIDGE_BENCH_QUERY_LOG`` names a file:
Python imports this module at start-up; it puts an ``execute_wrapper`` on every
database connection Django opens and writes ``{statement shape: count}`` as JSON to
that file once a second (a daemon thread), so the count survives however the hub is
stopped. A statement's shape is its SQL with numbers and quoted strings replaced by
``?`` and ``IN (...)`` lists folded, a long column list of a SELECT, an INSERT or an UPDATE's
SET shortened to ``…``, cut to 200 characters.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading

PATH = os.environ.get("APEXBRIDGE_BENCH_QUERY_LOG")
_NUMBER = re.compile(r"\b\d+(\.\d+)?\b")
_STRING = re.compile(r"'(?:[^']|'')*'")
_LIST = re.compile(r"\((?:\s*(?:\?|%s)\s*,)+\s*(?:\?|%s)\s*\)")
_COLUMNS = re.compile(r"^(SELECT (?:DISTINCT )?)(.{60,}?)( FROM )")
_INSERT = re.compile(r"^(INSERT INTO \S+ )\((.{40,}?)\)")
_SET = re.compile(r"^(UPDATE \S+ SET )(.{60,}?)( WHERE )")
_counts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def shape(sql: str) -> str:
    text = _NUMBER.sub("?", _STRING.sub("?", " ".join(sql.split())))
    text = _LIST.sub("(...)", text)
    for pattern in (_COLUMNS, _SET):
        text = pattern.sub(lambda m: f"{m.group(1)}{m.group(2)[:40]}…{m.group(3)}", text, count=1)
    text = _INSERT.sub(lambda m: f"{m.group(1)}({m.group(2)[:40]}…)", text, count=1)
    return text[:200]


def _count(execute, sql, params, many, context):  # noqa: ANN001 - Django's wrapper signature
    key = shape(sql)
    with _lock:
        _counts["executemany " + key if many else key] += 1
    return execute(sql, params, many, context)


def _on_connection(sender, connection, **kwargs):  # noqa: ANN001, ARG001
    if _count not in connection.execute_wrappers:
        connection.execute_wrappers.append(_count)


def _write_every_second() -> None:
    event = threading.Event()
    while not event.wait(1.0):
        with _lock:
            data = dict(_counts)
        tmp = f"{PATH}.tmp"
        with open(tmp, "w") as file:
            json.dump(data, file)
        os.replace(tmp, PATH)


if PATH:
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection, weak=False)
    threading.Thread(target=_write_every_second, name="bench-query-count", daemon=True).start()
