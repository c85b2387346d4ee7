"""ASGI entry point: HTTP through Django, websockets (live job progress) through Channels."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_asgi_app = get_asgi_application()

# Imported after Django is set up: they load models.
from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from backends_app import live  # noqa: E402
from backends_app.models import PortalSettings  # noqa: E402
from portal.body_limit import RequestBodyLimit  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": RequestBodyLimit(django_asgi_app, settings.PORTAL_MAX_REQUEST_BYTES),
        # The Origin must be one of ALLOWED_HOSTS, and the session must belong to a signed-in user.
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(live.websocket_urlpatterns))),
    }
)

# LocalAI's runtime_settings.json: read now, then watched while the server runs (docs/settings.md).
PortalSettings.watch_runtime_settings()
