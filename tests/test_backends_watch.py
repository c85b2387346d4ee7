"""Backends that others install into the shared directory while the portal runs are recorded without a
manual scan: the worker watches its backends directory, leaving LocalAI's in-flight names and the
portal's own operations alone."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from backends_app.disk import watch
from backends_app.disk.journal import Journal
from backends_app.disk.layout import StateDirs
from backends_app.models import InstalledVersion, Node
from backends_app.watcher import BackendsWatch
from tests import test_processes
from tests.helpers.files import backend_files, write_tree
from tests.helpers.processes import wait_until
from tests.test_processes import Run

# The real-process fixtures: a migrated SQLite database, and a run of `manage.py` on a copy of it.
migrated = test_processes.migrated
portal_run = test_processes.portal_run

LOCALAI_INSTALL = """
set -e
mkdir -p "$1.install-tmp"
printf '#!/bin/sh\\necho localai\\n' > "$1.install-tmp/run.sh"
chmod 755 "$1.install-tmp/run.sh"
printf '{"name": "%s", "version": "3.0.0"}' "$(basename "$1")" > "$1.install-tmp/metadata.json"
"""


def rows(run: Run) -> dict[str, str]:
    """name -> version of the current installed rows in the running portal's own database."""
    with sqlite3.connect(run.data_dir / "portal.sqlite3", timeout=30) as db:
        found = db.execute("SELECT name, version FROM backends_app_installedversion WHERE state = 'current'")
        return dict(found.fetchall())


def test_the_worker_records_what_another_process_installs_and_removes(portal_run: Run) -> None:
    backends = portal_run.data_dir / "backends"
    portal_run.start("worker", PORTAL_WATCH_INTERVAL="1")
    portal_run.wait_for_log("interrupted operation(s) recovered")

    # LocalAI stages into <name>.install-tmp, then renames it into place.
    target = backends / "cpu-localai"
    subprocess.run(["sh", "-c", LOCALAI_INSTALL, "sh", str(target)], check=True, timeout=30)
    wait_until(lambda: "cpu-localai.install-tmp" in {p.name for p in backends.iterdir()}, "the staging dir")
    subprocess.run(["mv", f"{target}.install-tmp", str(target)], check=True, timeout=30)

    wait_until(lambda: rows(portal_run).get("cpu-localai") == "3.0.0", "the new backend's row")
    assert "cpu-localai.install-tmp" not in rows(portal_run)

    # LocalAI's upgrade rewrites metadata.json in place.
    (target / "metadata.json").write_text(json.dumps({"name": "cpu-localai", "version": "3.1.0"}))
    wait_until(lambda: rows(portal_run).get("cpu-localai") == "3.1.0", "the rewritten version")

    subprocess.run(["rm", "-r", str(target)], check=True, timeout=30)
    wait_until(lambda: "cpu-localai" not in rows(portal_run), "the row of the removed backend to go")
    assert portal_run.alive()


@pytest.mark.django_db(transaction=True)
def test_the_portals_own_operations_in_flight_are_left_to_it(settings: Any) -> None:
    node = Node.local()
    backends = Path(node.backends_path)
    backends.mkdir(parents=True)
    state = StateDirs(node.state_path)
    state.ensure()
    watcher = BackendsWatch(node, 60, threading.Event())
    write_tree(backends / "cpu-mine", backend_files("v1"))
    write_tree(backends / "cpu-theirs", backend_files("v1"))
    write_tree(backends / "cpu-theirs.upgrade-tmp", backend_files("v2"))
    journal = Journal(state.journal_path)
    journal.begin(
        "install", "cpu-mine", 1, live=backends / "cpu-mine", staging=state.root / "x", step="staging"
    )

    assert watcher.look() == ["cpu-theirs"]
    assert set(InstalledVersion.objects.values_list("name", flat=True)) == {"cpu-theirs"}
    assert watcher.look() == []  # nothing changed since; the busy name waits

    journal.clear("cpu-mine")
    journal.close()
    assert watcher.look() == ["cpu-mine"]
    assert set(InstalledVersion.objects.values_list("name", flat=True)) == {"cpu-mine", "cpu-theirs"}


def test_a_snapshot_sees_metadata_rewritten_in_place_and_run_sh_made_executable(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path / "backends" / "cpu-x", {"run.sh": ("#!/bin/sh\n", 0o644), "metadata.json": "{}"}
    )
    before = watch.snapshot(tmp_path / "backends")
    (root / "run.sh").chmod(0o755)
    after = watch.snapshot(tmp_path / "backends")
    assert watch.changed(before, after) == {"cpu-x"}
    with open(root / "metadata.json", "r+") as handle:  # same inode, same size, later mtime
        handle.write("{ }")
    assert watch.changed(after, watch.snapshot(tmp_path / "backends")) == {"cpu-x"}
    assert watch.snapshot(tmp_path / "missing") == {}
