"""/metrics as Prometheus sees it: real daphne processes, jobs run in other real processes, a real
registry behind a fault proxy, the answers parsed with prometheus_client's own text parser.

Each process test gets its own PROMETHEUS_MULTIPROC_DIR, handed to every process it starts, as a
deployment's service environment would.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backends_app import metrics
from backends_app.metrics_store import MetricFiles
from backends_app.models import (
    Backend,
    BackendState,
    InstalledVersion,
    JobKind,
    JobStatus,
    Node,
    UpgradeJob,
)
from tests.conftest import REPO, subprocess_env
from tests.helpers.api import install, make_backend, make_gallery, make_user
from tests.helpers.processes import free_port, wait_until
from tests.registry import Fault, FaultProxy, non_loopback_address

TOKEN = "s3cret-scrape-token"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- helpers ------------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a labelled counter appears once it has counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


class Web:
    """A real daphne serving the portal (sharing the test database), stopped by the test."""

    def __init__(self, workdir: Path, env: dict[str, str], bind: str = "127.0.0.1") -> None:
        self.bind = bind
        self.port = free_port(bind if bind != "0.0.0.0" else "")
        self.log = workdir / f"web-{self.port}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", bind, "-p", str(self.port), "portal.asgi:application"],
            cwd=REPO,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._answers, f"daphne on {bind}:{self.port}")

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/metrics"

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"daphne exited: {self.log.read_text()[-2000:]}")
        try:
            requests.get(
                self.url("127.0.0.1" if self.bind in ("127.0.0.1", "0.0.0.0") else self.bind), timeout=5
            )
        except requests.ConnectionError:
            return False
        return True

    def scrape(self, host: str = "127.0.0.1", **headers: str) -> Samples:
        response = requests.get(self.url(host), headers=headers, timeout=30)
        assert response.status_code == 200, (response.status_code, response.text)
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        return parse(response.text)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    path = tmp_path / "prometheus"
    path.mkdir()
    return path


@pytest.fixture
def portal_env(metrics_dir: Path) -> Callable[..., dict[str, str]]:
    def make(**extra: str) -> dict[str, str]:
        return subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), PORTAL_LOG_LEVEL="WARNING", **extra)

    return make


@pytest.fixture
def start_web(tmp_path: Path, portal_env: Callable[..., dict[str, str]]) -> Iterator[Callable[..., Web]]:
    started: list[Web] = []

    def start(bind: str = "127.0.0.1", **extra: str) -> Web:
        web = Web(tmp_path, portal_env(**extra), bind)
        started.append(web)
        return web

    yield start
    for web in started:
        web.stop()
    # The test database is dropped after the test: let the servers' connections close first.
    if connection.vendor == "postgresql":

        def others() -> bool:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                )
                return int(cursor.fetchone()[0]) == 0

        wait_until(others, "the servers' database connections to close", 30)


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """A `manage.py` command in its own process, as an operator or cron would run it."""
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


HOLD_COUNTS = """
import sys
from backends_app import jobs
from backends_app.models import UpgradeJob
job, _ = UpgradeJob.request_check("holder", queue=False)
jobs.run(job.pk)
print("counted", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def start_counting(
    portal_env: Callable[..., dict[str, str]],
) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start a process that runs one real check job (counted into its own files), then stays alive
    until the test kills it."""
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "--no-imports", "-c", HOLD_COUNTS],
            cwd=REPO,
            env=portal_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None
        lines = iter(process.stdout.readline, "")
        assert any(line.strip() == "counted" for line in lines), "the counting process ended early"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def pids_with_files(path: Path) -> set[int]:
    return {int(m.group(1)) for p in path.glob("*.db") if (m := re.search(r"_(\d+)\.db$", p.name))}


# --- events counted in other processes ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_a_failed_upgrade_in_another_process_adds_one_to_the_failed_upgrades(
    published: Any, start_web: Callable[..., Web], portal_env: Callable[..., dict[str, str]]
) -> None:
    web = start_web()
    env = portal_env()
    installed = manage(env, "backends", "install", "cpu-demo")
    assert installed.returncode == 0, installed.stderr
    before = web.scrape()
    assert value(before, "portal_jobs_total", kind="install", outcome="succeeded") == 1

    published.push("v2", executable=False)  # an image without an executable run.sh
    upgrade = manage(env, "backends", "upgrade", "cpu-demo")

    assert upgrade.returncode != 0
    job = UpgradeJob.objects.get(kind=JobKind.UPGRADE)
    assert job.status == JobStatus.FAILED and "run.sh" in job.error
    after = web.scrape()
    failed = {"kind": "upgrade", "outcome": "failed"}
    assert value(after, "portal_jobs_total", **failed) == value(before, "portal_jobs_total", **failed) + 1
    assert value(after, "portal_jobs_total", kind="upgrade", outcome="succeeded") == 0
    assert value(after, "portal_job_duration_seconds_count", kind="upgrade") == 1
    assert value(after, "portal_job_duration_seconds_count", kind="install") == 1
    # The state read from the database agrees with the rows.
    node = Node.objects.get(name="test-node")
    rows = InstalledVersion.objects.filter(node=node, state=InstalledVersion.State.CURRENT).count()
    assert rows == 1
    assert value(after, "portal_backends_installed", node="test-node") == rows
    # The state is the one `Backend.status` decides (the command checked first: v2 is offered).
    state = Backend.objects.with_installations().get(name="cpu-demo").status.state
    assert state == BackendState.UPGRADE_AVAILABLE
    assert value(after, "portal_backends_by_state", node="test-node", state=state) == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_a_registry_answering_429_shows_under_status_429(
    published: Any,
    registry: Any,
    fault_proxy_factory: Any,
    gallery_factory: Any,
    start_web: Callable[..., Web],
    portal_env: Callable[..., dict[str, str]],
) -> None:
    proxy: FaultProxy = fault_proxy_factory(registry.host)
    env = portal_env()
    assert manage(env, "backends", "install", "cpu-demo").returncode == 0
    # From now on the gallery names the image through the proxy, which rate-limits one HEAD.
    gallery_factory([{"name": "cpu-demo", "uri": published.ref.replace(registry.host, proxy.host)}])
    assert Backend.objects.get(name="cpu-demo").uri.startswith(proxy.host)
    proxy.add(Fault(lambda method, path: method == "HEAD", status=429, headers={"Retry-After": "0"}))
    web = start_web()

    check = manage(env, "backends", "check")

    assert check.returncode == 0, check.stdout + check.stderr
    seen = [(method, status) for _, method, _, status in proxy.log]
    assert ("HEAD", 429) in seen and ("HEAD", 200) in seen
    samples = web.scrape()
    for method, status in set(seen):
        assert value(
            samples, "portal_registry_requests_total", registry=proxy.host, method=method, status=str(status)
        ) == seen.count((method, status)), (method, status)
    assert (
        value(samples, "portal_registry_requests_total", registry=proxy.host, method="HEAD", status="429")
        == 1
    )
    assert value(samples, "portal_check_duration_seconds_count", outcome="succeeded") == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_counts_of_exited_and_killed_processes_add_up_and_survive_folding(
    start_web: Callable[..., Web],
    portal_env: Callable[..., dict[str, str]],
    start_counting: Callable[[], subprocess.Popen[str]],
    metrics_dir: Path,
) -> None:
    web = start_web()
    env = portal_env()
    for _ in range(2):
        assert manage(env, "backends", "check").returncode == 0
    killed = start_counting()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = start_counting()
    try:
        dead = pids_with_files(metrics_dir) - {live.pid}
        assert killed.pid in dead and len(dead) == 3

        samples = web.scrape()

        # Four checks; the two of `backends check` have no job row, the other two ran as jobs.
        assert value(samples, "portal_check_duration_seconds_count", outcome="succeeded") == 4
        assert value(samples, "portal_jobs_total", kind="check", outcome="succeeded") == 2
        last = UpgradeJob.objects.filter(kind=JobKind.CHECK).latest("finished_at").finished_at
        assert value(samples, "portal_last_successful_check_timestamp_seconds") == pytest.approx(
            last.timestamp()
        )
        # The dead processes' files were folded into the archive; the live one's stay its own.
        assert pids_with_files(metrics_dir) == {live.pid}
        assert (metrics_dir / "archive").is_symlink()
        assert manage(env, "backends", "check").returncode == 0
        again = web.scrape()
        assert value(again, "portal_check_duration_seconds_count", outcome="succeeded") == 5
        assert value(again, "portal_jobs_total", kind="check", outcome="succeeded") == 2
        assert pids_with_files(metrics_dir) == {live.pid}
    finally:
        live.kill()
        live.wait()


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_a_worker_starting_empties_the_counts_only_when_no_process_is_counting(
    portal_env: Callable[..., dict[str, str]],
    start_counting: Callable[[], subprocess.Popen[str]],
    metrics_dir: Path,
) -> None:
    env = portal_env()
    assert manage(env, "backends", "check").returncode == 0
    live = start_counting()

    def checks_counted() -> float:
        registry = CollectorRegistry()
        registry.register(MetricFiles(metrics_dir))
        counted = registry.get_sample_value("portal_check_duration_seconds_count", {"outcome": "succeeded"})
        return counted or 0

    try:
        started = manage(env, "worker", "--once")
        assert started.returncode == 0, started.stderr
        assert "kept (live processes count into it)" in started.stdout
        assert checks_counted() == 2
    finally:
        live.kill()
        live.wait()

    started = manage(env, "worker", "--once")
    assert "emptied (no live process was counting)" in started.stdout
    assert checks_counted() == 0
    assert not list(metrics_dir.glob("*.db")) and not (metrics_dir / "archive").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_a_fold_cut_short_after_the_switch_counts_nothing_twice_and_is_finished_later(
    portal_env: Callable[..., dict[str, str]], metrics_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = portal_env()
    for _ in range(2):
        assert manage(env, "backends", "check").returncode == 0
    files = MetricFiles(metrics_dir)

    def checks_counted() -> float:
        registry = CollectorRegistry()
        registry.register(files)
        return registry.get_sample_value("portal_check_duration_seconds_count", {"outcome": "succeeded"}) or 0

    assert checks_counted() == 2
    dead = set(metrics_dir.glob("*_*.db"))

    def power_cut(self: Path, missing_ok: bool = False) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as patch:
        # The archive now holds the dead files' counts, but the files themselves were not removed.
        patch.setattr(Path, "unlink", power_cut)
        with pytest.raises(OSError, match="power cut"):
            files.compact()
    assert set(metrics_dir.glob("*_*.db")) == dead
    assert checks_counted() == 2

    files.compact()

    assert not list(metrics_dir.glob("*_*.db"))
    assert checks_counted() == 2


# --- state read from the database ---------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_node_heartbeat_age_grows_and_a_heartbeat_resets_it(start_web: Callable[..., Web]) -> None:
    node = Node.objects.create(name="gpu-1", backends_path="/srv/gpu-1", queue="gpu-1")
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - dt.timedelta(seconds=120))
    web = start_web()

    def age(samples: Samples) -> float:
        return value(samples, "portal_node_heartbeat_age_seconds", node="gpu-1")

    first = web.scrape()
    assert age(first) >= 120
    assert value(first, "portal_node_online", node="gpu-1") == 0

    def grown() -> Samples | None:
        samples = web.scrape()
        return samples if age(samples) > age(first) else None

    wait_until(grown, "the heartbeat age to grow")

    node.heartbeat()
    fresh = web.scrape()
    assert age(fresh) < 60
    assert value(fresh, "portal_node_online", node="gpu-1") == 1


@pytest.mark.django_db
def test_state_gauges_match_the_rows_and_cost_a_fixed_number_of_queries() -> None:
    gallery = make_gallery()
    gpu = Node.objects.create(name="gpu-1", backends_path="/srv/gpu-1", queue="gpu-1")
    cpu = Node.objects.create(name="cpu-1", backends_path="/srv/cpu-1", queue="cpu-1")
    flagged = make_backend(gallery, "flagged", upgrade_available=True, upgrade_reason="version 1 -> 2")
    install(flagged, gpu)

    def scrape() -> tuple[Samples, int]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics.PortalStateCollector())
        with CaptureQueriesContext(connection) as queries:
            text = generate_latest(registry).decode()
        return parse(text), len(queries)

    scrape()  # the first one creates the settings row
    samples, few = scrape()
    assert value(samples, "portal_upgrades_available", node="gpu-1") == 1
    assert value(samples, "portal_backends_installed", node="cpu-1") == 0

    pinned = make_backend(gallery, "pinned", pinned=True, upgrade_available=True)
    held = make_backend(gallery, "held", held_digest="sha256:" + "b" * 64, held_reason="health check failed")
    drifting = make_backend(gallery, "drifting", last_checked_at=timezone.now())
    for backend in (pinned, held):
        install(backend, gpu)
        install(backend, cpu)
    install(drifting, gpu, digest="sha256:" + "1" * 64)
    install(drifting, cpu, digest="sha256:" + "2" * 64)
    for number in range(5):
        install(make_backend(gallery, f"more-{number}", last_checked_at=timezone.now()), cpu)
    UpgradeJob.objects.create(kind=JobKind.UPGRADE, backend=flagged, node=gpu)

    samples, many = scrape()

    assert many == few
    for node in (gpu, cpu):
        rows = InstalledVersion.objects.filter(node=node, state=InstalledVersion.State.CURRENT).count()
        assert value(samples, "portal_backends_installed", node=node.name) == rows
    assert value(samples, "portal_backends_installed", node="cpu-1") == 8
    assert value(samples, "portal_upgrades_available", node="gpu-1") == 1  # pinned ones are not taken
    assert value(samples, "portal_backends_pinned", node="cpu-1") == 1
    assert value(samples, "portal_backends_held", node="gpu-1") == 1
    assert value(samples, "portal_backends_by_state", node="gpu-1", state="upgrade_available") == 1
    assert value(samples, "portal_backends_by_state", node="cpu-1", state="up_to_date") == 6
    assert value(samples, "portal_backend_drift", gallery="main", backend="drifting") == 1
    assert value(samples, "portal_backend_drift", gallery="main", backend="pinned") == 0
    assert value(samples, "portal_backends_drifted") == 1
    assert value(samples, "portal_jobs_active", kind="upgrade", status="queued") == 1
    assert value(samples, "portal_job_oldest_queued_age_seconds") >= 0
    assert value(samples, "portal_database_up") == 1


@pytest.mark.django_db
def test_a_failed_gallery_sync_is_counted_and_shown_until_a_sync_succeeds(
    tmp_path: Path, client: Any
) -> None:
    index = tmp_path / "index.yaml"
    gallery = make_gallery("flaky", url=index.as_uri())
    before = parse(client.get("/metrics").content.decode())

    assert not gallery.sync().ok  # the file is missing
    after_failure = parse(client.get("/metrics").content.decode())
    index.write_text("- name: cpu-x\n  uri: quay.io/example/x:latest\n")
    assert gallery.sync().ok
    after_success = parse(client.get("/metrics").content.decode())

    def failures(samples: Samples) -> float:
        return value(samples, "portal_gallery_syncs_total", gallery="flaky", outcome="failed")

    assert failures(after_failure) == failures(before) + 1
    assert failures(after_success) == failures(after_failure)
    assert value(after_success, "portal_gallery_syncs_total", gallery="flaky", outcome="synced") >= 1
    assert value(after_failure, "portal_gallery_sync_error", gallery="flaky") == 1
    assert value(after_success, "portal_gallery_sync_error", gallery="flaky") == 0
    assert value(after_success, "portal_gallery_last_sync_timestamp_seconds", gallery="flaky") > 0


# --- who may read /metrics --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_loopback_is_open_and_another_address_needs_the_token(start_web: Callable[..., Web]) -> None:
    """Served on all addresses; asked through this machine's non-loopback address, the request
    arrives from that address, as a scraper on another machine's would."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address (the REMOTE_ADDR rules are tested in-process)")
    hosts = f"127.0.0.1,{address}"
    with_token = start_web("0.0.0.0", PORTAL_METRICS_TOKEN=TOKEN, PORTAL_ALLOWED_HOSTS=hosts)
    without_token = start_web("0.0.0.0", PORTAL_ALLOWED_HOSTS=hosts)

    assert requests.get(with_token.url(), timeout=30).status_code == 200
    refused = requests.get(with_token.url(address), timeout=30)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert "# TYPE" not in refused.text
    wrong = requests.get(with_token.url(address), headers={"Authorization": "Bearer not-it"}, timeout=30)
    assert wrong.status_code == 401
    assert (
        with_token.scrape(address, Authorization=f"Bearer {TOKEN}")[("portal_database_up", frozenset())] == 1
    )

    assert requests.get(without_token.url(), timeout=30).status_code == 200
    closed = requests.get(
        without_token.url(address), headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert closed.status_code == 403 and "PORTAL_METRICS_TOKEN" in closed.text


@pytest.mark.django_db
def test_with_loopback_off_even_a_proxy_on_this_machine_needs_the_token(client: Any, settings: Any) -> None:
    """Behind a reverse proxy on the same host every request comes from 127.0.0.1; with
    PORTAL_METRICS_LOOPBACK=off that address earns nothing."""
    settings.PORTAL_METRICS_TOKEN = TOKEN
    assert client.get("/metrics").status_code == 200  # the test client's REMOTE_ADDR is 127.0.0.1
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 401
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200

    settings.PORTAL_METRICS_LOOPBACK = False
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"bearer {TOKEN}").status_code == 200
    assert client.get("/metrics", HTTP_AUTHORIZATION=f"Token {TOKEN}").status_code == 401
    assert client.post("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 405

    settings.PORTAL_METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 403


@pytest.mark.django_db
def test_settings_page_and_admin_say_where_metrics_are_without_showing_the_token(
    client: Any, settings: Any
) -> None:
    settings.PORTAL_METRICS_TOKEN = TOKEN
    client.force_login(make_user("root", superuser=True))

    page = client.get("/settings/").content.decode()
    admin = client.get("/admin/backends_app/portalsettings/1/change/").content.decode()

    for html in (page, admin):
        assert "Monitoring" in html and "http://testserver/metrics" in html
        assert "PORTAL_METRICS_TOKEN</code> is set" in html
        assert TOKEN not in html
    settings.PORTAL_METRICS_TOKEN = ""
    page = client.get("/settings/").content.decode()
    assert "other addresses are refused until <code>PORTAL_METRICS_TOKEN</code> is set" in page
