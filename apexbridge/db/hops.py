"""``database_sync_to_async`` for the hub: Channels' helper, plus closing old database
connections *inside* the context the hop runs in.

Channels runs ``close_old_connections`` around a hop, but outside ``context.run``,
where the hop's function runs (asgiref 3.13). When the hop was started from a task
that a consumer had created (the coalesced dispatch pass, a registration batch, the
background loops), the connection the function opened was not among the ones that
call saw, so it stayed open: with ``CONN_MAX_AGE = 0`` the database thread kept an
idle PostgreSQL session (seen as a test database that could not be dropped).
Closing again inside the context keeps ``CONN_MAX_AGE`` true for every hop.
"""

from __future__ import annotations

import functools
from typing import Any

from channels.db import DatabaseSyncToAsync as ChannelsDatabaseSyncToAsync
from django.db import close_old_connections


class DatabaseSyncToAsync(ChannelsDatabaseSyncToAsync):
    def __init__(self, func: Any, *args: Any, **kwargs: Any) -> None:
        @functools.wraps(func)
        def closing(*call_args: Any, **call_kwargs: Any) -> Any:
            try:
                return func(*call_args, **call_kwargs)
            finally:
                close_old_connections()

        super().__init__(closing, *args, **kwargs)


database_sync_to_async = DatabaseSyncToAsync
