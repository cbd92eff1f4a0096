"""The staff event stream: ``AdminEventsConsumer`` (``/ws/admin/events/``, PROTOCOL §5)
pushes hub events to staff, authenticated by session cookie or ``?token=``."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.http.request import split_domain_port, validate_host

from apexbridge.db.hops import database_sync_to_async
from nodes.consumers import NoDatabaseHopPerMessageMixin
from nodes.events import ADMIN_EVENTS_GROUP, unbundle
from nodes.service_health import ResilientChannelReceiveMixin, layer_health


class AdminEventsConsumer(
    NoDatabaseHopPerMessageMixin, ResilientChannelReceiveMixin, AsyncJsonWebsocketConsumer
):
    """Pushes hub events to staff (session cookie or ``?token=``)."""

    async def connect(self) -> None:
        if not self._origin_allowed() or not await self._is_staff():
            await self.close()  # before accept: HTTP 403
            return
        try:
            await self.channel_layer.group_add(ADMIN_EVENTS_GROUP, self.channel_name)
        except Exception as exc:
            layer_health.failed(exc)
            await self.close()  # no events can reach this socket: the dashboard retries
            return
        await self.accept()

    async def rejoin_channel_groups(self) -> None:
        # A restarted Redis has forgotten the group (it keeps nothing on disk).
        await self.channel_layer.group_add(ADMIN_EVENTS_GROUP, self.channel_name)

    def _origin_allowed(self) -> bool:
        for name, value in self.scope.get("headers", []):
            if name == b"origin":
                origin = value.decode("latin-1")
                host = origin.split("://", 1)[-1]
                domain, _port = split_domain_port(host)
                allowed = list(settings.ALLOWED_HOSTS) or ["localhost", "127.0.0.1", "[::1]"]
                trusted = {o.rstrip("/") for o in settings.CSRF_TRUSTED_ORIGINS}
                return validate_host(domain, allowed) or origin.rstrip("/") in trusted
        return True  # not a browser (scripts send no Origin): the token decides

    async def _is_staff(self) -> bool:
        user = self.scope.get("user")
        if user is not None and user.is_authenticated and user.is_active and user.is_staff:
            return True
        token = parse_qs(self.scope.get("query_string", b"").decode()).get("token", [None])[0]
        return bool(token) and await database_sync_to_async(_token_is_staff)(token)

    async def disconnect(self, code: int) -> None:
        try:
            await self.channel_layer.group_discard(ADMIN_EVENTS_GROUP, self.channel_name)
        except Exception as exc:  # the group entry expires by itself (group_expiry)
            layer_health.failed(exc)

    async def hub_event(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": event["event"], "data": event["data"]})

    async def hub_events(self, bundle: dict[str, Any]) -> None:
        """Events that left a hub process together (``events.MAX_EVENTS_PER_MESSAGE``):
        still one frame each, in order."""
        for event in unbundle(bundle):
            await self.hub_event(event)


def _token_is_staff(key: str) -> bool:
    from rest_framework.authtoken.models import Token

    token = Token.objects.select_related("user").filter(key=key).first()
    return bool(token and token.user.is_active and token.user.is_staff)
