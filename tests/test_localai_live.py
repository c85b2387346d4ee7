"""LocalAI's routes over HTTP against a running portal: daphne serving it, a worker running the jobs,
images in a real registry. What a LocalAI client or LocalAI's web UI does, route by route: install,
follow the job, check, upgrade, watch the operations list, uninstall, install from an external image.

The worker starts after the first install is queued, so the operations list is seen holding a queued
operation, and then seen empty once it ran: the moment LocalAI's UI refreshes its lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from rest_framework.authtoken.models import Token

from tests.helpers.api import make_user
from tests.helpers.portal import PortalProcesses
from tests.helpers.processes import wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.single_pass, pytest.mark.registry]


@pytest.fixture
def portal(tmp_path: Path) -> Iterator[PortalProcesses]:
    running = PortalProcesses(tmp_path / "portal", REDIS_URL="")
    try:
        running.start_web()
        yield running
    except BaseException:
        print(running.log_tail())
        raise
    finally:
        running.stop()


class LocalAIClient:
    """What a LocalAI client sends: the portal token as its API key, JSON both ways."""

    def __init__(self, base: str, key: str) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    def get(self, path: str) -> Any:
        response = self.session.get(self.base + path, timeout=30)
        assert response.status_code == 200, (path, response.status_code, response.text)
        assert response.headers["Content-Type"] == "application/json", path
        return response.json()

    def post(self, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        response = self.session.post(self.base + path, data=json.dumps(body or {}), timeout=60)
        assert response.headers["Content-Type"] == "application/json", path
        return response

    def ui_job_done(self, job_id: str) -> dict[str, Any]:
        """Poll the UI's job route as LocalAI's UI does, until the operation ended."""
        return wait_until(
            lambda: (state := self.get(f"/api/backends/job/{job_id}"))["processed"] and state,
            f"operation {job_id} to end",
        )

    def rest_job_done(self, status_url: str) -> dict[str, Any]:
        path = status_url.removeprefix(self.base)
        return wait_until(lambda: (state := self.get(path))["processed"] and state, f"{status_url} to end")


def test_a_localai_client_installs_upgrades_and_uninstalls_through_the_running_portal(
    portal: PortalProcesses, published: Any, settings: Any
) -> None:
    backends = Path(settings.PORTAL_BACKENDS_PATH)
    key = Token.objects.create(user=make_user("localai", superuser=True)).key
    client = LocalAIClient(portal.url, key)

    # Without the key: LocalAI's 401.
    anonymous = requests.post(f"{portal.url}/api/backends/install/cpu-demo", json={}, timeout=30)
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert anonymous.json()["error"]["message"] == "An authentication key is required"

    # The catalog: cpu-demo, not installed.
    catalog = client.get("/api/backends?page=1&items=9999&sort=name&order=asc")
    assert [(b["id"], b["installed"]) for b in catalog["backends"]] == [("test@cpu-demo", False)]
    assert client.get("/backends") == []

    # Install, as the UI's button does; no worker yet: the operation waits in the list.
    started = client.post("/api/backends/install/cpu-demo")
    assert started.status_code == 200 and started.json()["message"] == "Backend installation started"
    install_id = started.json()["jobID"]
    (waiting,) = client.get("/api/operations")["operations"]
    assert (waiting["jobID"], waiting["name"], waiting["isQueued"]) == (install_id, "cpu-demo", True)
    assert client.get(f"/api/backends/job/{install_id}")["message"] == "queued"

    portal.start_worker()
    state = client.ui_job_done(install_id)
    assert state.get("completed") is True, (state, portal.log_tail())
    assert client.get("/api/operations") == {"operations": []}  # it left the list: the UI refreshes
    assert (backends / "cpu-demo" / "lib" / "version.txt").read_text() == "v1"
    listing = {row["Name"]: row for row in client.get("/backends")}
    assert set(listing) == {"cpu-demo", "demo"}  # the backend and its alias, as LocalAI lists them
    assert listing["cpu-demo"]["Metadata"]["digest"] == published.first_digest
    assert listing["cpu-demo"]["RunFile"] == str(backends / "cpu-demo" / "run.sh")

    # A new build on the tag; the check, asked as a LocalAI client asks it.
    new_digest = published.push("v2")
    checked = client.post("/backends/upgrades/check")
    assert checked.status_code == 200
    client.rest_job_done(checked.headers["Location"])
    upgrades = client.get("/api/backends/upgrades")
    assert upgrades["cpu-demo"]["available_digest"] == new_digest
    assert upgrades["cpu-demo"]["installed_digest"] == published.first_digest

    # Upgrade, followed at the status URL the route gives.
    upgrade = client.post("/api/backends/upgrade/cpu-demo").json()
    assert (
        upgrade["jobID"] == upgrade["uuid"] and upgrade["statusUrl"] == f"/api/backends/job/{upgrade['uuid']}"
    )
    assert client.ui_job_done(upgrade["uuid"]).get("completed") is True, portal.log_tail()
    assert (backends / "cpu-demo" / "lib" / "version.txt").read_text() == "v2"
    assert client.get("/backends/upgrades") == {}
    history = client.get("/api/operations/history")["operations"]
    assert [(r["jobID"], r["outcome"]) for r in history] == [
        (upgrade["uuid"], "completed"),
        (install_id, "completed"),
    ]

    # Uninstall through the REST family, followed as LocalAI's OpStatus.
    deleted = client.post("/backends/delete/cpu-demo").json()
    assert deleted["status_url"] == f"{portal.url}/backends/jobs/{deleted['id']}"
    status = client.rest_job_done(deleted["status_url"])
    assert status["deletion"] is True and status["message"] == "completed" and "error" not in status
    assert not (backends / "cpu-demo").exists()
    assert client.get("/backends") == []

    # An external image, then the Installed view's delete, which answers when it is done.
    source = f"oci://{published.ref}"
    external = client.post("/api/backends/install-external", {"uri": source, "name": "ext-demo"})
    assert external.status_code == 200, external.text
    assert client.ui_job_done(external.json()["jobID"]).get("completed") is True, portal.log_tail()
    assert (backends / "ext-demo" / "run.sh").is_file()
    assert json.loads((backends / "ext-demo" / "metadata.json").read_text())["uri"] == source
    removed = client.post("/api/backends/system/delete/ext-demo")
    assert removed.status_code == 200 and removed.json()["success"] is True, removed.text
    assert not (backends / "ext-demo").exists()
