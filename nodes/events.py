"""Hub events (PROTOCOL §5): published to the channel-layer group ``admin_events``.

Services publish with ``publish()``, which waits for the surrounding transaction to
commit, so a listener never hears about a change that was rolled back. Async code
outside a transaction (the LLM proxy) uses ``apublish()``. The channel layer is
at-most-once: events are notifications for dashboards, never the truth.

In a hub process (its event loop running) events are handed to one sender task on
that loop and sent in the order they were published: the thread that published
does not wait for the channel layer (the database thread, which every node and
task message needs, used to wait for the loop once per event); events that queued
up meanwhile leave together in one ``hub.events`` layer message, which the admin
consumer still sends as one frame per event. Elsewhere (a
``manage.py`` command, tests without the background loops) they are sent at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from nodes.protocol import now_ms
from nodes.service_health import layer_health

logger = logging.getLogger(__name__)

ADMIN_EVENTS_GROUP = "admin_events"

EVENT_TYPES = frozenset(
    {
        "node_registered",
        "node_unregistered",
        "node_status_changed",
        "task_queued",
        "task_assigned",
        "task_succeeded",
        "task_failed",
        "task_timed_out",
        "task_retried",
        "task_cancelled",
        "llm_proxy_request",
        "llm_proxy_completed",
        "llm_proxy_failed",
        "llm_proxy_rate_limited",
        "llm_proxy_stream_completed",
        "llm_proxy_stream_chunk",
    }
)
# Too chatty for the admin group (PROTOCOL §5).
NOT_SENT_TO_ADMIN = frozenset({"llm_proxy_stream_chunk"})


def _layer_message(event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    payload = dict(data)
    payload.setdefault("timestamp", now_ms())
    return {"type": "hub.event", "event": event_type, "data": payload}


# Events waiting for the sender task; beyond this many (a channel layer that hangs)
# the oldest are dropped, with a warning: events are notifications, not the truth.
MAX_PENDING = 10_000
_pending: deque[dict[str, Any]] = deque()
_sender: asyncio.Task | None = None
_dropped = 0


# Events that queued up while the sender was busy leave in one layer message of
# up to this many (a registration storm publishes two per node; on Redis each
# group_send is several round trips on the event loop).
MAX_EVENTS_PER_MESSAGE = 100


def unbundle(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``hub.event`` messages in a layer message (one, or a ``hub.events`` bundle)."""
    if message.get("type") == "hub.events":
        return [{"type": "hub.event", **event} for event in message["events"]]
    return [message]


def _bundle(messages: list[dict[str, Any]]) -> dict[str, Any]:
    if len(messages) == 1:
        return messages[0]
    return {"type": "hub.events", "events": [{"event": m["event"], "data": m["data"]} for m in messages]}


async def _group_send(message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(ADMIN_EVENTS_GROUP, message)
    except Exception as exc:  # a lost event must never break the change that caused it
        layer_health.failed(exc)
        lost = ", ".join(m["event"] for m in unbundle(message))
        logger.info("could not publish event(s) %s: %s", lost, exc)
    else:
        layer_health.recovered()


def _send_now(message: dict[str, Any]) -> None:
    """Send from sync code and wait for it (no hub event loop in this process)."""
    async_to_sync(_group_send)(message)


def _enqueue(message: dict[str, Any]) -> None:
    """On the hub's event loop: queue for the sender task, starting it if idle."""
    global _sender, _dropped
    if len(_pending) >= MAX_PENDING:
        _pending.popleft()
        _dropped += 1
        if _dropped == 1 or _dropped % 1000 == 0:
            logger.warning("channel layer too slow for hub events: %d event(s) dropped so far", _dropped)
    _pending.append(message)
    loop = asyncio.get_running_loop()
    if _sender is None or _sender.done() or _sender.get_loop() is not loop:
        _sender = loop.create_task(_send_pending())


async def _send_pending() -> None:
    while _pending:
        count = min(len(_pending), MAX_EVENTS_PER_MESSAGE)
        await _group_send(_bundle([_pending.popleft() for _ in range(count)]))


def _hub_loop() -> asyncio.AbstractEventLoop | None:
    from nodes.runtime import runtime

    return runtime.running_loop()


def _deliver(message: dict[str, Any]) -> None:
    loop = _hub_loop()
    if loop is None:
        _send_now(message)
        return
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        _enqueue(message)
        return
    try:
        loop.call_soon_threadsafe(_enqueue, message)
    except RuntimeError:  # the loop closed meanwhile: the process is stopping
        logger.info("event %s not published: the hub's event loop has stopped", message.get("event"))


def publish(event_type: str, data: dict[str, Any]) -> None:
    """Publish after the current transaction commits (at once outside one)."""
    message = _layer_message(event_type, data)
    if event_type in NOT_SENT_TO_ADMIN:
        return
    transaction.on_commit(lambda: _deliver(message))


async def apublish(event_type: str, data: dict[str, Any]) -> None:
    """Publish from async code that holds no transaction."""
    message = _layer_message(event_type, data)
    if event_type in NOT_SENT_TO_ADMIN:
        return
    if _hub_loop() is asyncio.get_running_loop():
        _enqueue(message)  # in order with the events of the database thread
    else:
        await _group_send(message)
