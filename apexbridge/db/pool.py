"""Django's psycopg connection pool (``APEXBRIDGE_DB_POOL_SIZE``): give connections back early.

With ``CONN_MAX_AGE = 0`` a thread returns its pooled connection only when its unit
of work ends (end of request, end of a ``database_sync_to_async`` call). A thread
that then *waits* — an API request blocked on ``?wait=`` or on the coalesced dispatch
pass — would keep a connection it does not use, and a few dozen of them hold the
whole pool: the dispatch pass they wait for cannot get one (a deadlock until the
pool's time-out). They call ``release_pooled_connection()`` before waiting.
"""

from __future__ import annotations

from django.db import connection


def pool_enabled() -> bool:
    return bool(connection.settings_dict.get("OPTIONS", {}).get("pool"))


def release_pooled_connection() -> None:
    """Hand this thread's connection back to the pool (no-op without the pool, or
    inside a transaction). Without the pool the connection is kept: closing it would
    mean a new TCP connection at the next query."""
    if pool_enabled() and not connection.in_atomic_block:
        connection.close()
