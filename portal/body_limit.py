"""A bound on request bodies, enforced before Django reads them.

Django reads a whole request body into a spooled temporary file before it checks
`DATA_UPLOAD_MAX_MEMORY_SIZE`, so an endless body would fill the disk. This ASGI middleware refuses a
body announced (`Content-Length`) or streamed past `PORTAL_MAX_REQUEST_BYTES` with a 413 in the
route's error shape, without reading the rest.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]


class BodyTooLarge(Exception):
    """The body grew past the limit while the application read it."""


class RequestBodyLimit:
    """Wrap an ASGI HTTP application so no request body beyond `limit` bytes is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced = dict(scope.get("headers") or []).get(b"content-length", b"")
        if announced.isdigit() and int(announced) > self.limit:
            await self.refuse(scope, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if not started:
                await self.refuse(scope, send)

    async def refuse(self, scope: Scope, send: Send) -> None:
        from backends_app.api.errors import error_body, error_shape

        message = f"request body too large: at most {self.limit} bytes are accepted"
        shape = error_shape(str(scope.get("path", "")))
        if shape is None:
            body, content_type = message.encode(), b"text/plain; charset=utf-8"
        else:
            body = json.dumps(error_body(shape, 413, message, "payload_too_large")).encode()
            content_type = b"application/json"
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
