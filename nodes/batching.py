"""Database work of many sockets coalesced into batches (the storm after a restart).

When a hub restarts every node reconnects and registers at once. One database hop
per handshake key check and per ``node_register`` (five ORM queries and a
transaction each) queued on the process's single database thread: 10,000 nodes
took ~50 s to register. A ``DatabaseBatcher`` hands its items to one function that
handles a whole batch in one hop; an item that arrives while a batch is being
handled waits for the next one, so an idle hub adds no delay and a storm costs a
few queries per batch. Each caller still gets its own outcome once its batch is
done (for a registration: committed).

- ``registrations``: ``registration_services.node_register_many``; a node id
  appears once per batch (a repeat waits for the next batch, so the later
  connection takes over).
- ``key_checks``: ``auth.authenticate_keys`` (per-node keys; the shared key needs
  no database and is checked on the event loop).
- ``task_results``: ``task_result_services.task_complete_many`` (results streaming
  in from many nodes); a task id appears once per batch (a repeat is then answered
  ``stale_result``, as it would be one after the other). A result is written even
  if its handler was cancelled while it waited.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from apexbridge.db.hops import database_sync_to_async
from nodes import auth, registration_services, task_result_services
from nodes.service_health import is_database_outage, is_lock_conflict

logger = logging.getLogger(__name__)

Item = TypeVar("Item")

# Items per batch: large enough to amortise a batch's queries, small enough that
# other database work (a task result, a heartbeat flush) waits at most a few tens of
# milliseconds behind one batch.
MAX_BATCH = 100


class DatabaseBatcher(Generic[Item]):
    """Per process, on its event loop: ``await submit(item)`` returns the item's
    outcome, or raises the exception that is its outcome.

    ``handle_many(items)`` runs on the database thread and returns one outcome per
    item, in order (an ``Exception`` outcome is raised to that item's caller). If it
    raises, a database outage is the outcome of every item of the batch; anything
    else (one bad item) makes each item be handled again on its own, so only the bad
    one fails. ``key(item)``, if given, may appear once per batch. An item whose
    caller went away before its batch is dropped, unless ``handle_abandoned`` (then
    it is handled and its outcome discarded).
    """

    def __init__(
        self,
        handle_many: Callable[[list[Item]], list[Any]],
        *,
        what: str,
        max_batch: int = MAX_BATCH,
        key: Callable[[Item], Hashable] | None = None,
        handle_abandoned: bool = False,
    ) -> None:
        self.handle_many = handle_many
        self.what = what
        self.max_batch = max_batch
        self.key = key
        self.handle_abandoned = handle_abandoned
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: deque[tuple[Item, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    async def submit(self, item: Item) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call, or a new event loop (tests)
            self._loop, self._pending, self._worker = loop, deque(), None
        future = loop.create_future()
        self._pending.append((item, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._handle_batches())
        return await future

    async def _handle_batches(self) -> None:
        while self._pending:
            batch = self._take_batch()
            if not batch:
                continue
            try:
                outcomes = await self._handle([item for item, _ in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"{self.what}: {len(outcomes)} outcomes for {len(batch)} items")
            except Exception as exc:  # a bug in handle_many: its callers hear it, not hang
                logger.exception("handling a batch of %d %s failed", len(batch), self.what)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:  # cancelled with the loop: nobody waits in vain
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue  # its socket went away meanwhile
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    def _take_batch(self) -> list[tuple[Item, asyncio.Future]]:
        """Up to ``max_batch`` items, oldest first, each key once (a repeat stays
        first in line for the next batch)."""
        batch: list[tuple[Item, asyncio.Future]] = []
        repeats: list[tuple[Item, asyncio.Future]] = []
        keys: set[Hashable] = set()
        while self._pending and len(batch) < self.max_batch:
            item, future = entry = self._pending.popleft()
            if future.cancelled() and not self.handle_abandoned:
                continue
            if self.key is None:
                batch.append(entry)
                continue
            key = self.key(item)
            if key in keys:
                repeats.append(entry)
            else:
                keys.add(key)
                batch.append(entry)
        self._pending.extendleft(reversed(repeats))
        return batch

    async def _handle(self, items: list[Item], *, conflicts: int = 0) -> list[Any]:
        try:
            return await database_sync_to_async(self.handle_many)(items)
        except Exception as exc:
            if is_lock_conflict(exc) and conflicts < 2:
                # A deadlock with another process's batch: the same items again
                # (PostgreSQL has already rolled the other side back or let it pass).
                logger.info(
                    "a batch of %d %s met a lock conflict (%s); trying again", len(items), self.what, exc
                )
                return await self._handle(items, conflicts=conflicts + 1)
            if len(items) == 1 or is_database_outage(exc):
                return [exc] * len(items)
            logger.warning(
                "a batch of %d %s failed (%s: %s); handling them one by one",
                len(items),
                self.what,
                type(exc).__name__,
                exc,
            )
            outcomes: list[Any] = []
            for item in items:
                if outcomes and is_database_outage(outcomes[-1]):
                    outcomes.append(outcomes[-1])  # the database went away meanwhile
                else:
                    outcomes.extend(await self._handle([item]))
            return outcomes


def _register_many(items: list[registration_services.NodeRegistration]) -> list[Any]:
    return registration_services.node_register_many(registrations=items)


def _complete_many(items: list[task_result_services.TaskResult]) -> list[Any]:
    return task_result_services.task_complete_many(results=items)


def _authenticate_many(items: list[str]) -> list[Any]:
    return auth.authenticate_keys(items)


registrations: DatabaseBatcher[registration_services.NodeRegistration] = DatabaseBatcher(
    _register_many, what="registrations", key=lambda registration: registration.node_id
)
key_checks: DatabaseBatcher[str] = DatabaseBatcher(_authenticate_many, what="key checks")
# A result is applied even if its socket's handler was cancelled while it waited
# (a hub shutting down): the node's work is done and must not be lost.
task_results: DatabaseBatcher[task_result_services.TaskResult] = DatabaseBatcher(
    _complete_many, what="task results", key=lambda result: result.task_id, handle_abandoned=True
)
