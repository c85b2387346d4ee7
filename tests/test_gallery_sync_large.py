"""A large gallery sync runs in short transactions: the portal keeps answering, and a sync that is
killed or overtaken midway never leaves an index that looks complete.

The sync runs in its own process (`manage.py gallery sync`), as the worker runs it, against this
test's database; the test process is the rest of the portal, writing and reading meanwhile.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError, connection

from backends_app.models import Backend, Gallery, Node
from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

# Generous: a loaded 2-core machine may take several times what an idle one does.
DEADLINE = 300
# What a single write may wait for the database at most. The portal's busy timeout is 30 s; a
# write that waits a whole sync (many seconds for these indexes) is what took the worker down.
WRITE_BUDGET_MS = 5000


def write_index(path: Path, count: int, prefix: str = "big") -> None:
    with path.open("w") as out:
        for i in range(count):
            out.write(
                f"- name: {prefix}-{i:06d}\n  uri: quay.io/example/backends:{prefix}-{i:06d}\n"
                f"  version: '1.{i % 50}'\n  tags: [LLM, CPU]\n"
            )


def start_sync(name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "gallery", "sync", name, "--force"],
        cwd=REPO,
        env=subprocess_env(PORTAL_LOG_LEVEL="WARNING"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sync ended (exit {process.returncode}) before {what}: {out} {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {DEADLINE} s")
        time.sleep(0.02)


def rows(gallery: Gallery, **filters: Any) -> int:
    return Backend.objects.filter(gallery=gallery, **filters).count()


@pytest.fixture
def short_busy_timeout() -> None:
    """This connection gives up on a locked SQLite database after WRITE_BUDGET_MS, not 30 s."""
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(f"PRAGMA busy_timeout = {WRITE_BUDGET_MS}")


def test_the_portal_writes_and_reads_while_a_large_gallery_syncs(
    tmp_path: Path, admin_client: Any, short_busy_timeout: None
) -> None:
    total = 30_000
    index = tmp_path / "index.yaml"
    write_index(index, total)
    big = Gallery.objects.create(name="big", url=index.as_uri())
    node = Node.local()
    sync = start_sync("big")

    slowest_ms, failures, pages, writes_while_storing = 0.0, [], 0, 0
    try:
        while sync.poll() is None:
            stored = rows(big)
            started = time.monotonic()
            try:
                node.heartbeat()  # the write a worker makes every few seconds
            except OperationalError as exc:
                failures.append(str(exc))
            slowest_ms = max(slowest_ms, (time.monotonic() - started) * 1000)
            page = admin_client.get("/api/v1/backends/", {"gallery": "big"})
            assert page.status_code == 200, page.content[:500]
            pages += 1
            if 0 < stored < total and rows(big) < total:
                writes_while_storing += 1
            assert time.monotonic() - started < DEADLINE
        out, err = sync.communicate(timeout=DEADLINE)
    finally:
        if sync.poll() is None:
            sync.kill()

    assert sync.returncode == 0, err
    assert f"big: {total} entries, {total} new" in out
    assert not failures, failures[:3]
    assert slowest_ms < WRITE_BUDGET_MS
    assert writes_while_storing >= 3, "the rows never showed up a batch at a time"
    assert pages > writes_while_storing
    big.refresh_from_db()
    assert (big.entry_count, rows(big)) == (total, total)


def test_a_sync_killed_midway_leaves_the_last_complete_index_in_charge(tmp_path: Path) -> None:
    index = tmp_path / "index.yaml"
    index.write_text("- name: old-a\n  uri: quay.io/x/a:1\n- name: old-b\n  uri: quay.io/x/b:1\n")
    gallery = Gallery.objects.create(name="big", url=index.as_uri())
    assert gallery.sync().ok
    gallery.refresh_from_db()
    synced_at = gallery.last_synced_at
    total = 20_000
    write_index(index, total, prefix="new")

    sync = start_sync("big")
    try:
        wait_for(lambda: rows(gallery, name__startswith="new-") > 0, "rows stored", sync)
    finally:
        sync.send_signal(signal.SIGKILL)
        sync.communicate(timeout=DEADLINE)

    gallery.refresh_from_db()
    assert 0 < rows(gallery, name__startswith="new-") < total
    # Nothing says "complete": the ETag is gone, so the next sync fetches and stores everything.
    assert gallery.etag == ""
    assert (gallery.entry_count, gallery.last_synced_at) == (2, synced_at)
    assert rows(gallery, name__startswith="old-", gone=False) == 2  # not marked gone halfway

    result = gallery.sync()

    assert result.ok and not result.not_modified, result.error
    gallery.refresh_from_db()
    assert gallery.etag and gallery.entry_count == total
    assert rows(gallery, name__startswith="new-", gone=False) == total
    assert rows(gallery, name__startswith="old-", gone=True) == 2


def test_a_newer_sync_takes_over_from_one_still_running(tmp_path: Path) -> None:
    index = tmp_path / "index.yaml"
    write_index(index, 20_000, prefix="first")
    gallery = Gallery.objects.create(name="big", url=index.as_uri())

    older = start_sync("big")
    try:
        wait_for(lambda: rows(gallery) > 0, "rows stored", older)
        write_index(index, 10, prefix="second")
        newer = gallery.sync(force=True)
        out, err = older.communicate(timeout=DEADLINE)
    finally:
        if older.poll() is None:
            older.kill()

    assert newer.ok, newer.error
    assert older.returncode != 0 and "a newer sync" in err, (out, err)
    gallery.refresh_from_db()
    assert gallery.entry_count == 10 and gallery.last_error == ""
    assert rows(gallery, gone=False) == 10
    assert set(Backend.objects.filter(gallery=gallery, gone=False).values_list("name", flat=True)) == {
        f"second-{i:06d}" for i in range(10)
    }
