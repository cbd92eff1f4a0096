"""The in-memory channel layer of the embedded default (one process, no Redis).

Channels' ``InMemoryChannelLayer`` runs its expiry sweep (``_clean_expired``, a walk
over every channel and group member) on every ``receive()`` and ``group_send()``.
A hub has one channel per connected node, so each new connection and each admin
event cost O(nodes): a registration storm was O(N²) (py-spy of a 3,000-node storm:
~30 % of the process in that sweep; docs/BENCHMARKS.md). Here the sweep runs at
most once a second; messages expire up to a second later, which nothing notices
(the expiry is 60 s).

Channel names come from ``uuid4`` instead of the global ``random`` module. Code that
seeds ``random`` (hypothesis does, per example) made Channels hand out the same names
again, so a new connection received a message left for an old one (found by the
100,000-frame protocol fuzz: a fresh socket closed with 4000, "replaced").
"""

from __future__ import annotations

import time
import uuid

from channels import layers


class InMemoryChannelLayer(layers.InMemoryChannelLayer):
    clean_interval_s = 1.0
    _last_clean = float("-inf")

    async def new_channel(self, prefix: str = "specific.") -> str:
        return f"{prefix}.inmemory!{uuid.uuid4().hex}"

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._last_clean < self.clean_interval_s:
            return
        self._last_clean = now
        super()._clean_expired()
