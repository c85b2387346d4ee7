"""Benchmark: how a fleet-wide install, check and upgrade grow with the number of worker nodes.

Run: ``.venv/bin/python -m bench.bench_fleet`` (``--nodes 1,2,4,8``, ``--backends 4,12``, ``--size-mib 2``,
``--no-docs``).

It starts its own ``docker-registry`` on loopback and uses a throwaway PostgreSQL database
(``bench_fleet`` on ``BENCH_DATABASE_URL``, default the local server), then for each fleet size N
starts N real worker processes (``manage.py worker --node nK --backends-path ...``, one job worker
each), and times, from this process as a web replica would ask:

* a fleet-wide install of every backend on every node (one fan-out parent job per backend);
* a fleet-wide check after every tag moved (``detection.find_upgrades()``: one HEAD per distinct tag, then
  the platform manifests, for every node's installed backends);
* a fleet-wide upgrade of every backend (fan-out again; each node pulls and swaps on its own disk).

The baseline is the same work (same number of backends) on one node, in the same run: the table
gives each size's time and its ratio to one node. Results replace the section between
``<!-- bench:fleet -->`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:fleet -->", "<!-- /bench:fleet -->"
DEADLINE = 600.0


def setup_django(database_url: str, workdir: Path) -> None:
    import psycopg

    admin_url, _, name = database_url.rpartition("/")
    with psycopg.connect(f"{admin_url}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = database_url
    os.environ["PORTAL_DATA_DIR"] = str(workdir / "data")
    os.environ["PORTAL_GALLERIES"] = "bench=file:///nonexistent/index.yaml"
    os.environ["PORTAL_LOG_LEVEL"] = "WARNING"
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def publish(registry: Any, repo: str, backends: int, version: str, size: int) -> list[str]:
    """One image per backend, each with `size` bytes of incompressible data; returns the references."""
    refs = []
    for index in range(backends):
        files = {
            "run.sh": (f"#!/bin/sh\necho {version}\n", 0o755),
            "lib/version.txt": version,
            "lib/blob.bin": os.urandom(size),
        }
        refs.append(registry.push_image(files, repo=repo, tag=f"b{index}"))
    return refs


def wait_for(condition: Any, what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def start_workers(count: int, workdir: Path) -> list[subprocess.Popen[bytes]]:
    workers = []
    for index in range(count):
        root = workdir / f"n{index}"
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "worker",
                    "--node",
                    f"n{index}",
                    "--backends-path",
                    str(root / "backends"),
                    "--workers",
                    "1",
                ],
                cwd=ROOT,
                env=os.environ.copy(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    return workers


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for worker in workers:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def fan_out(kind: str, names: list[str], nodes: Any) -> float:
    """Fan `kind` out for every backend; the seconds until every parent job has ended."""
    from backends_app.models import Backend, JobStatus, UpgradeJob

    start = time.perf_counter()
    parents = [
        Backend.objects.lookup(name).fan_out(kind, nodes=nodes, requested_by="bench")[0].pk for name in names
    ]
    wait_for(
        lambda: not UpgradeJob.objects.filter(pk__in=parents, status__in=JobStatus.ACTIVE).exists(),
        f"{kind} of {len(names)} backends",
    )
    elapsed = time.perf_counter() - start
    failed = UpgradeJob.objects.filter(pk__in=parents).exclude(status=JobStatus.SUCCEEDED)
    if failed.exists():
        raise RuntimeError(f"{kind} failed: {[(j.pk, j.status, j.error) for j in failed]}")
    return elapsed


def measure(size_nodes: int, names: list[str], workdir: Path, registry: Any, repo: str, args: Any) -> dict:
    from django_q.models import OrmQ

    from backends_app import detection
    from backends_app.models import InstalledVersion, Node, UpgradeJob

    UpgradeJob.objects.all().delete()
    InstalledVersion.objects.all().delete()
    Node.objects.all().delete()
    OrmQ.objects.all().delete()
    publish(registry, repo, len(names), "v1", args.size_mib << 20)
    round_dir = workdir / f"fleet-{size_nodes}"
    workers = start_workers(size_nodes, round_dir)
    try:
        wait_for(
            lambda: Node.objects.filter(last_heartbeat_at__isnull=False).count() == size_nodes,
            "the workers to register",
            120,
        )
        nodes = list(Node.objects.all())
        install = fan_out("install", names, nodes)
        publish(registry, repo, len(names), "v2", args.size_mib << 20)
        start = time.perf_counter()
        report = detection.find_upgrades()
        check = time.perf_counter() - start
        flagged = sum(1 for row in report.rows if row["upgrade_available"])
        if flagged != len(names) * size_nodes:
            raise RuntimeError(f"the check flagged {flagged}, expected {len(names) * size_nodes}")
        upgrade = fan_out("upgrade", names, None)
    finally:
        stop_workers(workers)
        shutil.rmtree(round_dir, ignore_errors=True)
    return {
        "nodes": size_nodes,
        "backends": len(names),
        "install": install,
        "check": check,
        "upgrade": upgrade,
    }


def write_docs(results: list[dict], args: Any) -> str:
    base = {row["backends"]: row for row in results if row["nodes"] == min(r["nodes"] for r in results)}
    lines = [
        BEGIN,
        "## Fleet-wide install, check and upgrade by number of nodes",
        "",
        f"`python -m bench.bench_fleet` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"{platform.python_version()}, PostgreSQL, registry on loopback). Each node is a real worker "
        f"process (`manage.py worker --node nK`, one job worker each) with its own backends directory; "
        f"backends of {args.size_mib} MiB (incompressible) each; one fan-out parent job "
        "per backend, asked from the benchmark process as a web replica would. Baseline: one node, "
        f"same run. Load average when it ended: {os.getloadavg()[0]:.1f} (2 cores shared with every "
        "node's processes, so the ratios, not the absolute times, are the result).",
        "",
        "| nodes | backends | copies | install | check | upgrade | install / 1 node | check / 1 node "
        "| upgrade / 1 node |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        one = base[row["backends"]]
        lines.append(
            f"| {row['nodes']} | {row['backends']} | {row['nodes'] * row['backends']} | "
            f"{row['install']:.2f} s | {row['check']:.2f} s | {row['upgrade']:.2f} s | "
            f"{row['install'] / one['install']:.2f} | "
            f"{row['check'] / one['check']:.2f} | {row['upgrade'] / one['upgrade']:.2f} |"
        )
    lines += [
        "",
        "The check costs one HEAD per distinct tag whatever the number of nodes, then one platform "
        "lookup per tag that moved and platform in use, so it grows far slower than the fleet. Installs "
        "and upgrades run in parallel on the nodes, bounded here by the machine's 2 cores and one disk "
        "shared by every node: on separate machines each node brings its own.",
        END,
    ]
    section = "\n".join(lines)
    if not args.no_docs:
        text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
        if BEGIN in text:
            head, _, rest = text.partition(BEGIN)
            text = head + section + rest.partition(END)[2]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        DOCS.write_text(text)
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--backends", default="4,12")
    parser.add_argument("--size-mib", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    sizes = [int(n) for n in args.nodes.split(",")]
    database_url = os.environ.get("BENCH_DATABASE_URL", "postgres://root@127.0.0.1:5432/bench_fleet")
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        workdir = Path(tmp)
        setup_django(database_url, workdir)
        from backends_app.models import Gallery
        from tests.registry import RegistryServer

        registry = RegistryServer(workdir / "registry").start()
        try:
            repo = "bench/fleet"
            counts = [int(n) for n in args.backends.split(",")]
            names = [f"cpu-bench-{index}" for index in range(max(counts))]
            index = workdir / "index.yaml"
            index.write_text(
                "".join(
                    f"- name: {name}\n  uri: {registry.host}/{repo}:b{i}\n" for i, name in enumerate(names)
                )
            )
            gallery, _ = Gallery.objects.update_or_create(name="bench", defaults={"url": index.as_uri()})
            gallery.sync(force=True)
            results = []
            for count in counts:
                for size in sizes:
                    row = measure(size, names[:count], workdir, registry, repo, args)
                    results.append(row)
                    print(
                        f"{size} node(s), {count} backends: install {row['install']:.2f} s, "
                        f"check {row['check']:.2f} s, upgrade {row['upgrade']:.2f} s",
                        flush=True,
                    )
        finally:
            registry.stop()
    print(write_docs(results, args))


if __name__ == "__main__":
    main()
