"""One function decides a backend's status; the API and the command line say what it says."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from backends_app.models import Backend, BackendState, InstalledVersion, Node

pytestmark = pytest.mark.django_db


@pytest.fixture
def backend(gallery_factory: Any) -> Backend:
    gallery_factory([{"name": "cpu-demo", "uri": "quay.io/demo/backend:latest", "version": "1.1.0"}])
    return Backend.objects.get(name="cpu-demo")


def installed(backend: Backend, **fields: Any) -> Backend:
    node = Node.local()
    InstalledVersion.objects.create(
        node=node, backend=backend, name=backend.name, version="1.0.0", digest="sha256:" + "a" * 64, path="/x"
    )
    Backend.objects.filter(pk=backend.pk).update(**fields)
    return Backend.objects.with_installations().get(pk=backend.pk)


CASES = [
    ("not installed", None, BackendState.NOT_INSTALLED, ""),
    ("installed, never checked", {}, BackendState.NOT_CHECKED, ""),
    ("checked, nothing newer", {"last_checked_at": timezone.now()}, BackendState.UP_TO_DATE, ""),
    (
        "checked, upgrade found",
        {
            "last_checked_at": timezone.now(),
            "upgrade_available": True,
            "upgrade_reason": "version 1.0.0 -> 1.1.0",
        },
        BackendState.UPGRADE_AVAILABLE,
        "version 1.0.0 -> 1.1.0",
    ),
    (
        "pinned with an upgrade found",
        {
            "last_checked_at": timezone.now(),
            "pinned": True,
            "upgrade_reason": "pinned: version 1.0.0 -> 1.1.0",
        },
        BackendState.PINNED,
        "version 1.0.0 -> 1.1.0",
    ),
    (
        "rolled back and pinned, 1.1.0 offered and held",
        {
            "last_checked_at": timezone.now(),
            "pinned": True,
            "held_version": "1.1.0",
            "held_reason": "rolled back by job 7",
            "upgrade_reason": "held: 1.1.0 (rolled back by job 7)",
        },
        BackendState.HELD,
        "1.1.0: rolled back by job 7",
    ),
    (
        "the last check failed",
        {"last_checked_at": timezone.now(), "last_error": "quay.io unreachable after 4 attempts"},
        BackendState.ERROR,
        "quay.io unreachable",
    ),
]


@pytest.mark.parametrize(("title", "fields", "state", "detail"), CASES, ids=[case[0] for case in CASES])
def test_each_state_is_decided_once_and_said_the_same_everywhere(
    backend: Backend, title: str, fields: dict[str, Any] | None, state: str, detail: str, admin_client: Any
) -> None:
    subject = (
        Backend.objects.with_installations().get(pk=backend.pk)
        if fields is None
        else installed(backend, **fields)
    )

    status = subject.status
    assert status.state == state, title
    assert detail in status.detail

    api = admin_client.get(f"/api/v1/backends/{subject.name}/").json()["status"]
    assert api == {"state": state, "label": BackendState(state).label, "detail": status.detail}

    if fields is not None:  # the command lists installed backends
        out = io.StringIO()
        call_command("backends", "list", "--json", stdout=out)
        row = next(r for r in json.loads(out.getvalue()) if r["name"] == subject.name)
        assert (row["status"], row["status_detail"]) == (state, status.detail)
