"""The embedded default's in-memory channel layer (apexbridge/layers.py): Channels'
layer, with its expiry sweep run at most once per interval instead of on every
receive() and group_send() (each sweep walks every connected node's channel)."""

from __future__ import annotations

import asyncio

from channels import layers as upstream

from apexbridge.layers import InMemoryChannelLayer


def test_the_expiry_sweep_runs_at_most_once_per_interval(monkeypatch):
    sweeps = []
    monkeypatch.setattr(upstream.InMemoryChannelLayer, "_clean_expired", lambda self: sweeps.append(1))
    layer = InMemoryChannelLayer()
    layer.clean_interval_s = 3600
    for _ in range(100):
        layer._clean_expired()
    assert len(sweeps) == 1


def test_expired_messages_are_still_dropped():
    async def scenario():
        layer = InMemoryChannelLayer(expiry=0)
        layer.clean_interval_s = 0
        await layer.send("gone!1", {"type": "x"})
        await layer.group_add("g", "gone!1")
        await asyncio.sleep(0.01)
        await layer.group_send("g", {"type": "y"})  # sweeps first: the channel has expired
        return layer

    layer = asyncio.run(scenario())
    assert "gone!1" not in layer.groups.get("g", {})


def test_channel_names_do_not_repeat_when_random_is_reseeded():
    import random

    async def names():
        layer = InMemoryChannelLayer()
        found = []
        for _ in range(3):
            random.seed(1234)  # as hypothesis does before each example
            found.append(await layer.new_channel())
        return found

    first, second, third = asyncio.run(names())
    assert len({first, second, third}) == 3
