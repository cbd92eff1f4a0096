"""Per-process background work of a hub process.

Daphne has no ASGI lifespan, so the loops start lazily with the first WebSocket
connection of the process (``ensure_started``). They are:

- the heartbeat flush: heartbeats are buffered in memory and written in one
  coalesced batch every ``APEXBRIDGE_HEARTBEAT_FLUSH_MS`` (no write per heartbeat);
- the sweep, every ``APEXBRIDGE_HEARTBEAT_SWEEP_MS``: this process's beat, dead
  processes, heartbeat time-outs, task time-outs, queued-task dispatch.

Several processes run the same sweep; every step is a conditional update, so the
effects happen once. The buffer here is process-local on purpose: it only holds
what this process's own sockets said, until the next flush.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import dataclasses
import gc
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime

from channels.layers import get_channel_layer
from django.conf import settings

from apexbridge.db.hops import database_sync_to_async
from apexbridge.db.pool import release_pooled_connection
from nodes import services
from nodes.service_health import database_health, is_database_outage, layer_health, ping_layer

logger = logging.getLogger(__name__)


class HubRuntime:
    def __init__(self) -> None:
        self.process_id = f"hub-{socket.gethostname()[:20]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._buffer: dict[str, services.HeartbeatRecord] = {}
        # What the last flush wrote per node: (connection id, stats, resources).
        self._flushed: dict[str, tuple[str, dict | None, dict | None]] = {}
        # VCP nodes send no heartbeat: an open socket of this process is their liveness.
        self.vcp_connections: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_once = False
        self._last_log_prune = 0.0
        self._judge_liveness_after = 0.0
        self._database_thread: threading.Thread | None = None
        self._dispatch_loop: asyncio.AbstractEventLoop | None = None
        self._dispatch_running: asyncio.Task | None = None
        self._dispatch_next: asyncio.Future | None = None

    # --- heartbeats ---------------------------------------------------------------------
    def record_heartbeat(
        self, node_id: str, connection_id: str, stats: dict | None = None, resources: dict | None = None
    ) -> None:
        previous = self._buffer.get(node_id)
        record = services.HeartbeatRecord(
            node_id=node_id,
            connection_id=connection_id,
            at=datetime.now(UTC),
            stats=stats,
            resources=resources,
        )
        if previous is not None and previous.connection_id == connection_id:
            record.stats = stats if stats is not None else previous.stats
            record.resources = resources if resources is not None else previous.resources
        self._buffer[node_id] = record

    def _without_repeats(self, record: services.HeartbeatRecord) -> services.HeartbeatRecord:
        connection_id, stats, resources = self._flushed.get(record.node_id, (None, None, None))
        if connection_id != record.connection_id:
            return record
        return dataclasses.replace(
            record,
            stats=None if record.stats == stats else record.stats,
            resources=None if record.resources == resources else record.resources,
        )

    def forget(self, node_id: str, connection_id: str | None = None) -> None:
        """Drop what this process keeps for a node; with ``connection_id``, only if it
        still belongs to that connection (a replaced socket closing after the takeover
        must not drop the new connection's heartbeat or VCP liveness)."""
        record = self._buffer.get(node_id)
        if record is not None and connection_id in (None, record.connection_id):
            del self._buffer[node_id]
        flushed = self._flushed.get(node_id)
        if flushed is not None and connection_id in (None, flushed[0]):
            del self._flushed[node_id]
        if connection_id in (None, self.vcp_connections.get(node_id)):
            self.vcp_connections.pop(node_id, None)

    async def flush_heartbeats(self) -> list[str]:
        now = datetime.now(UTC)
        for node_id, connection_id in self.vcp_connections.items():
            if node_id not in self._buffer:
                self._buffer[node_id] = services.HeartbeatRecord(node_id, connection_id, now)
        if not self._buffer:
            return []
        records, self._buffer = list(self._buffer.values()), {}
        # Stats and resources are written only when they changed since the last flush
        # (most heartbeats repeat them): the rest goes in one bulk UPDATE.
        writes = [self._without_repeats(record) for record in records]
        try:
            revived = await database_sync_to_async(services.node_flush_heartbeats)(writes)
        except Exception:
            # Keep the newest record per node for the next try; nothing is lost.
            for record in records:
                self._buffer.setdefault(record.node_id, record)
            raise
        for record in records:
            self._flushed[record.node_id] = (record.connection_id, record.stats, record.resources)
        if revived:
            await self.dispatch()
        return revived

    # --- sweep -------------------------------------------------------------------------
    def _sweep_sync(
        self, first: bool, dispatch: bool = True, judge_liveness: bool = True
    ) -> list[tuple[str, dict]]:
        """One pass of every periodic duty; returns channel messages to send."""
        from nodes import task_services

        self._database_thread = threading.current_thread()  # channels' one database thread

        services.process_beat(process_id=self.process_id, hostname=socket.gethostname(), pid=os.getpid())
        outgoing: list[tuple[str, dict]] = []
        if judge_liveness:
            single_process = not settings.REDIS_URL
            services.process_reap(
                current_process_id=self.process_id, everyone_else_is_dead=first and single_process
            )
            for node_id, channel_name in services.node_sweep_heartbeat_timeouts():
                if channel_name:
                    outgoing.append(
                        (channel_name, {"type": "node.status", "nodeId": node_id, "status": "offline"})
                    )
        outgoing.extend(task_services.task_sweep_timeouts())
        if dispatch:
            outgoing.extend(task_services.task_dispatch_pending())
        else:
            task_services.task_note_layer_down()
        if time.monotonic() - self._last_log_prune > 60:
            self._last_log_prune = time.monotonic()
            services.node_logs_prune()
            from nodes import retention

            try:
                # Bounded per pass (a backlog shrinks over several minutes); a failure
                # must not lose the task messages gathered above.
                retention.prune_expired(max_seconds=1.0)
            except Exception:
                logger.exception("retention prune failed; the next pass retries")
        return outgoing

    async def sweep(self, first: bool = False) -> None:
        """One sweep. After a database outage this process's buffered heartbeats are
        written first, and for one grace period no node or process is judged silent:
        the others need a flush interval or two to write what they buffered."""
        try:
            await self.flush_heartbeats()
            judge = time.monotonic() >= self._judge_liveness_after
            outgoing = await database_sync_to_async(self._sweep_sync)(first, await layer_reachable(), judge)
        except Exception as exc:
            if not is_database_outage(exc):
                raise
            database_health.failed(exc)
            return
        if database_health.recovered():
            grace_ms = 2 * settings.APEXBRIDGE_HEARTBEAT_FLUSH_MS + settings.APEXBRIDGE_HEARTBEAT_SWEEP_MS
            self._judge_liveness_after = time.monotonic() + grace_ms / 1000
        await send_all(outgoing)

    async def dispatch(self) -> None:
        """Hand queued tasks to eligible nodes now (after a change that may allow it).

        Coalesced: callers that arrive while a pass runs share the one next pass, so a
        burst (a registration storm, a stream of task results) costs a few passes on
        the process's single database thread instead of one pass per message. A
        caller returns once a pass that started after its call has finished.
        """
        loop = asyncio.get_running_loop()
        if self._dispatch_loop is not loop:  # first call, or a new event loop (tests)
            self._dispatch_loop, self._dispatch_running, self._dispatch_next = loop, None, None
        if self._dispatch_running is None:
            waiter = loop.create_future()
            self._dispatch_running = loop.create_task(self._dispatch_passes(waiter))
        else:
            if self._dispatch_next is None:
                self._dispatch_next = loop.create_future()
            waiter = self._dispatch_next
        # Shielded: one caller going away must not cancel a pass others wait for.
        await asyncio.shield(waiter)

    def dispatch_from_thread(self, timeout_s: float = 30) -> bool:
        """From a sync thread of this process (an API request): run ``dispatch`` on the
        hub's event loop and wait for the pass. False when there is no running hub
        loop, or when called on the database thread the pass itself needs."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return False
        if threading.current_thread() is self._database_thread:
            return False
        try:
            if asyncio.get_running_loop() is loop:
                return False
        except RuntimeError:
            pass  # a plain sync thread, as expected
        future: concurrent.futures.Future = concurrent.futures.Future()

        def start() -> None:
            task = loop.create_task(self.dispatch())
            task.add_done_callback(lambda done: _copy_outcome(done, future))

        # An empty context, not this thread's: asgiref's thread-sensitive context of the
        # request would send the pass's database work back to this (waiting) thread.
        loop.call_soon_threadsafe(start, context=contextvars.Context())
        release_pooled_connection()  # the pass needs a connection; this thread only waits
        try:
            future.result(timeout_s)
        except Exception as exc:
            if is_database_outage(exc):
                database_health.failed(exc)
            else:
                logger.warning("dispatch pass failed; the next sweep retries", exc_info=True)
        return True

    async def _dispatch_passes(self, waiter: asyncio.Future) -> None:
        from nodes import task_services

        try:
            while waiter is not None:
                try:
                    if await layer_reachable():
                        outgoing = await database_sync_to_async(task_services.task_dispatch_pending)()
                        await send_all(outgoing)
                    else:  # tasks wait queued, not half-assigned, saying why
                        await database_sync_to_async(task_services.task_note_layer_down)()
                except Exception as exc:
                    waiter.set_exception(exc)
                    waiter.exception()  # marked retrieved: callers that left need not see it
                else:
                    waiter.set_result(None)
                waiter, self._dispatch_next = self._dispatch_next, None
        finally:
            self._dispatch_running = None

    # --- loops -------------------------------------------------------------------------
    def running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this process's background loops run on, while it runs."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running() or not self._tasks:
            return None
        return loop

    def ensure_started(self) -> None:
        if not getattr(settings, "APEXBRIDGE_BACKGROUND_LOOPS", True):
            return
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._tasks and not all(t.done() for t in self._tasks):
            return
        self._loop = loop
        first = not self._started_once
        self._started_once = True
        if first:
            atexit.register(self._mark_stopped)
            self._keep_sqlite_wal()
            self._tune_garbage_collector()
        self._tasks = [
            loop.create_task(self._run_every(settings.APEXBRIDGE_HEARTBEAT_FLUSH_MS, self.flush_heartbeats)),
            loop.create_task(self._run_sweeps(first)),
        ]
        logger.info("hub process %s: background loops started", self.process_id)

    async def _run_sweeps(self, first: bool) -> None:
        try:
            await self.sweep(first=first)
        except Exception:
            logger.exception("first sweep failed")
        await self._run_every(settings.APEXBRIDGE_HEARTBEAT_SWEEP_MS, self.sweep)

    async def _run_every(self, interval_ms: int, step) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_database_outage(exc):
                    database_health.failed(exc)  # logged once per outage; the step retries
                    continue
                logger.exception("background step %s failed; will retry", getattr(step, "__name__", step))

    def _tune_garbage_collector(self) -> None:
        threshold = tuple(getattr(settings, "APEXBRIDGE_GC_THRESHOLD", ()))
        if threshold:
            gc.set_threshold(*threshold)
            logger.info("hub process %s: gc thresholds %s", self.process_id, gc.get_threshold())

    def _keep_sqlite_wal(self) -> None:
        """Hold one idle SQLite connection for the life of the process. With
        CONN_MAX_AGE = 0 every unit of work opens and closes a connection, and when
        the last one closes SQLite checkpoints and deletes the WAL file: an idle
        holder makes each close cheap (about a third of the cost, measured)."""
        database = settings.DATABASES["default"]
        name = str(database.get("NAME", ""))
        if not database["ENGINE"].endswith("sqlite3") or not name or name == ":memory:":
            return
        self._sqlite_holder = sqlite3.connect(name, isolation_level=None, check_same_thread=False)
        self._sqlite_holder.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()

    def _mark_stopped(self) -> None:
        """At exit, tell the other processes at once that our sockets are gone."""
        try:
            services.process_stopped(process_id=self.process_id)
        except Exception:  # noqa: S110 - the process timeout covers a failed write
            pass

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: S110 - stopping anyway
                pass
        self._tasks = []


def _copy_outcome(task: asyncio.Task, future: concurrent.futures.Future) -> None:
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())
    else:
        future.set_result(task.result())


async def layer_reachable() -> bool:
    """Whether task_assign messages can go out now. After a failure the layer is
    pinged first, so dispatch does not assign tasks it cannot deliver."""
    if layer_health.available:
        return True
    try:
        await ping_layer(get_channel_layer())
    except Exception:
        return False
    layer_health.recovered()
    return True


async def send_all(outgoing: list[tuple[str, dict]]) -> None:
    if not outgoing:
        return
    layer = get_channel_layer()
    undelivered: list[tuple[str, int]] = []
    failure = ""
    for channel_name, message in outgoing:
        try:
            await layer.send(channel_name, message)
        except Exception as exc:
            layer_health.failed(exc)
            failure = f"channel layer: {type(exc).__name__}: {exc}"
            if message.get("assigns"):
                undelivered.append(tuple(message["assigns"]))
            else:  # a cancel or status nudge: at-most-once by design, sweeps recover
                logger.info("could not notify %s (%s): %s", channel_name, message.get("type"), exc)
        else:
            layer_health.recovered()
    if undelivered:
        from nodes import task_services

        try:
            await database_sync_to_async(task_services.task_return_undelivered)(undelivered, failure)
        except Exception:
            # The attempts' own time-outs put them back instead.
            logger.warning("could not queue %d undelivered task(s) again", len(undelivered), exc_info=True)


runtime = HubRuntime()
