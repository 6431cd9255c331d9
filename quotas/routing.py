"""WebSocket routes (config/asgi.py mounts `websocket_application`): the admin's live panel.

The session identifies the user (AuthMiddlewareStack); the Origin must be one of ALLOWED_HOSTS, so
another site cannot open the socket with an operator's cookies; the consumer admits staff only.
"""

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from .consumers import LiveConsumer

websocket_urlpatterns = [
    path("ws/admin/live/", LiveConsumer.as_asgi(), name="admin-live"),
]

websocket_application = AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))
