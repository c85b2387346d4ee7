"""The pages in a real browser against the real portal: daphne and a worker in their own processes.

One flow, run twice: with Redis as the channel layer (the production shape: the worker publishes each
job change) and without (the embedded default: the web server reads the job row). Sign in, see the
flagged upgrade, click Upgrade, watch the progress bar move and the outcome appear without a reload,
measure how long a progress update written in the database takes to reach the page, then switch
auto-upgrade on in the settings page and find it stored.

Blobs come through a small throttling proxy in front of the real registry: on loopback a few MB
would arrive in milliseconds, and the point is to watch several progress updates arrive.

`PORTAL_SCREENSHOTS=1` also saves the README's screenshots to docs/screenshots/ (on the run without
Redis). `PORTAL_LIVE_SAMPLES=N` takes N latency samples instead of 20.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import os
import random
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.utils import timezone

from backends_app.models import (
    Backend,
    Gallery,
    JobKind,
    JobPhase,
    JobStatus,
    Node,
    PortalSettings,
    UpgradeJob,
)
from tests.conftest import LOCALAI_INDEX, REPO, image, live_version, missing_service, run_op
from tests.helpers.portal import PortalProcesses

pytestmark = [pytest.mark.single_pass, pytest.mark.registry]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Blob bytes per second through the proxy, and the size of each of the new version's two big layers:
# about three seconds of download, a progress update every 0.2 s.
THROTTLE_RATE = 2 * 1024 * 1024
BIG_LAYER = 3 * 1024 * 1024
LATENCY_BOUND = 0.5  # seconds, from the product's requirements
SCREENSHOTS = REPO / "docs" / "screenshots"
PASSWORD = "browser-test-password"


# --- a slow network, on demand --------------------------------------------------------------------


class ThrottlingProxy:
    """Forwards GET and HEAD to a registry; blob bodies leave at `rate` bytes/s in total."""

    def __init__(self, upstream: str, rate: int) -> None:
        self.upstream = upstream
        self.rate = rate
        self._lock = threading.Lock()
        self._next_slot = time.monotonic()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self)

            do_HEAD = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def _wait_for(self, size: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_slot)
            self._next_slot = start + size / self.rate
        time.sleep(max(0.0, start - now))

    def forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        upstream = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("connection", "host")}
            upstream.request(handler.command, handler.path, headers=headers)
            response = upstream.getresponse()
            handler.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                    handler.send_header(name, value)
            body = response.read()
            if response.getheader("Content-Length") is None:
                handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            if handler.command == "HEAD":
                return
            slow = "/blobs/" in handler.path
            for offset in range(0, len(body), 64 * 1024):
                chunk = body[offset : offset + 64 * 1024]
                if slow:
                    self._wait_for(len(chunk))
                handler.wfile.write(chunk)
        finally:
            upstream.close()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the portal, as deployed ----------------------------------------------------------------------


class Portal(PortalProcesses):
    """The portal with the channel layer at ``redis_url`` (empty: the in-memory layer)."""

    def __init__(self, workdir: Path, redis_url: str) -> None:
        super().__init__(workdir, REDIS_URL=redis_url)


def redis_url_or_skip() -> str:
    """A Redis database for this run: a random one of 8-15, so two runs rarely share job groups."""
    import redis

    url = f"redis://127.0.0.1:6379/{random.randint(8, 15)}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        missing_service(f"Redis is not reachable at {url}: {exc}")
    return url


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        missing_service(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("the playwright package is missing (pip install -e '.[test]')")

    # Playwright's sync API keeps an event loop in this thread; the test's ORM calls are plain sync
    # code all the same, which Django would otherwise refuse.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()
            # Playwright runs the test in a greenlet with its own context, where Django opened its
            # own database connection; close it, or the test database cannot be dropped.
            connections.close_all()


@pytest.fixture
def demo(registry: Any, gallery_factory: Any) -> Iterator[dict[str, Any]]:
    """`cpu-demo` v1 installed for real (through the proxy), v2 pushed, and the upgrade flagged."""
    proxy = ThrottlingProxy(registry.host, THROTTLE_RATE)
    repo = registry.unique_repo()
    registry.push_image(image("v1"), repo=repo, tag="latest", version="v1")
    gallery_factory([{"name": "cpu-demo", "uri": f"{proxy.host}/{repo}:latest", "alias": "demo"}])
    backend = Backend.objects.lookup("cpu-demo")
    installed = run_op(backend, JobKind.INSTALL)
    assert installed.status == JobStatus.SUCCEEDED, installed.error
    big = [
        image("v2"),
        {"lib/weights-a.bin": os.urandom(BIG_LAYER)},
        {"lib/weights-b.bin": os.urandom(BIG_LAYER)},
    ]
    registry.push_image(big, repo=repo, tag="latest", version="v2")
    Backend.objects.filter(pk=backend.pk).update(
        upgrade_available=True,
        available_version="v2",
        upgrade_reason="the registry's latest tag now holds v2 (installed: v1)",
        last_checked_at=timezone.now(),
    )
    try:
        yield {"backend": backend, "repo": repo, "proxy": proxy, "registry": registry}
    finally:
        proxy.stop()


def more_backends_for_screenshots(demo: dict[str, Any], gallery_factory: Any) -> None:
    """The README's screenshots show a fuller page: LocalAI's real gallery, an up-to-date backend,
    and one upgraded earlier whose previous version is kept (so it offers Rollback)."""
    gallery, _ = Gallery.objects.update_or_create(name="localai", defaults={"url": LOCALAI_INDEX.as_uri()})
    assert gallery.sync(force=True).ok
    registry, proxy = demo["registry"], demo["proxy"]
    repos = {name: registry.unique_repo() for name in ("kokoro", "whisper")}
    gallery_factory(
        [{"name": name, "uri": f"{proxy.host}/{repo}:latest"} for name, repo in repos.items()], name="extras"
    )
    for name, versions in (("kokoro", ["v0.9.4", "v1.0.0"]), ("whisper", ["v1.7.5"])):
        for version in versions:
            registry.push_image(image(version), repo=repos[name], tag="latest", version=version)
            backend = Backend.objects.get(gallery__name="extras", name=name)
            kind = JobKind.UPGRADE if backend.installed.exists() else JobKind.INSTALL
            assert run_op(backend, kind).status == JobStatus.SUCCEEDED
        Backend.objects.filter(pk=backend.pk).update(
            available_version=versions[-1], last_checked_at=timezone.now()
        )


def sign_in(page: Any, base: str) -> None:
    page.goto(f"{base}/login/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")


def watch_progress(page: Any, *, screenshot: Path | None) -> list[float]:
    """The progress bar's values as the user sees them, until the outcome shows (up to 120 s)."""
    seen: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        value, over = page.evaluate(
            "() => [document.getElementById('job-progress').value,"
            " !document.getElementById('outcome').hidden]"
        )
        if not seen or seen[-1] != value:
            seen.append(value)
        if screenshot is not None and 30 < value < 75:
            page.screenshot(path=str(screenshot), full_page=True)
            screenshot = None
        if over:
            return seen
        page.wait_for_timeout(30)
    raise AssertionError(f"no outcome within 120 s; progress seen: {seen}")


def measure_latency(page: Any, base: str, backend: Backend, samples: int) -> list[float]:
    """Seconds from `job.set_progress` (a DB write, then a publish when the layer crosses processes)
    to the page receiving the update, `samples` times.

    The writes come from one long-lived thread with its own database connection, as in a worker
    process (and with no event loop: Playwright runs one in this thread).
    """
    job = UpgradeJob.objects.create(
        kind=JobKind.UPGRADE,
        backend=backend,
        node=Node.local(),
        status=JobStatus.RUNNING,
        phase=JobPhase.DOWNLOADING,
        started_at=timezone.now(),
        requested_by="test:latency-probe",
    )
    page.goto(f"{base}/jobs/{job.pk}/")
    page.wait_for_function("window.jobLive && window.jobLive.connected")

    def write(done: int) -> float:
        written = time.time()
        job.set_progress(done, 1_000_000, f"probe {done}")
        return written

    delays = []
    with ThreadPoolExecutor(max_workers=1) as worker:
        for i in range(1, samples + 1):
            time.sleep(random.uniform(0.0, 0.2))  # anywhere in the web server's poll interval
            written = worker.submit(write, i * 1000).result()
            update = f"window.jobLive.updates.find(u => u.state.bytes_done === {i * 1000})"
            page.wait_for_function(f"Boolean({update})", polling=10)
            delays.append(page.evaluate(f"{update}.received") / 1000 - written)
        worker.submit(job.finish, "latency probe over").result()
        worker.submit(connections.close_all).result()
    return delays


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("layer", ["redis", "in-memory"])
def test_upgrade_from_the_backends_page_with_live_progress(
    layer: str, browser: Any, demo: dict[str, Any], gallery_factory: Any, settings: Any, tmp_path: Path
) -> None:
    redis_url = redis_url_or_skip() if layer == "redis" else ""
    if redis_url:  # this process writes the latency probe's updates: it publishes as the worker does
        settings.CHANNEL_LAYERS = {
            "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [redis_url]}}
        }
    get_user_model().objects.create_user("operator", password=PASSWORD, is_staff=True, is_superuser=True)
    shots = SCREENSHOTS if os.environ.get("PORTAL_SCREENSHOTS") and layer == "in-memory" else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
        more_backends_for_screenshots(demo, gallery_factory)
    portal = Portal(tmp_path / "portal", redis_url).start()
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        sign_in(page, portal.url)

        # The backends page flags the upgrade, with its reason.
        row = page.locator('#installed tr[data-backend="cpu-demo"]')
        assert "Upgrade available" in row.inner_text()
        assert "latest tag now holds v2" in row.inner_text()
        if shots:
            page.screenshot(path=str(shots / "backends.png"), full_page=False)

        row.locator('button[data-action="upgrade"]').click()
        page.wait_for_url(f"{portal.url}/jobs/*/")
        job = UpgradeJob.objects.get(kind=JobKind.UPGRADE, requested_by="web:operator")
        page.evaluate("window.sameDocument = true")  # gone if anything reloads the page
        navigations: list[str] = []
        page.on("framenavigated", lambda frame: navigations.append(frame.url))

        seen = watch_progress(page, screenshot=shots / "job.png" if shots else None)
        moving = [value for value in seen if 0 < value < 100]
        assert len(moving) >= 3, f"the bar should move in several steps, saw {seen}"
        assert moving == sorted(moving), seen
        assert seen[-1] == 100
        outcome = page.inner_text("#outcome")
        assert "Succeeded" in outcome and "cpu-demo" in outcome, outcome
        assert page.inner_text("#job-status") == "succeeded"
        assert page.evaluate("window.sameDocument") is True and navigations == []
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED, job.error
        # The page was opened before the job started: its Started and Finished rows caught up.
        assert job.started_at and job.finished_at
        for cell, moment in (("#job-started", job.started_at), ("#job-finished", job.finished_at)):
            shown = page.get_attribute(f"{cell} time", "datetime")
            assert shown is not None, page.inner_text(cell)
            assert dt.datetime.fromisoformat(shown) == moment, (cell, shown, moment)
        assert live_version(settings, "cpu-demo") == "v2"
        updates = page.evaluate("window.jobLive.updates.length")
        assert updates >= 5, f"{updates} websocket messages for a ~3 s download"

        samples = int(os.environ.get("PORTAL_LIVE_SAMPLES", "20"))
        delays = measure_latency(page, portal.url, demo["backend"], samples)
        mean, median, worst = (1000 * f(delays) for f in (statistics.mean, statistics.median, max))
        print(
            f"\nlive progress latency ({layer}): n={len(delays)} "
            f"mean={mean:.0f} ms p50={median:.0f} ms max={worst:.0f} ms"
        )
        assert max(delays) < LATENCY_BOUND, delays

        # Settings: switch auto-upgrade on, find it stored.
        assert PortalSettings.load().auto_upgrade_backends is False
        page.goto(f"{portal.url}/settings/")
        page.check("#id_auto_upgrade_backends")
        page.fill("#id_maintenance_window_start", "02:00")
        page.fill("#id_maintenance_window_end", "05:30")
        page.click("#save-settings")
        page.wait_for_selector(".messages .success")
        assert "Settings saved." in page.inner_text(".messages")
        stored = PortalSettings.load()
        assert stored.auto_upgrade_backends is True
        assert (stored.maintenance_window_start, stored.maintenance_window_end) == (
            dt.time(2),
            dt.time(5, 30),
        )
        assert page.is_checked("#id_auto_upgrade_backends")
        if shots:
            page.screenshot(path=str(shots / "settings.png"), full_page=False)
    except Exception:
        print(portal.log_tail())
        raise
    finally:
        portal.stop()
