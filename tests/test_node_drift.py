"""LocalAI's `node_drift` in the upgrades map (core/gallery/upgrade.go summarizeNodeDrift): the nodes
whose build differs from the majority's, and the majority's version and digest as the installed one."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.utils import timezone

from backends_app.models import Backend, Node
from tests.helpers.api import (
    OPERATE,
    client_for,
    flag_upgrade,
    install,
    make_backend,
    make_gallery,
    make_user,
)

pytestmark = pytest.mark.django_db

OLD, NEW = "sha256:" + "a" * 64, "sha256:" + "c" * 64


def node(name: str, *, offline: bool = False) -> Node:
    beat = timezone.now() - (dt.timedelta(hours=1) if offline else dt.timedelta(seconds=1))
    return Node.objects.create(name=name, backends_path=f"/srv/{name}/backends", last_heartbeat_at=beat)


@pytest.fixture
def api() -> Any:
    return client_for(make_user("localai-client", perms=(OPERATE,)), keyword="Bearer")


def test_nodes_that_differ_from_the_majority_are_listed_even_when_none_is_behind(api: Any) -> None:
    backend = make_backend(make_gallery("main"), "cpu-whisper", version="1.0")
    a, b, c = node("node-a"), node("node-b"), node("node-c")
    install(backend, a, version="1.0", digest=OLD)
    install(backend, b, version="0.9", digest=NEW)
    install(backend, c, version="1.0", digest=OLD)

    response = api.get("/backends/upgrades")

    assert response.status_code == 200
    assert response.json() == {
        "cpu-whisper": {
            "backend_name": "cpu-whisper",
            "installed_version": "1.0",
            "available_version": "",
            "installed_digest": OLD,
            "node_drift": [{"node_id": str(b.pk), "node_name": "node-b", "version": "0.9", "digest": NEW}],
        }
    }
    assert (
        Backend.objects.get(name="cpu-whisper").node_drift() == response.json()["cpu-whisper"]["node_drift"]
    )


def test_a_flagged_backend_carries_its_drift_and_an_offline_node_does_not_count(api: Any) -> None:
    backend = flag_upgrade(make_backend(make_gallery("main"), "cpu-llama"), version="2.0")
    a, b, gone = node("node-a"), node("node-b"), node("node-z", offline=True)
    install(backend, a, version="1.0", digest=OLD)
    install(backend, b, version="1.0", digest="")  # a node that could not tell its digest
    install(backend, gone, version="0.1", digest=NEW)

    info = api.get("/backends/upgrades").json()["cpu-llama"]

    # A tie: the first pair to reach the highest count (node order) is the majority.
    assert info["installed_version"] == "1.0" and info["installed_digest"] == OLD
    assert info["available_version"] == "2.0"
    assert info["node_drift"] == [{"node_id": str(b.pk), "node_name": "node-b", "version": "1.0"}]
    assert list(info) == [
        "backend_name",
        "installed_version",
        "available_version",
        "installed_digest",
        "available_digest",
        "node_drift",
    ]


def test_one_node_or_nodes_that_agree_have_no_drift(api: Any) -> None:
    gallery = make_gallery("main")
    single = flag_upgrade(make_backend(gallery, "single"), version="2.0")
    install(single)
    agreed = make_backend(gallery, "agreed")
    install(agreed, node("node-a"))
    install(agreed, node("node-b"))
    pinned = make_backend(gallery, "pinned", pinned=True)
    install(pinned, Node.objects.get(name="node-a"), digest=OLD)
    install(pinned, Node.objects.get(name="node-b"), digest=NEW)

    body = api.get("/backends/upgrades").json()

    assert set(body) == {"single"} and "node_drift" not in body["single"]
    assert agreed.node_drift() == [] and single.node_drift() == []
