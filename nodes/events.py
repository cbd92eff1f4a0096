"""Hub events (PROTOCOL §5): published to the channel-layer group ``admin_events``.

Services publish with ``publish()``, which waits for the surrounding transaction to
commit, so a listener never hears about a change that was rolled back. Async code
outside a transaction (the LLM proxy) uses ``apublish()``. The channel layer is
at-most-once: events are notifications for dashboards, never the truth.
"""

from __future__ import annotations

import logging
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


def _send_now(message: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(ADMIN_EVENTS_GROUP, message)
    except Exception as exc:  # a lost event must never break the change that caused it
        layer_health.failed(exc)
        logger.info("could not publish event %s: %s", message.get("event"), exc)
    else:
        layer_health.recovered()


def publish(event_type: str, data: dict[str, Any]) -> None:
    """Publish after the current transaction commits (at once outside one)."""
    message = _layer_message(event_type, data)
    if event_type in NOT_SENT_TO_ADMIN:
        return
    transaction.on_commit(lambda: _send_now(message))


async def apublish(event_type: str, data: dict[str, Any]) -> None:
    """Publish from async code that holds no transaction."""
    message = _layer_message(event_type, data)
    if event_type in NOT_SENT_TO_ADMIN:
        return
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(ADMIN_EVENTS_GROUP, message)
    except Exception as exc:
        layer_health.failed(exc)
        logger.info("could not publish event %s: %s", event_type, exc)
    else:
        layer_health.recovered()
