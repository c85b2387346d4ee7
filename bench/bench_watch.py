"""Benchmark of the worker's watch on its backends directory (``backends_app.disk.watch``).

Run: ``.venv/bin/python -m bench.bench_watch`` (``--backends N``, ``--rounds R``, ``--interval S``,
``--no-docs``).

Makes a backends directory of N backends (a directory with ``run.sh`` and ``metadata.json`` each)
and measures, over R rounds, the wall and CPU time of one snapshot (what the watch does every
``PORTAL_WATCH_INTERVAL`` seconds), of comparing two snapshots, and of the full ``layout.scan`` (what
a manual scan does: it reads and parses every metadata.json) for comparison. The share of one core
the watch costs is the snapshot's CPU time over the interval.

Results replace the section between ``<!-- bench:watch -->`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import write_section

BEGIN, END = "<!-- bench:watch -->", "<!-- /bench:watch -->"


def make_backends(root: Path, count: int) -> None:
    for index in range(count):
        backend = root / f"cpu-backend-{index:05d}"
        backend.mkdir()
        run = backend / "run.sh"
        run.write_text('#!/bin/sh\nexec ./bin/server "$@"\n')
        run.chmod(0o755)
        (backend / "metadata.json").write_text(
            json.dumps({"name": backend.name, "installed_at": "2026-01-01T00:00:00Z", "version": "1.0.0"})
        )


def measure(work: Callable[[], Any], rounds: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of `work` over `rounds` calls."""
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()

    from backends_app.disk import layout, watch

    base = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    try:
        root = base / "backends"
        root.mkdir()
        make_backends(root, args.backends)
        before = watch.snapshot(root)
        snap_wall, snap_cpu = measure(lambda: watch.snapshot(root), args.rounds)
        after = watch.snapshot(root)
        diff_wall, _ = measure(lambda: watch.changed(before, after), args.rounds)
        scan_wall, scan_cpu = measure(lambda: layout.scan(root), max(3, args.rounds // 5))
    finally:
        shutil.rmtree(base)
    share = snap_cpu / args.interval * 100
    lines = [
        f"### Watching the backends directory ({args.backends} backends, median of {args.rounds} rounds)",
        "",
        "| what | wall | CPU |",
        "| --- | --- | --- |",
        f"| one snapshot (3 `lstat` per backend) | {snap_wall * 1e3:.1f} ms | {snap_cpu * 1e3:.1f} ms |",
        f"| comparing two snapshots | {diff_wall * 1e3:.2f} ms | |",
        f"| full `layout.scan` (parses every metadata.json) | {scan_wall * 1e3:.1f} ms "
        f"| {scan_cpu * 1e3:.1f} ms |",
        "",
        f"A snapshot every {args.interval:g} s costs {share:.2f}% of one core.",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_docs:
        write_section(BEGIN, END, section)


if __name__ == "__main__":
    main()
