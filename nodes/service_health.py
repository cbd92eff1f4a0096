"""Outages of the services behind the hub: the channel layer (Redis) and the database.

**Channel layer.** Channels reads a consumer's channel with ``channel_layer.receive``; when Redis goes
away that call raises, and the exception ends the consumer: daphne closes the socket
with 1011. The hub keeps its sockets instead: ``ResilientChannelReceiveMixin`` retries
the read with back-off while everything that does not need the layer goes on
(heartbeats, registrations, results, LLM calls). What the layer carries is paused
meanwhile: task notifications (tasks wait queued in the database; an assignment whose
notice could not be sent goes back to the queue), admin events and takeover closes
of sockets on other processes.

**Database.** Heartbeats are acknowledged from memory and written when the database
is back; anything that needs it is answered ``service_unavailable`` (PROTOCOL is
silent; docs/DECISIONS.md) and the node retries. See ``HubRuntime.sweep`` for how
liveness is judged after an outage.

Each process logs one warning when a service fails and one line when it is back
(``ServiceHealth``), instead of a traceback per failed call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0
# A channel read that swallowed its cancellation is cancelled again this often, this many times.
RECANCEL_INTERVAL_S = 0.5
RECANCEL_ATTEMPTS = 20


class ServiceHealth:
    """Process-wide state of one backing service, for one log line per outage."""

    def __init__(self, name: str, while_down: str) -> None:
        self.name = name
        self.while_down = while_down
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> None:
        if is_lock_conflict(exc):
            # A deadlock or serialization failure that outlasted its retries: the work
            # was refused (and may be sent again), but the service is up.
            logger.warning("%s: a lock conflict outlasted its retries (%s)", self.name, str(exc).strip())
            return
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(
                "%s unavailable (%s: %s): %s",
                self.name,
                type(exc).__name__,
                str(exc).strip(),
                self.while_down,
            )

    def recovered(self) -> bool:
        """Mark the service as answering; True if it had been down."""
        if self.down_since is None:
            return False
        logger.warning("%s available again after %.1f s", self.name, time.monotonic() - self.down_since)
        self.down_since = None
        return True


layer_health = ServiceHealth(
    "channel layer",
    "sockets stay open; task notifications, admin events and takeovers across processes "
    "wait until it is back",
)
database_health = ServiceHealth(
    "database",
    "heartbeats are still acknowledged and kept in memory; registrations, task results "
    "and API calls are answered service_unavailable until it is back",
)


def is_database_outage(exc: BaseException) -> bool:
    """The database cannot be reached (not a bad query or a constraint)."""
    from django.db import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))


# PostgreSQL's deadlock_detected and serialization_failure: raised as OperationalError
# (so ``is_database_outage`` says yes), but the database is fine and the same work,
# tried again, goes through.
LOCK_CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})


def is_lock_conflict(exc: BaseException) -> bool:
    """Another transaction got in the way (a deadlock), not an unreachable database."""
    return getattr(exc.__cause__, "sqlstate", None) in LOCK_CONFLICT_SQLSTATES


async def ping_layer(layer: Any) -> None:
    """Raise unless the channel layer answers (a no-op for layers without a server)."""
    connection = getattr(layer, "connection", None)  # channels_redis: one client per shard
    if connection is not None:
        await connection(0).ping()


class ResilientChannelReceiveMixin:
    """For a Channels consumer: a failing channel-layer read is retried, not fatal.

    ``AsyncConsumer.__call__`` stores ``functools.partial(layer.receive, name)`` in
    ``self.channel_receive`` and reads through it; the property keeps that partial and
    hands Channels the retrying reader instead. Subclasses that belong to groups
    re-join them in ``rejoin_channel_groups`` (a restarted Redis has forgotten them).
    """

    _raw_channel_receive: Any = None

    @property
    def channel_receive(self):
        return self._resilient_channel_receive

    @channel_receive.setter
    def channel_receive(self, value) -> None:
        self._raw_channel_receive = value

    async def rejoin_channel_groups(self) -> None:
        """Called after a failed read, before reading again; raises while the layer is
        down. Consumers in groups override it to add themselves again."""
        await ping_layer(self.channel_layer)

    async def _resilient_channel_receive(self) -> dict[str, Any]:
        delay = RETRY_FIRST_S
        while True:
            try:
                return await self._read_channel()
            except Exception as exc:  # CancelledError is not an Exception: closing still works
                layer_health.failed(exc)
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                try:
                    await self.rejoin_channel_groups()
                except Exception as exc:
                    layer_health.failed(exc)
                    continue
                break
            layer_health.recovered()

    async def _read_channel(self) -> dict[str, Any]:
        """One read, in its own task, that this consumer never waits for once cancelled.

        redis-py can swallow a cancellation that lands while a blocking read (the
        layer's BZPOPMIN) is being set up or answered (redis/redis-py#2028): the read
        then carries on, and a consumer closing its socket waited for it until the ASGI
        server killed the instance 10 s later ("took too long to shut down", seen on
        about one connection in a hundred against Redis). Here the consumer stops at
        once; the read is cancelled, and cancelled again until it has ended. What it
        ends with is dropped: the socket is closing, and an assignment it carried is
        released with the connection (``task_release_node_attempts``)."""
        read = asyncio.ensure_future(self._raw_channel_receive())
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            read.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved, not logged
            cancel_until_done(read)
            raise


def cancel_until_done(task: asyncio.Future, attempts: int = RECANCEL_ATTEMPTS) -> None:
    """Cancel ``task``; while it is still running, cancel it again every
    ``RECANCEL_INTERVAL_S``, at most ``attempts`` more times."""
    if task.done():
        return
    task.cancel()
    if attempts > 0:
        asyncio.get_running_loop().call_later(RECANCEL_INTERVAL_S, cancel_until_done, task, attempts - 1)
