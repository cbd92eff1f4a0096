"""Sockets that outlive a channel-layer (Redis) outage.

Channels reads a consumer's channel with ``channel_layer.receive``; when Redis goes
away that call raises, and the exception ends the consumer: daphne closes the socket
with 1011. The hub keeps its sockets instead: ``ResilientChannelReceiveMixin`` retries
the read with back-off while everything that does not need the layer goes on
(heartbeats, registrations, results, LLM calls). What the layer carries is paused
meanwhile: task notifications (tasks stay in the database and are assigned again by
their time-out), admin events and takeover closes of sockets on other processes.

Each process logs one warning when the layer fails and one line when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

RETRY_FIRST_S = 0.2
RETRY_MAX_S = 5.0


class LayerHealth:
    """Process-wide state of the channel layer, for one log line per outage."""

    def __init__(self) -> None:
        self.down_since: float | None = None

    @property
    def available(self) -> bool:
        return self.down_since is None

    def failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(
                "channel layer unavailable (%s: %s): sockets stay open; task notifications, "
                "admin events and takeovers across processes wait until it is back",
                type(exc).__name__,
                exc,
            )

    def recovered(self) -> None:
        if self.down_since is not None:
            logger.warning("channel layer available again after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None


layer_health = LayerHealth()


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
                return await self._raw_channel_receive()
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
