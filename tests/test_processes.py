"""`manage.py serve` and `manage.py worker` as real processes: whatever way they stop, nothing of
theirs stays behind, and a database that is busy for a while never stops a worker.

Each test runs the portal on its own SQLite database (a copy of one migrated once for the module),
watches the processes it started through /proc, and waits on conditions with generous deadlines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO
from tests.helpers.processes import free_port, wait_until

# Generous: these hold on a loaded 2-core machine. The grace period the portal gets is short, so
# a stop that waits for the running job instead of killing it overshoots these by minutes.
DEADLINE = 90.0
GRACE = 5
LONG_JOB_SECONDS = 600


def _stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], fields[19]


def descendants(root: int) -> dict[int, str]:
    """`root` and every process below it, each with its start time (so a reused pid is not taken
    for one of ours)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))) is not None:
            children.setdefault(info[0], []).append(int(entry.name))
            starts[int(entry.name)] = info[2]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in found:
            found[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return found


def with_marker(marker: str) -> set[int]:
    """Live processes whose environment names this test's data directory."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


class Run:
    """One `manage.py` command of the portal, with its log, in a data directory of its own."""

    def __init__(self, data_dir: Path, template: Path) -> None:
        self.data_dir = data_dir
        shutil.copy(template, data_dir / "portal.sqlite3")
        self.env = {
            **os.environ,
            "DATABASE_URL": "",
            "PORTAL_DATA_DIR": str(data_dir),
            "PORTAL_WORKERS": "1",
            "PORTAL_SHUTDOWN_GRACE": str(GRACE),
            "PORTAL_LOG_LEVEL": "INFO",
        }
        self.log_path = data_dir / "run.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, str] = {}

    def start(self, *args: str, **env: str) -> Run:
        self.env.update(env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", *args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # a signal from the test reaches only the process it is sent to
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_log(self, *words: str) -> None:
        def found() -> bool:
            assert self.alive(), (
                f"exited with {self.process.returncode if self.process else None}:\n{self.log()}"
            )
            return any(all(word in line for word in words) for line in self.log().splitlines())

        wait_until(found, f"a log line with {words}:\n{self.log()}")

    def enqueue_long_job(self) -> None:
        """A task that runs for minutes, as a big download would, picked up by the cluster."""
        code = f"from django_q.tasks import async_task; async_task('time.sleep', {LONG_JOB_SECONDS})"
        subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", code],
            cwd=REPO,
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.wait_for_log("processing", "time.sleep")

    def remember_processes(self) -> dict[int, str]:
        self.seen = descendants(self.pid)
        return self.seen

    def remaining(self) -> list[str]:
        """Processes of this run still alive (zombies count: they are not reaped yet)."""
        left = []
        for pid, started in self.seen.items():
            info = _stat(pid)
            if info is not None and info[2] == started:
                left.append(f"{pid} ({info[1]}) {_cmdline(pid)}")
        for pid in with_marker(str(self.data_dir)) - set(self.seen):
            left.append(f"{pid} {_cmdline(pid)}")
        return left

    def kill_everything(self) -> None:
        """After the test, whatever happened: nothing of this run may outlive it. Only processes
        of this run are signalled (same pid and start time, or this run's data directory)."""
        ours = {**self.seen, **(descendants(self.pid) if self.alive() else {})}
        targets = {pid for pid, started in ours.items() if (_stat(pid) or (0, "", ""))[2] == started}
        for pid in targets | with_marker(str(self.data_dir)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            self.process.wait(timeout=30)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "?"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite database migrated once; each test runs on its own copy."""
    data_dir = tmp_path_factory.mktemp("migrated")
    env = {**os.environ, "DATABASE_URL": "", "PORTAL_DATA_DIR": str(data_dir)}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return data_dir / "portal.sqlite3"


@pytest.fixture
def portal_run(tmp_path: Path, migrated: Path) -> Iterator[Run]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    run = Run(data_dir, migrated)
    try:
        yield run
    finally:
        run.kill_everything()


def all_gone(run: Run) -> None:
    wait_until(lambda: not run.remaining(), f"every process of the run to end; left: {run.remaining()}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_every_process_it_started_within_its_grace_period_even_mid_job(
    portal_run: Run, signum: int
) -> None:
    port = free_port()
    portal_run.start("serve", "--port", str(port))
    portal_run.wait_for_log("Q Cluster", "running")

    def answers() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/admin/login/", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, "the web server to answer")
    portal_run.enqueue_long_job()
    assert len(portal_run.remember_processes()) >= 4  # serve, daphne, worker, its cluster

    portal_run.process.send_signal(signum)

    assert portal_run.process.wait(timeout=DEADLINE) == 0, portal_run.log()
    all_gone(portal_run)


def test_a_worker_stopped_mid_job_stops_its_cluster_within_its_grace_period(portal_run: Run) -> None:
    portal_run.start("worker")
    portal_run.wait_for_log("Q Cluster", "running")
    portal_run.enqueue_long_job()
    portal_run.remember_processes()

    portal_run.process.send_signal(signal.SIGTERM)

    assert portal_run.process.wait(timeout=DEADLINE) == 0, portal_run.log()
    all_gone(portal_run)
    assert "killing its process group" in portal_run.log()


def test_a_worker_killed_with_sigkill_takes_its_cluster_with_it(portal_run: Run) -> None:
    portal_run.start("worker")
    portal_run.wait_for_log("Q Cluster", "running")
    assert len(portal_run.remember_processes()) >= 3  # the worker, its cluster and the cluster's own

    os.kill(portal_run.pid, signal.SIGKILL)  # the worker alone, as the OOM killer would

    assert portal_run.process.wait(timeout=DEADLINE) == -signal.SIGKILL
    all_gone(portal_run)


def test_a_worker_whose_cluster_dies_exits_and_leaves_nothing_behind(portal_run: Run) -> None:
    portal_run.start("worker")
    portal_run.wait_for_log("Q Cluster", "running")
    portal_run.remember_processes()
    [cluster] = [pid for pid in portal_run.seen if pid != portal_run.pid and _stat(pid)[0] == portal_run.pid]

    os.kill(cluster, signal.SIGKILL)

    assert portal_run.process.wait(timeout=DEADLINE) != 0
    all_gone(portal_run)


def test_a_locked_database_delays_heartbeats_but_never_stops_the_worker(portal_run: Run) -> None:
    database = portal_run.data_dir / "portal.sqlite3"

    def last_heartbeat() -> str | None:
        with sqlite3.connect(database, timeout=60) as reader:
            row = reader.execute("SELECT max(last_heartbeat_at) FROM backends_app_node").fetchone()
        return row[0]

    portal_run.start("worker", PORTAL_DB_BUSY_TIMEOUT="1", PORTAL_HEARTBEAT_INTERVAL="1")
    portal_run.wait_for_log("Q Cluster", "running")
    wait_until(last_heartbeat, "a first heartbeat")

    # Another writer holds SQLite's write lock for longer than the worker's busy timeout, as a
    # big gallery sync in the web server would.
    holder = sqlite3.connect(database, timeout=60, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        portal_run.wait_for_log("heartbeat failed", "database is locked", "retrying")
        assert portal_run.alive(), portal_run.log()
        before = holder.execute("SELECT max(last_heartbeat_at) FROM backends_app_node").fetchone()[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    wait_until(lambda: last_heartbeat() != before, "a heartbeat once the lock is released")
    assert portal_run.alive(), portal_run.log()
    portal_run.remember_processes()
    portal_run.process.send_signal(signal.SIGTERM)
    assert portal_run.process.wait(timeout=DEADLINE) == 0, portal_run.log()
    all_gone(portal_run)
