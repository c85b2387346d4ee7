"""SIGKILL at every step of every operation: after reconcile each backend is wholly old or wholly new.

Each case runs the real command in a real child process that kills itself with SIGKILL at a named
step (`PORTAL_CRASH_AT`), then reconciles and checks the disk, the rows and the job, then shows the
backend still works by running another operation on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from backends_app import procedure
from backends_app.models import Backend, InstalledVersion, JobKind, JobStatus, UpgradeJob
from tests.conftest import REPO, run_op, subprocess_env

# The sweep is about files and processes, not the database: it runs on the PostgreSQL pass only.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.single_pass]

SWAP_STEPS = [
    "before-swap",
    "after-swap",
    "swapped",
    "health-checked",
    "confirmed",
    "kept",
    "pruned",
    "recorded",
    "cleared",
]
CASES = (
    [("install", step) for step in ["resolved", "downloading", "downloaded", "staged", *SWAP_STEPS]]
    + [("upgrade", step) for step in ["resolved", "downloading", "downloaded", "staged", *SWAP_STEPS]]
    + [("upgrade-unhealthy", step) for step in ["health-checked", "reverting", "reverted"]]
    + [("rollback", step) for step in ["staged", *SWAP_STEPS]]
    + [("uninstall", step) for step in ["before-remove", "removed"]]
)
# From this step on, the operation has reached its new state and recovery rolls forward.
CONFIRMED = {"confirmed", "kept", "pruned", "recorded", "cleared"}


def crash(command: list[str], step: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "backends", *command],
        cwd=REPO,
        env=subprocess_env(PORTAL_CRASH_AT=step),
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_whole(settings: Any, published: Any) -> str | None:
    """The disk, the rows and the state directory agree; returns the live version (None if absent)."""
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo"
    state = Path(settings.PORTAL_STATE_PATH)
    assert [p for p in (state / "staging").rglob("*") if not p.is_dir()] == []
    assert list((state / "journal").glob("*.json")) == []
    assert list((state / "trash").iterdir()) == []
    current = InstalledVersion.objects.filter(name="cpu-demo", state="current")
    if not live.exists():
        assert not current.exists()
        version = None
    else:
        metadata = json.loads((live / "metadata.json").read_text())
        version = (live / "lib/version.txt").read_text()
        assert published.digests[metadata["digest"]] == version  # the tree is the one its metadata names
        assert (live / "run.sh").read_text() == f"#!/bin/sh\necho {version}\n"
        assert current.get().digest == metadata["digest"]
    kept_dirs = (
        sorted(str(p) for p in (state / "kept" / "cpu-demo").glob("*")) if (state / "kept").exists() else []
    )
    kept_rows = sorted(
        InstalledVersion.objects.filter(name="cpu-demo", state="kept").values_list("path", flat=True)
    )
    assert kept_rows == kept_dirs
    for path in kept_dirs:
        digest = json.loads((Path(path) / "metadata.json").read_text())["digest"]
        assert published.digests[digest] == (Path(path) / "lib/version.txt").read_text()
    return version


@pytest.mark.parametrize(("operation", "step"), CASES, ids=[f"{o}-at-{s}" for o, s in CASES])
def test_sigkill_at_any_step_leaves_the_backend_whole(
    operation: str, step: str, published: Any, settings: Any, gallery_factory: Any
) -> None:
    backend = published.backend
    command = [operation.removesuffix("-unhealthy"), "cpu-demo"]
    old, new = None, "v1"
    if operation != "install":
        assert run_op(backend, JobKind.INSTALL).status == JobStatus.SUCCEEDED
        old, new = "v1", "v2"
        published.push("v2")
    if operation == "rollback":
        assert run_op(backend, JobKind.UPGRADE).status == JobStatus.SUCCEEDED
        old, new = "v2", "v1"
    if operation == "uninstall":
        old, new = "v1", None
    if operation == "upgrade-unhealthy":
        gallery_factory(
            [
                {
                    "name": "cpu-demo",
                    "uri": published.ref,
                    "healthcheck": {"command": "grep -q v1 {path}/lib/version.txt"},
                }
            ]
        )
        new = "v1"  # the unhealthy v2 never stays
    jobs_before = set(UpgradeJob.objects.values_list("pk", flat=True))

    done = crash(command, step)

    assert done.returncode == -9, (
        f"the child did not die at {step}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    job = UpgradeJob.objects.exclude(pk__in=jobs_before).get()
    assert job.status == JobStatus.RUNNING  # what the crash left behind

    report = procedure.reconcile()

    job.refresh_from_db()
    assert job.status == JobStatus.INTERRUPTED and job.error
    expected = new if step in CONFIRMED else old
    if operation == "uninstall":
        expected = None  # once begun, a removal is finished by reconcile
    if operation == "upgrade-unhealthy":
        expected = "v1"
    assert assert_whole(settings, published) == expected, report.summary()

    # And the backend can be worked on again.
    backend = Backend.objects.lookup("cpu-demo")
    follow_up = JobKind.INSTALL if expected is None else JobKind.UPGRADE
    after = run_op(backend, follow_up)
    assert after.status in (JobStatus.SUCCEEDED, JobStatus.ROLLED_BACK), after.error
    assert assert_whole(settings, published) is not None


def test_reconcile_leaves_an_operation_of_a_live_process_alone(published: Any, settings: Any) -> None:
    from backends_app.disk.journal import Journal

    journal = Journal(Path(settings.PORTAL_STATE_PATH) / "journal")
    live = Path(settings.PORTAL_BACKENDS_PATH) / "cpu-demo"
    run_op(published.backend, JobKind.INSTALL)
    journal.begin("upgrade", "cpu-demo", 999, live=live, step="staging")
    try:
        report = procedure.reconcile()
        assert report.recovered == []
        assert (Path(settings.PORTAL_STATE_PATH) / "journal/cpu-demo.json").exists()
    finally:
        journal.clear("cpu-demo")


def test_sigkill_while_writing_a_meta_backend_leaves_no_half_meta(
    published: Any, settings: Any, gallery_factory: Any
) -> None:
    gallery_factory(
        [
            {"name": "demo", "capabilities": {"default": "cpu-demo"}},
            {"name": "cpu-demo", "uri": published.ref},
        ]
    )

    done = crash(["install", "demo"], "meta-staged")

    assert done.returncode == -9, done.stderr
    procedure.reconcile()
    root = Path(settings.PORTAL_BACKENDS_PATH)
    assert not (root / "demo").exists()  # the meta never appeared: LocalAI lists nothing half-made
    assert assert_whole(settings, published) == "v1"  # the concrete backend it had installed is whole
    assert not InstalledVersion.objects.filter(name="demo").exists()
    after = run_op(Backend.objects.lookup("demo"), JobKind.INSTALL)
    assert after.status == JobStatus.SUCCEEDED, after.error
    assert json.loads((root / "demo/metadata.json").read_text())["meta_backend_for"] == "cpu-demo"
