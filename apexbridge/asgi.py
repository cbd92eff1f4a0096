"""ASGI entry point: HTTP through Django, WebSockets through Channels (see routing.py).

Daphne has no ASGI lifespan, so the per-process background loops (heartbeat sweep,
task time-outs, queue dispatch, start-up recovery) start with the first request or
connection this process serves.
"""

import os

import django
from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apexbridge.settings")
django.setup(set_prefix=False)


class OneHopASGIHandler(ASGIHandler):
    """Django's ASGI handler, running a request's middleware and view in one thread
    hop, as under WSGI.

    The hub's views are all sync. Django's own handler builds an async middleware
    chain and runs each sync middleware method (``process_request``,
    ``process_view``, ``process_response``) in a thread hop of its own: about 14
    hops per API request, where the whole request needs one. An async view would
    still work (Django adapts it), through one more hop."""

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def get_response_async(self, request):
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)


django_asgi_app = OneHopASGIHandler()

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
