"""ASGI entry point: HTTP through Django, WebSockets through Channels (see routing.py).

Daphne has no ASGI lifespan, so the per-process background loops (heartbeat sweep,
task time-outs, queue dispatch, start-up recovery) start with the first request or
connection this process serves.
"""

import os

import django
from asgiref.sync import sync_to_async
from django.apps import apps
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import close_old_connections, connections
from django.http import FileResponse
from django.urls import set_script_prefix

from apexbridge.threads import ElasticThreadPool

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apexbridge.settings")
if not apps.ready:  # set up already (tests, a management command): not again, which
    django.setup(set_prefix=False)  # would configure logging anew mid-run

# A thread that ends closes its database connections (kept ones, with
# APEXBRIDGE_DB_CONN_MAX_AGE): left to the garbage collector they stay open for long.
REQUEST_THREADS = ElasticThreadPool("apexbridge-http", on_exit=connections.close_all)


class OneHopASGIHandler(ASGIHandler):
    """Django's ASGI handler, running each request in one hop to a pooled thread, as a
    threaded WSGI server does.

    The hub's views are all sync. Django's own handler builds an async middleware
    chain and runs each sync middleware method (``process_request``,
    ``process_view``, ``process_response``) in a thread hop of its own, plus a hop
    for ``request_started`` and one for ``response.close()`` (``request_finished``),
    all in a thread started for that request: about 16 hops and a thread per API
    request. Here the signals, the middleware and the view run in one hop, in a
    thread of ``REQUEST_THREADS``: an idle one is reused, a new one started while
    all are busy (a ``?wait`` request holds its thread while it waits). Database
    connections therefore open and close in the thread that uses them
    (``request_started``/``request_finished`` close them, as under WSGI). A
    streaming response (a static file) is sent and closed as Django does, in the
    request's own thread context; the connections its view opened are closed when
    the view returns. An async view would still work (Django adapts it), through
    one more hop."""

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            response = await sync_to_async(self._respond, thread_sensitive=False, executor=REQUEST_THREADS)(
                scope, body_file
            )
            try:
                await self.send_response(response, send)
            finally:
                if response.streaming:  # closed after its body was sent, as Django does
                    await sync_to_async(response.close)()
        finally:
            body_file.close()

    def _respond(self, scope, body_file):
        """The whole sync side of a request, in one thread: what Django's handler
        spreads over its hops, in the same order."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self.get_response(request)
            response._handler_class = self.__class__
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
        if response.streaming:  # its body is read, and it is closed, in other hops
            close_old_connections()  # what the middleware and the view opened here (or checked)
        else:  # its body is in memory: finish the request here
            response.close()
        return response


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
