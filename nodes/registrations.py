"""Registrations coalesced into shared transactions (the storm after a hub restart).

When a hub restarts every node reconnects and registers at once. One database hop
per ``node_register`` cost five ORM queries and a transaction each on the process's
single database thread. Here a registration that arrives while a batch is being
written waits for the next one, and a batch is written by one
``services.node_register_many`` call: an idle hub adds no delay, a storm costs a
few queries per batch. A node is answered once its batch has committed, as before.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from channels.db import database_sync_to_async

from nodes import services
from nodes.protocol import ProtocolError
from nodes.service_health import is_database_outage

logger = logging.getLogger(__name__)

Outcome = services.RegistrationResult | ProtocolError | Exception

# Registrations per batch: large enough to amortise the batch's queries, small
# enough that other database work (a task result, a heartbeat flush) waits at most
# a few tens of milliseconds behind one batch.
MAX_BATCH = 100


class RegistrationBatcher:
    """Per process, on its event loop: ``await register(registration)``."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[tuple[services.NodeRegistration, asyncio.Future]] = deque()
        self._writer: asyncio.Task | None = None

    async def register(self, registration: services.NodeRegistration) -> services.RegistrationResult:
        """Register in the next batch; raises the ``ProtocolError`` that refused it,
        or the error that failed it (a database outage)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests)
            self._loop, self._pending, self._writer = loop, deque(), None
        future = loop.create_future()
        self._pending.append((registration, future))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_batches())
        return await future

    async def _write_batches(self) -> None:
        while self._pending:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                outcomes = await self._write([registration for registration, _ in batch])
            except BaseException as exc:  # cancelled with the loop: nobody waits in vain
                for _, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue  # its connection went away meanwhile
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _take_batch(self) -> list[tuple[services.NodeRegistration, asyncio.Future]]:
        """Up to ``max_batch`` registrations of distinct node ids, oldest first; a
        second registration of one node id waits for the next batch (it takes over the
        first). A registration whose connection went away before its batch is dropped
        unwritten."""
        batch: list[tuple[services.NodeRegistration, asyncio.Future]] = []
        repeats: list[tuple[services.NodeRegistration, asyncio.Future]] = []
        node_ids: set[str] = set()
        while self._pending and len(batch) < self.max_batch:
            registration, future = item = self._pending.popleft()
            if future.cancelled():
                continue
            if registration.node_id in node_ids:
                repeats.append(item)
            else:
                node_ids.add(registration.node_id)
                batch.append(item)
        self._pending.extendleft(reversed(repeats))  # still first in line, in order
        return batch

    async def _write(self, registrations: list[services.NodeRegistration]) -> list[Outcome]:
        try:
            return await database_sync_to_async(services.node_register_many)(registrations=registrations)
        except Exception as exc:
            if len(registrations) == 1 or is_database_outage(exc):
                return [exc] * len(registrations)
            # One bad registration (a row another process inserted meanwhile) must not
            # fail the others: write them one by one.
            logger.warning(
                "a batch of %d registrations failed (%s: %s); writing them one by one",
                len(registrations),
                type(exc).__name__,
                exc,
            )
            return [(await self._write([registration]))[0] for registration in registrations]


registrations = RegistrationBatcher()
