"""Pulls that resume after their process was killed: from the part files a SIGKILL leaves behind.

A pull in a child process is SIGKILLed mid-download, then run again with the same blob directory;
a real `manage.py worker` is killed mid-install, restarted, and finishes the same job. Links are
bench.netproxy's NetProxy (its byte counters say what was downloaded twice); the registry is real.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backends_app import procedure
from backends_app.models import Backend, JobKind, JobMessage, JobStatus, UpgradeJob
from backends_app.oci.publish import layer_from_tar, push_image
from bench.netproxy import NetProxy
from tests.conftest import REPO, image, subprocess_env
from tests.registry import RegistryServer
from tests.test_oci_unpack import _file, make_tar
from tests.test_processes import descendants

pytestmark = pytest.mark.registry

MiB = 1024 * 1024
DEADLINE = 180.0


def wait_until(
    condition: Callable[[], Any], what: str, deadline: float = DEADLINE, every: float = 0.01
) -> Any:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")


def held(blob_dir: Path, digest: str) -> int:
    """Bytes of `digest`'s part files in `blob_dir`."""
    stem = digest.replace(":", "-") + "."
    total = 0
    for path in blob_dir.glob(stem + "*") if blob_dir.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def settled(proxy: NetProxy) -> None:
    """Wait until the bytes through `proxy` stop moving: bytes it was still pushing towards a killed
    process are counted by then (they never reached it, and are not downloaded twice)."""
    last = [-1, time.monotonic()]

    def still() -> bool:
        now = proxy.bytes_down
        if now != last[0]:
            last[:] = [now, time.monotonic()]
        return time.monotonic() - last[1] >= 1.0

    wait_until(still, "the link to fall silent", every=0.1)


PULL_IN_CHILD = """
import sys
from pathlib import Path
from backends_app.oci import RegistryClient, RegistryConfig
client = RegistryClient(RegistryConfig(pull_part_size=1024 * 1024))
client.pull(sys.argv[1], Path(sys.argv[2]), blob_dir=Path(sys.argv[3]))
"""


def test_a_pull_killed_at_80_percent_of_its_largest_layer_resumes_with_little_downloaded_again(
    registry: RegistryServer, tmp_path: Path
) -> None:
    sizes = [3 * MiB, 3 * MiB, 3 * MiB, 9 * MiB]
    contents = [os.urandom(size) for size in sizes]
    layers = [layer_from_tar(make_tar([_file(f"part{i}", data)])) for i, data in enumerate(contents)]
    ref = registry.ref(registry.unique_repo("resume"))
    with registry.client() as client:
        push_image(client, ref, {"linux/amd64": layers})
    largest = max(layers, key=lambda layer: layer.size)
    image_size = sum(layer.size for layer in layers)
    blob_dir = tmp_path / "blobs"
    with NetProxy(registry.host, rtt_ms=10, rate_mbps=1.5) as proxy:
        proxied = ref.replace(registry.host, proxy.host)
        child = subprocess.Popen(
            [sys.executable, "-c", PULL_IN_CHILD, proxied, str(tmp_path / "first"), str(blob_dir)], cwd=REPO
        )
        try:
            wait_until(
                lambda: held(blob_dir, largest.digest) >= 0.8 * largest.size or child.poll() is not None,
                "80% of the largest layer",
            )
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL, "the pull ended before it could be killed"
        killed_at = held(blob_dir, largest.digest)
        assert 0.8 * largest.size <= killed_at < largest.size
        kept = sum(held(blob_dir, layer.digest) for layer in layers)
        settled(proxy)
        first = proxy.bytes_down

        with registry.client() as client:
            result = client.pull(proxied, tmp_path / "second", blob_dir=blob_dir)
        second = proxy.bytes_down - first

    for i, data in enumerate(contents):
        assert (result.dest / f"part{i}").read_bytes() == data
    # Downloaded again: what the second pull fetched beyond what was missing (headers and
    # manifests included).
    again = second - (image_size - kept)
    assert again <= 0.05 * image_size, (first, second, image_size, kept)
    assert result.bytes_downloaded <= image_size - kept + 0.05 * image_size


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_the_space_check_counts_the_layers_left_to_download_and_the_tree(
    registry: RegistryServer, gallery_factory: Any, settings: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    ref = registry.push_image(image("v1", extra={"lib/model.bin": os.urandom(2 * MiB)}))
    gallery_factory([{"name": "big-demo", "uri": ref}])
    backend = Backend.objects.lookup("big-demo")
    with registry.client() as client:
        resolved = client.resolve(ref)
    size = resolved.total_compressed_size
    # Half of the layer already downloaded by an earlier try, in the backend's blob directory.
    state = Path(settings.PORTAL_STATE_PATH)
    blob_dir = state / "staging" / "big-demo" / "blobs"
    blob_dir.mkdir(parents=True)
    digest = resolved.layers[0]
    data = registry.blob_path(digest.digest).read_bytes()
    (blob_dir / f"{digest.digest.replace(':', '-')}.0-{digest.size}").write_bytes(data[: size // 2])
    # A filesystem as full as its free space says: ask for more than there is.
    monkeypatch.setattr(procedure, "SPACE_MARGIN", 1 << 60)
    job, _ = backend.request(JobKind.INSTALL, queue=False)
    from backends_app import jobs

    job = jobs.run(job.pk)
    assert job.status == JobStatus.FAILED
    mib = (size - size // 2) / MiB
    assert f"{mib:.1f} MiB of layers to download" in job.error, job.error
    assert f"{size * procedure.UNPACK_RATIO / MiB:.1f} MiB estimated unpacked tree" in job.error
    assert held(blob_dir, digest.digest) == size // 2  # a refused job keeps what a retry resumes from


def _kill_all(pids: dict[int, str]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.django_db(transaction=True)
@pytest.mark.single_pass
def test_a_worker_killed_mid_download_is_restarted_and_finishes_the_same_job(
    registry: RegistryServer, gallery_factory: Any, settings: Any, tmp_path: Path
) -> None:
    payload = os.urandom(12 * MiB)
    ref = registry.push_image(image("v1", extra={"lib/model.bin": payload}))
    with registry.client() as client:
        resolved = client.resolve(ref)
    layer = max(resolved.layers, key=lambda d: d.size)
    image_size = resolved.total_compressed_size
    blob_dir = Path(settings.PORTAL_STATE_PATH) / "staging" / "big-demo" / "blobs"
    env = subprocess_env(PORTAL_WORKERS="1", PORTAL_PULL_PART_MIB="1", PORTAL_LOG_LEVEL="INFO")
    log = (tmp_path / "worker.log").open("ab")
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker() -> subprocess.Popen[bytes]:
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "worker"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=log,
            process_group=0,
        )
        workers.append(worker)
        return worker

    with NetProxy(registry.host, rtt_ms=10, rate_mbps=0.5) as proxy:
        gallery_factory([{"name": "big-demo", "uri": ref.replace(registry.host, proxy.host)}])
        backend = Backend.objects.lookup("big-demo")
        try:
            worker = start_worker()
            job, created = backend.request(JobKind.INSTALL, requested_by="test")
            assert created
            wait_until(lambda: held(blob_dir, layer.digest) >= 0.5 * layer.size, "half of the layer")
            # A power cut: the worker, its cluster and the process running the job, all at once.
            _kill_all(descendants(worker.pid))
            worker.wait(timeout=60)
            wait_until(lambda: not any(_alive(w) for w in workers), "the killed worker to be gone")
            job.refresh_from_db()
            assert job.status == JobStatus.RUNNING  # what the kill left behind
            done_before = held(blob_dir, layer.digest)
            assert done_before < layer.size
            settled(proxy)
            down_before = proxy.bytes_down

            start_worker()
            wait_until(
                lambda: UpgradeJob.objects.get(pk=job.pk).status not in JobStatus.ACTIVE,
                f"the job to end: {(tmp_path / 'worker.log').read_text(errors='replace')[-3000:]}",
                every=0.2,
            )
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=90)
                finally:
                    _kill_all(descendants(worker.pid) if worker.poll() is None else {})
        down_total = proxy.bytes_down

    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, (job.error, (tmp_path / "worker.log").read_text()[-3000:])
    assert job.restarts == 1
    messages = list(JobMessage.objects.filter(job=job).values_list("text", flat=True))
    assert UpgradeJob.RESUMED_MESSAGE in messages
    live = Path(settings.PORTAL_BACKENDS_PATH) / "big-demo"
    assert (live / "lib/model.bin").read_bytes() == payload
    assert json.loads((live / "metadata.json").read_text())["digest"] == resolved.digest
    assert not blob_dir.exists()  # installed: the parts are gone, and their directory
    # Downloaded again after the restart: beyond what was missing at the kill (headers, manifests,
    # the config and the bytes of the parts the kill cut included).
    again = (down_total - down_before) - (image_size - done_before)
    assert again <= 0.05 * image_size, (down_before, down_total, image_size, done_before)


def _alive(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is None
