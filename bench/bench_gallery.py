"""Benchmark: syncing a 50,000-entry gallery index into the embedded SQLite database.

Run: ``.venv/bin/python -m bench.bench_gallery`` (``--entries``, ``--no-docs``).

The index is LocalAI's real one (``fixtures/localai-index.yaml``: 1033 entries, anchors and merge
keys throughout) repeated, with its anchors and names renamed in each copy, until it has
``--entries`` entries. Each side runs in a fresh child process, so its peak RSS (``VmHWM``) is its
own:

* ours: ``Gallery.sync()`` of the file into a fresh SQLite database (migrated first, untimed),
  then a forced second sync of the unchanged file (fetched, parsed, compared, nothing written).
  Meanwhile another process writes a row every 50 ms (a node heartbeat, what a worker writes) and
  records how long each write waited for the database: the portal answering during the sync;
* ours, parse only: ``gallery.parse()`` of the same text, bounds checked, entries validated;
* baseline: ``yaml.load(text, Loader=yaml.CSafeLoader)``, i.e. ``yaml.safe_load`` with libyaml:
  the same file read into Python objects, nothing checked or stored.

Results replace the section between ``<!-- bench:gallery -->`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import record_goal

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
FIXTURE = ROOT.parent / "shared" / "fixtures" / "localai-index.yaml"
BEGIN, END = "<!-- bench:gallery -->", "<!-- /bench:gallery -->"
GOAL_SECONDS, GOAL_MIB = 60.0, 500.0
WRITE_EVERY = 0.05


# --------------------------------------------------------------------------- the index


def build_index(entries: int, path: Path) -> tuple[int, int]:
    """Write LocalAI's index repeated up to `entries` entries; returns (entries, bytes)."""
    text = FIXTURE.read_text()
    body = text.split("\n---\n", 1)[1]
    chunks = re.split(r"(?m)^(?=- )", body)
    header, items = chunks[0], chunks[1:]
    written = 0
    with path.open("w") as out:
        out.write(header)
        copy = 0
        while written < entries:
            for item in items:
                if written == entries:
                    break
                if copy:
                    item = re.sub(r"([&*])([A-Za-z0-9_.-]+)", rf"\1\2-c{copy}", item)
                    item = re.sub(r'(?m)^((?:- |  )name: )"([^"]*)"', rf'\1"\2-c{copy}"', item)
                    item = re.sub(r"(?m)^((?:- |  )name: )([^\"'\s][^\n]*)$", rf"\1\2-c{copy}", item)
                out.write(item)
                written += 1
            copy += 1
    return written, path.stat().st_size


# --------------------------------------------------------------------------- children


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _setup_django(workdir: Path) -> None:
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["PORTAL_DATA_DIR"] = str(workdir / "data")
    os.environ["PORTAL_GALLERIES"] = "bench=file:///nonexistent/index.yaml"
    os.environ["PORTAL_LOG_LEVEL"] = "WARNING"
    os.environ["DJANGO_SETTINGS_MODULE"] = "portal.settings"
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def child_migrate(workdir: Path) -> dict[str, Any]:
    _setup_django(workdir)
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    from backends_app.models import Node

    Node.local()
    return {}


def child_sync(workdir: Path, index: Path) -> dict[str, Any]:
    _setup_django(workdir)
    from backends_app.models import Gallery

    gallery = Gallery.objects.create(name="big", url=index.as_uri())
    started = time.monotonic()
    first = gallery.sync(force=True)
    first_seconds = time.monotonic() - started
    hwm_first = _vm_hwm_mib()
    started = time.monotonic()
    second = gallery.sync(force=True)
    second_seconds = time.monotonic() - started
    if not first.ok or not second.ok:
        raise SystemExit(first.error or second.error)
    return {
        "first_s": first_seconds,
        "second_s": second_seconds,
        "created": first.created,
        "second_written": second.created + second.updated + second.gone,
        "hwm_first_mib": hwm_first,
        "hwm_mib": _vm_hwm_mib(),
    }


def child_writer(workdir: Path, stop: Path) -> dict[str, Any]:
    _setup_django(workdir)
    from backends_app.models import Node

    node = Node.local()
    waits = []
    while not stop.exists():
        started = time.monotonic()
        node.heartbeat()
        waits.append((time.monotonic() - started) * 1000)
        time.sleep(WRITE_EVERY)
    waits.sort()
    return {
        "writes": len(waits),
        "max_ms": waits[-1] if waits else 0.0,
        "p99_ms": waits[int(len(waits) * 0.99)] if waits else 0.0,
        "median_ms": waits[len(waits) // 2] if waits else 0.0,
    }


def child_parse(index: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from backends_app import gallery

    text = index.read_text()
    started = time.monotonic()
    entries = gallery.parse(text, max_entries=10**9, max_nodes=10**9)
    return {"seconds": time.monotonic() - started, "entries": len(entries), "hwm_mib": _vm_hwm_mib()}


def child_baseline(index: Path) -> dict[str, Any]:
    import yaml

    text = index.read_text()
    started = time.monotonic()
    items = yaml.load(text, Loader=yaml.CSafeLoader)  # libyaml's safe loader
    return {"seconds": time.monotonic() - started, "entries": len(items), "hwm_mib": _vm_hwm_mib()}


def run_child(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.bench_gallery", "--child", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def result_of(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate()
    if process.returncode:
        raise SystemExit(f"benchmark child failed ({process.returncode})")
    return dict(json.loads(out.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- report


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)


def report(
    entries: int,
    size: int,
    ours: dict[str, Any],
    writer: dict[str, Any],
    parse: dict[str, Any],
    base: dict[str, Any],
) -> str:
    load = os.getloadavg()[0]
    ok_time = "met" if ours["first_s"] < GOAL_SECONDS else "MISSED"
    ok_memory = "met" if ours["hwm_mib"] < GOAL_MIB else "MISSED"
    created = f"{ours['created']:,}"
    first = f"{ours['first_s']:.1f} s | {ours['hwm_first_mib']:.0f} MiB"
    second = f"{ours['second_s']:.1f} s | {ours['hwm_mib']:.0f} MiB"
    return f"""## Gallery sync of {entries:,} entries

`python -m bench.bench_gallery` ({time.strftime("%Y-%m-%d")}, {os.cpu_count()} cores, Python
{platform.python_version()}, SQLite, load average {load:.1f} when it started). The index is LocalAI's
real one repeated with renamed anchors and names: {entries:,} entries, {size / 1e6:.1f} MB, anchors and
merge keys as in the original. Each side runs in its own fresh process; peak RSS is its `VmHWM`.

| | wall time | peak RSS |
| --- | --- | --- |
| ours: `Gallery.sync()`, first sync ({created} rows created) | {first} |
| ours: forced sync of the unchanged file ({ours["second_written"]} rows written) | {second} |
| ours: `gallery.parse()` alone | {parse["seconds"]:.1f} s | {parse["hwm_mib"]:.0f} MiB |
| baseline: `yaml.load(text, Loader=yaml.CSafeLoader)` | {base["seconds"]:.1f} s | {base["hwm_mib"]:.0f} MiB |

Goals: under {GOAL_SECONDS:.0f} s ({ok_time}) and under {GOAL_MIB:.0f} MB ({ok_memory}).
The portal answering meanwhile: another process wrote a row every {WRITE_EVERY * 1000:.0f} ms during
both syncs; {writer["writes"]} writes, median wait {writer["median_ms"]:.0f} ms, 99th percentile
{writer["p99_ms"]:.0f} ms, longest {writer["max_ms"]:.0f} ms (SQLite's busy timeout is 30 s).

Where the time goes: parsing reads the document event by event and checks its bounds as it goes
(faster and far smaller than building the whole YAML tree, as the baseline does); storing writes
500 entries per transaction and then leaves SQLite's write lock free for 110 ms, longer than the
100 ms at which a waiting writer retries, so every other writer gets in between two batches. Most
of the first sync is Django preparing 50,000 rows of JSON fields for `bulk_create` and those pauses;
a forced sync of an unchanged index compares rows and writes nothing.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, *rest = args.child
        paths = [Path(item) for item in rest]
        children: dict[str, Any] = {
            "migrate": child_migrate,
            "sync": child_sync,
            "writer": child_writer,
            "parse": child_parse,
            "baseline": child_baseline,
        }
        print(json.dumps(children[mode](*paths)))
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-gallery-"))
    index = workdir / "index.yaml"
    entries, size = build_index(args.entries, index)
    print(f"index: {entries} entries, {size / 1e6:.1f} MB", flush=True)
    result_of(run_child("migrate", str(workdir)))
    stop = workdir / "stop"
    writer = run_child("writer", str(workdir), str(stop))
    ours = result_of(run_child("sync", str(workdir), str(index)))
    stop.touch()
    waits = result_of(writer)
    parse = result_of(run_child("parse", str(index)))
    base = result_of(run_child("baseline", str(index)))
    section = report(entries, size, ours, waits, parse, base)
    first_s, hwm_mib = ours["first_s"], ours["hwm_mib"]
    record_goal(
        "gallery sync: first sync time", first_s, f"< {GOAL_SECONDS:.0f} s", first_s < GOAL_SECONDS, " s"
    )
    record_goal("gallery sync: peak RSS", hwm_mib, f"< {GOAL_MIB:.0f} MiB", hwm_mib < GOAL_MIB, " MiB")
    print(section)
    if not args.no_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
