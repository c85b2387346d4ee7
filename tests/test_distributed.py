"""Distributed mode with real processes: PostgreSQL, Redis, a registry, two web replicas, three nodes.

Every node is a real `manage.py worker --node ...` process with its own backends directory and
capability; every web replica a real daphne process. Operations are asked of one replica's API and
watched through the other's, as operators behind a load balancer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token

from backends_app.models import Backend, InstalledVersion, JobKind, JobStatus, Node, UpgradeJob
from tests.conftest import REPO, missing_service, subprocess_env
from tests.helpers.processes import free_port, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres, pytest.mark.single_pass]

REDIS_URL = "redis://127.0.0.1:6379/7"
DEADLINE = 90.0


class Fleet:
    """The processes of one deployment, started and stopped by the test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.webs: list[tuple[subprocess.Popen[bytes], str]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return subprocess_env(REDIS_URL=REDIS_URL, PORTAL_LOG_LEVEL="WARNING", **extra)

    def backends(self, node: str) -> Path:
        return self.root / node / "backends"

    def start_worker(self, node: str, capability: str, **extra: str) -> None:
        command = [
            sys.executable,
            "manage.py",
            "worker",
            "--node",
            node,
            "--backends-path",
            str(self.backends(node)),
            "--capability",
            capability,
            "--workers",
            "1",
        ]
        log = (self.root / f"{node}.log").open("ab")
        self.workers[node] = subprocess.Popen(
            command, cwd=REPO, env=self.env(**extra), stdout=log, stderr=log, start_new_session=True
        )

    def stop_worker(self, node: str, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: the worker stops its cluster as an operator's Ctrl-C would. SIGKILL: the whole
        process group dies at once, as in a power cut."""
        process = self.workers.pop(node)
        if process.poll() is None:
            if sig == signal.SIGKILL:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)
        try:
            process.wait(timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # nothing of the node may outlive the test

    def start_web(self) -> str:
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "portal.asgi:application",
        ]
        log = (self.root / f"web-{port}.log").open("ab")
        process = subprocess.Popen(
            command, cwd=REPO, env=self.env(), stdout=log, stderr=log, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        self.webs.append((process, url))
        return url

    def stop(self) -> None:
        for node in list(self.workers):
            self.stop_worker(node)
        for process, _ in self.webs:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=90)
        # The test database is dropped after the session: wait for the fleet's connections to close.
        from django.db import connection

        def others() -> int:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
                return int(cursor.fetchone()[0])

        wait_until(lambda: others() == 0, "the fleet's database connections to close", 60)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except redis.ConnectionError as exc:
        missing_service(f"Redis at {REDIS_URL}: {exc}")
    running = Fleet(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def api(url: str, token: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {token}"
    session.base_url = url  # type: ignore[attr-defined]
    return session


def get(session: requests.Session, path: str) -> Any:
    response = session.get(session.base_url + path, timeout=60)  # type: ignore[attr-defined]
    assert response.status_code == 200, response.text
    return response.json()


def post(session: requests.Session, path: str, body: dict[str, Any] | None = None) -> requests.Response:
    return session.post(session.base_url + path, json=body or {}, timeout=60)  # type: ignore[attr-defined]


def finished(session: requests.Session, job_id: int) -> dict[str, Any]:
    return wait_until(
        lambda: (
            (job := get(session, f"/api/v1/jobs/{job_id}/"))["status"] not in ("queued", "running") and job
        ),
        f"job {job_id} to end",
    )


def version_on(fleet: Fleet, node: str) -> str | None:
    path = fleet.backends(node) / "cpu-demo" / "lib/version.txt"
    return path.read_text() if path.exists() else None


def test_a_fleet_upgrades_rolls_back_recovers_and_converges(
    fleet: Fleet, published: Any, gallery_factory: Any
) -> None:
    gallery_factory(
        [
            {
                "name": "cpu-demo",
                "uri": published.ref,
                "healthcheck": {"command": "sh -c 'test ! -e {path}/../.fail-health'"},
            }
        ]
    )
    operator = get_user_model().objects.create_user("ops", password="x")
    operator.user_permissions.add(Permission.objects.get(codename="operate_backend"))
    token = Token.objects.create(user=operator).key
    for node, capability in (("n1", "default"), ("n2", "nvidia"), ("n3", "amd")):
        fleet.start_worker(node, capability)
    web_a, web_b = api(fleet.start_web(), token), api(fleet.start_web(), token)
    wait_until(lambda: Node.objects.filter(last_heartbeat_at__isnull=False).count() == 3, "three nodes")
    assert dict(Node.objects.values_list("name", "capability")) == {
        "n1": "default",
        "n2": "nvidia",
        "n3": "amd",
    }
    wait_until(lambda: _answers(web_a) and _answers(web_b), "both web replicas")

    # Installed on n1 and n2 only; an upgrade then reaches exactly those two.
    for node in ("n1", "n2"):
        answer = post(web_a, "/api/v1/backends/cpu-demo/install/", {"node": node})
        assert answer.status_code == 202, answer.text
        assert finished(web_b, answer.json()["id"])["status"] == "succeeded"
    published.push("v2")
    answer = post(web_a, "/api/v1/backends/cpu-demo/upgrade/")
    assert answer.status_code == 202, answer.text
    parent = finished(web_b, answer.json()["id"])
    assert parent["status"] == "succeeded", parent
    children = [get(web_b, f"/api/v1/jobs/{child}/") for child in parent["children"]]
    assert sorted(child["node"] for child in children) == ["n1", "n2"]
    assert (version_on(fleet, "n1"), version_on(fleet, "n2"), version_on(fleet, "n3")) == ("v2", "v2", None)

    # A node whose health check fails rolls back alone, and the parent job says so.
    (fleet.backends("n2") / ".fail-health").write_text("")
    published.push("v3")
    parent = finished(web_b, post(web_a, "/api/v1/backends/cpu-demo/upgrade/").json()["id"])
    assert parent["status"] == "partial"
    assert "n2: rolled back" in parent["message"] and "n1: succeeded" in parent["message"]
    assert (version_on(fleet, "n1"), version_on(fleet, "n2")) == ("v3", "v2")

    # Drift is shown, and converged in one click.
    backend = get(web_b, "/api/v1/backends/cpu-demo/")
    assert backend["drift"] is True
    assert {row["node"]: row["online"] for row in backend["installed"]} == {"n1": True, "n2": True}
    (fleet.backends("n2") / ".fail-health").unlink()
    converge = post(web_a, "/api/v1/backends/cpu-demo/converge/")
    assert converge.status_code == 202, converge.text
    parent = finished(web_b, converge.json()["id"])
    assert parent["status"] == "succeeded", parent
    assert [get(web_b, f"/api/v1/jobs/{c}/")["node"] for c in parent["children"]] == ["n2"]
    assert get(web_b, "/api/v1/backends/cpu-demo/")["drift"] is False

    # A node killed mid-upgrade is consistent after it restarts.
    fleet.stop_worker("n2")
    fleet.start_worker("n2", "nvidia", PORTAL_CRASH_AT="after-swap")
    published.push("v4")
    parent_id = post(web_a, "/api/v1/backends/cpu-demo/upgrade/").json()["id"]
    child_n2 = wait_until(
        lambda: UpgradeJob.objects.filter(
            parent_id=parent_id, node__name="n2", status=JobStatus.RUNNING
        ).first(),
        "n2's job to start",
    )
    wait_until(lambda: not _journal_owner_alive(fleet, "n2"), "n2's job process to die mid-swap")
    fleet.stop_worker("n2", signal.SIGKILL)
    fleet.start_worker("n2", "nvidia")
    parent = finished(web_b, parent_id)
    child_n2.refresh_from_db()
    assert child_n2.status == JobStatus.INTERRUPTED
    assert parent["status"] == "partial"
    assert version_on(fleet, "n1") == "v4"
    assert version_on(fleet, "n2") == "v3"  # whole: the old version, as before the upgrade began
    on_disk = json.loads((fleet.backends("n2") / "cpu-demo/metadata.json").read_text())["digest"]
    row = InstalledVersion.objects.get(node__name="n2", name="cpu-demo", state="current")
    assert row.digest == on_disk and published.digests[on_disk] == "v3"
    assert not list((fleet.root / "n2" / ".backends-portal" / "journal").glob("*.json"))


def _answers(session: requests.Session) -> bool:
    try:
        return session.get(session.base_url + "/api/v1/backends/", timeout=30).status_code == 200  # type: ignore[attr-defined]
    except requests.RequestException:
        return False


def _journal_owner_alive(fleet: Fleet, node: str) -> bool:
    """Whether some process holds the lock of n2's operation on cpu-demo (the job is alive)."""
    import fcntl

    lock = fleet.root / node / ".backends-portal" / "journal" / "cpu-demo.lock"
    if not lock.exists():
        return True
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def test_progress_from_a_node_reaches_the_redis_channel_layer(fleet: Fleet, published: Any) -> None:
    from channels_redis.core import RedisChannelLayer

    from backends_app import live

    fleet.start_worker("n1", "default")
    wait_until(lambda: Node.objects.filter(name="n1", last_heartbeat_at__isnull=False).exists(), "node n1")
    published.push("v1-big", extra={"lib/blob.bin": os.urandom(3 << 20)})
    backend = Backend.objects.lookup("cpu-demo")
    job, _ = backend.request(
        JobKind.INSTALL, node=Node.objects.get(name="n1"), requested_by="test", queue=False
    )

    async def listen() -> list[dict[str, Any]]:
        from asgiref.sync import sync_to_async

        layer = RedisChannelLayer(hosts=[REDIS_URL])
        channel = await layer.new_channel()
        await layer.group_add(live.group_name(job.pk), channel)

        def enqueue() -> None:
            from django.db import connection

            job.enqueue()
            connection.close()  # this runs in a helper thread: its connection must not outlive it

        await sync_to_async(enqueue)()  # listening before the node starts, so nothing is missed
        seen: list[dict[str, Any]] = []
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            try:
                message = await asyncio.wait_for(layer.receive(channel), timeout=end - time.monotonic())
            except TimeoutError:
                break
            seen.append(message["job"])
            if message["job"].get("status") not in ("queued", "running"):
                break
        await layer.flush()
        return seen

    messages = asyncio.run(listen())
    assert messages, "no update from the node's worker reached the channel layer"
    assert messages[-1]["status"] == "succeeded"
    assert any((m.get("bytes_done") or 0) > 0 for m in messages)
