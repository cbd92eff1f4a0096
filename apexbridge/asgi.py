"""ASGI entry point: HTTP through Django, WebSockets through Channels (see routing.py)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apexbridge.settings")
django_asgi_app = get_asgi_application()

from apexbridge.routing import websocket_application  # noqa: E402  (needs apps loaded)
from channels.routing import ProtocolTypeRouter  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})
