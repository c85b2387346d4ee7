"""The portal as deployed, for tests: daphne and `manage.py worker` in their own processes,
sharing the test's database and paths."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests
from django.db import connection

from tests.conftest import REPO, subprocess_env
from tests.helpers.processes import DEADLINE, die_with_parent, free_port, wait_until

APPLICATION_NAME = "portal-under-test"


class PortalProcesses:
    """Started by the test, stopped by it; every process's output goes to ``workdir/logs``.

    ``env`` adds to what :func:`tests.conftest.subprocess_env` gives (``REDIS_URL`` chooses the
    channel layer: empty for the in-memory one); :attr:`env` may still be changed before a start.
    """

    def __init__(self, workdir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = subprocess_env(
            PORTAL_DATA_DIR=str(workdir),
            PORTAL_LOG_LEVEL="WARNING",
            PGAPPNAME=APPLICATION_NAME,  # tells their PostgreSQL connections from the test's own
            **env,
        )
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> PortalProcesses:
        """The web server and a worker; returns once the web server answers."""
        self.start_web()
        self.start_worker()
        return self

    def start_web(self) -> None:
        web = [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(self.port),
            "portal.asgi:application",
        ]
        self._spawn("web", web)

        def answers() -> bool:
            self.check_alive()
            try:
                return requests.get(f"{self.url}/login/", timeout=30).status_code == 200
            except requests.ConnectionError:
                return False

        wait_until(answers, f"the web server to answer:\n{self.log_tail()}", DEADLINE)

    def start_worker(self) -> None:
        self._spawn("worker", [sys.executable, "manage.py", "worker"])

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own group: the worker's cluster goes with it
                    preexec_fn=die_with_parent,
                )
            )

    def check_alive(self) -> None:
        for process in self.processes:
            if process.poll() is not None:
                raise AssertionError(f"{process.args} exited with {process.returncode}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        """SIGTERM to each leader only (the worker stops its cluster in order), then whatever is
        left in their groups; on PostgreSQL, wait for their connections to close, since the test
        database is dropped after the test."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if connection.vendor != "postgresql":
            return

        def others() -> int:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = %s",
                    [APPLICATION_NAME],
                )
                return int(cursor.fetchone()[0])

        wait_until(lambda: others() == 0, "the portal's database connections to close", 30)
