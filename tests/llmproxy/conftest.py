"""Fixtures of the LLM proxy tests: the loopback upstream and the hub's LLM settings."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.llm_server import LoopbackLLMServer


@pytest.fixture(scope="session")
def llm_server():
    server = LoopbackLLMServer().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def llm_settings(settings, llm_server):
    """The hub talks to the loopback server; every test gets its own Redis key space."""
    llm_server.reset()
    settings.APEXBRIDGE_LLM_MODEL = "openai/test-model"
    settings.APEXBRIDGE_LLM_MODELS = []
    settings.APEXBRIDGE_LLM_API_BASE = llm_server.api_base
    settings.APEXBRIDGE_LLM_API_KEY = "sk-test"
    settings.APEXBRIDGE_LLM_TIMEOUT_MS = 10_000
    settings.APEXBRIDGE_LLM_MAX_RETRIES = 0
    settings.APEXBRIDGE_QUOTA_REDIS_PREFIX = f"test:{uuid.uuid4().hex}:"
    return settings


@pytest.fixture
def marker():
    """Unique message contents, so the loopback server's records can be told apart."""

    def make(label: str = "m") -> str:
        return f"{label}-{uuid.uuid4().hex[:12]}"

    return make


async def eventually(predicate, timeout_s: float = 5.0) -> bool:
    """Poll ``predicate`` (sync) until it holds or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


class EventListener:
    """Listens to the ``admin_events`` group as the dashboard does."""

    def __init__(self, layer, channel: str) -> None:
        self.layer = layer
        self.channel = channel
        self.seen: list[dict] = []

    async def next_of(self, event_type: str, timeout_s: float = 3.0) -> dict:
        for event in self.seen:
            if event["event"] == event_type:
                self.seen.remove(event)
                return event["data"]
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event_type} event; saw {[e['event'] for e in self.seen]}")
            message = await asyncio.wait_for(self.layer.receive(self.channel), remaining)
            if message["event"] == event_type:
                return message["data"]
            self.seen.append(message)


@pytest.fixture
async def admin_events():
    from channels.layers import get_channel_layer

    from nodes.events import ADMIN_EVENTS_GROUP

    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(ADMIN_EVENTS_GROUP, channel)
    yield EventListener(layer, channel)
    await layer.group_discard(ADMIN_EVENTS_GROUP, channel)
