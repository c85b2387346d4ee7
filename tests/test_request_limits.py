"""Request bodies are bounded before they are read: an announced or streamed body past
PORTAL_MAX_REQUEST_BYTES is refused with a 413 in the route's error shape, and the rest is never read.

Driven through the real ASGI application (the one daphne serves), message by message.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings

from portal.asgi import application

CHUNK = 1024 * 1024


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def response(communicator: ApplicationCommunicator) -> tuple[int, bytes]:
    start = await communicator.receive_output(timeout=60)
    assert start["type"] == "http.response.start"
    body = b""
    while True:
        message = await communicator.receive_output(timeout=60)
        body += message.get("body", b"")
        if not message.get("more_body"):
            return start["status"], body


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/api/v1/upgrades/apply/", "detail"), ("/backends/apply", "error")],
)
def test_an_announced_oversized_body_is_refused_before_it_is_read(path: str, expected: str) -> None:
    announced = settings.PORTAL_MAX_REQUEST_BYTES + 1
    communicator = ApplicationCommunicator(
        application, scope(path, [(b"content-length", str(announced).encode())])
    )

    status, body = async_to_sync(response)(communicator)  # no body message was sent at all

    assert status == 413
    assert expected in json.loads(body)


def test_a_streamed_body_is_cut_at_the_limit_and_the_rest_is_never_read() -> None:
    communicator = ApplicationCommunicator(application, scope("/api/v1/upgrades/apply/", []))
    chunks = settings.PORTAL_MAX_REQUEST_BYTES // CHUNK + 5

    async def send_then_read() -> tuple[int, bytes]:
        for _ in range(chunks):
            await communicator.send_input({"type": "http.request", "body": b"x" * CHUNK, "more_body": True})
        return await response(communicator)

    status, body = async_to_sync(send_then_read)()

    assert status == 413
    assert "request body too large" in json.loads(body)["detail"]
    # The application stopped reading at the limit: the chunks after it are still waiting.
    assert communicator.input_queue.qsize() >= 3
