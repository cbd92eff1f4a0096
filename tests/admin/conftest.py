"""Fixtures of the Django admin tests: a logged-in superuser client and nodes."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.utils import timezone

from nodes.models import Node


@pytest.fixture
def admin_user(db):
    return get_user_model().objects.create_superuser("root", "root@example.com", "root-password-1")


@pytest.fixture
def client_admin(client, admin_user):
    client.force_login(admin_user)
    return client


@pytest.fixture
def channel() -> str:
    """A real channel on the configured layer, to see what a node connection would get."""
    return async_to_sync(get_channel_layer().new_channel)()


def received(channel: str) -> list[dict]:
    """Everything sent to ``channel`` so far (works on the in-memory and Redis layers)."""

    async def drain() -> list[dict]:
        layer = get_channel_layer()
        messages = []
        while True:
            try:
                messages.append(await asyncio.wait_for(layer.receive(channel), 0.3))
            except TimeoutError:
                return messages

    return async_to_sync(drain)()


@pytest.fixture
def make_node(db):
    def make(node_id: str, **fields) -> Node:
        now = timezone.now()
        defaults = {
            "name": node_id,
            "status": "online",
            "last_heartbeat": now,
            "connected_at": now,
            "connection_id": f"c-{node_id}",
            "channel_name": f"test.channel.{node_id}",
            "capabilities": ["echo"],
        }
        defaults.update(fields)
        return Node.objects.create(node_id=node_id, **defaults)

    return make
