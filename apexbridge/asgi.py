"""ASGI entry point: HTTP through Django, WebSockets through Channels (see routing.py).

Daphne has no ASGI lifespan, so the per-process background loops (heartbeat sweep,
task time-outs, queue dispatch, start-up recovery) start with the first request or
connection this process serves.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apexbridge.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402  (needs apps loaded)

from apexbridge.routing import websocket_application  # noqa: E402
from nodes.runtime import runtime  # noqa: E402


class StartBackgroundLoops:
    """Starts this process's background loops on its first request (idempotent)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            runtime.ensure_started()
        return await self.app(scope, receive, send)


application = StartBackgroundLoops(
    ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})
)
