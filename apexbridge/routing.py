"""WebSocket routing: node connections (key auth, no cookies) and the staff events
socket (session cookie or API token)."""

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from django.urls import re_path

from nodes.routing import admin_websocket_urlpatterns, node_websocket_urlpatterns

websocket_application = URLRouter(
    [
        *node_websocket_urlpatterns,
        re_path(r"", AuthMiddlewareStack(URLRouter(admin_websocket_urlpatterns))),
    ]
)
