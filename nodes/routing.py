"""WebSocket URL patterns of the nodes app (PROTOCOL §1 and §5)."""

from django.urls import re_path

from nodes.admin_consumers import AdminEventsConsumer
from nodes.consumers import NodeConsumer

NODE_PATH = (
    r"^/?(?P<prefix>abp-distributed-server|distributed-server|vcp-distributed-server)"
    r"(?:/(?:VCP_Key|ABP_Key)=(?P<key>[^/]*))?/?$"
)

node_websocket_urlpatterns = [re_path(NODE_PATH, NodeConsumer.as_asgi())]
admin_websocket_urlpatterns = [re_path(r"^/?ws/admin/events/?$", AdminEventsConsumer.as_asgi())]
