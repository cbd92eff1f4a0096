"""Fixtures for the node client tests: a fake hub and nodes running against it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nodes.client import Node
from tests.client.fake_hub import KEY, FakeHub


@pytest.fixture
async def hub():
    server = await FakeHub().start()
    yield server
    await server.stop()


@pytest.fixture
async def make_node(tmp_path):
    """make_node(hub, **options) -> a Node already running (``node.task``); every node is
    stopped and awaited after the test."""
    started: list[Node] = []

    def make(hub: FakeHub, name: str = "test-node", start: bool = True, **options) -> Node:
        options.setdefault("key", KEY)
        options.setdefault("backoff_initial", 0.05)
        options.setdefault("backoff_max", 0.4)
        options.setdefault("shutdown_grace", 5)
        options.setdefault("state_file", tmp_path / f"{name}.json")
        node = Node(name, hub=hub.url, **options)
        node.task = None
        if start:
            node.task = asyncio.create_task(node.run())
        started.append(node)
        return node

    yield make
    for node in started:
        if node.task is None or node.task.done():
            continue
        node.request_stop()
        node.request_stop()  # a second request skips the grace period
        try:
            await asyncio.wait_for(asyncio.shield(node.task), 10)
        except TimeoutError:
            node.task.cancel()
        with contextlib.suppress(BaseException):
            await node.task
