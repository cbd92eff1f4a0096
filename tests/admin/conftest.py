"""Fixtures of the Django admin tests: a logged-in superuser client and a channel to watch
(``make_node`` is shared, in tests/conftest.py)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model


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
