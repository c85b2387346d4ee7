"""Writing a benchmark's results into its section of docs/benchmarks.md, and the goals of a whole
``python -m bench`` run in one table."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
GOALS_FILE_ENV = "BENCH_GOALS_FILE"
GOALS_BEGIN, GOALS_END = "<!-- bench:goals -->", "<!-- /bench:goals -->"


def write_section(begin: str, end: str, section: str, docs: Path = DOCS, top: bool = False) -> None:
    """Replace the text between the ``begin`` and ``end`` markers, so each benchmark rewrites only
    its own numbers. Absent, the section is appended at the end, or with ``top`` put before the first
    benchmark's section (after the title and introduction)."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    text = (
        docs.read_text()
        if docs.exists()
        else "# Benchmarks\n\nNumbers measured on the project's 2-core machines.\n"
    )
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    elif top and "<!-- bench:" in text:
        head, _, tail = text.partition("<!-- bench:")
        text = head + block + "\n\n<!-- bench:" + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)
    print(f"written to docs/{docs.name}")


# -- goals ---------------------------------------------------------------------------------------


def record_goal(name: str, value: float, target: str, met: bool, unit: str = "") -> None:
    """Note one goal's measured value and verdict for the summary of ``python -m bench``: a JSON line
    appended to the file named by ``$BENCH_GOALS_FILE``; without it (a benchmark run alone), nothing."""
    path = os.environ.get(GOALS_FILE_ENV)
    if not path:
        return
    line = {"name": name, "value": value, "unit": unit, "target": target, "met": bool(met)}
    with open(path, "a") as goals:
        goals.write(json.dumps(line) + "\n")


def read_goals(path: Path) -> list[dict[str, Any]]:
    """The goals recorded in ``path`` (none if the file was never written)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class BenchmarkRun:
    """One benchmark command of ``python -m bench``: the goals it should record, where it recorded
    them, and its exit status (None: not run)."""

    command: str
    goals: list[str]
    goals_file: Path
    returncode: int | None = None


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1000:
        return str(int(value))
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"


def goals_section(runs: list[BenchmarkRun]) -> str:
    """The goals of one run of every benchmark as a Markdown table: measured value, target, verdict
    and the command that measured it. A goal its benchmark did not record (it failed or stopped
    first) is a row marked missing."""
    rows = []
    counts = {"met": 0, "not met": 0, "missing": 0}
    for run, name, goal in _goals_of(runs):
        if goal is None:
            if run.returncode is None:
                why = "not run"
            elif run.returncode:
                why = f"exit status {run.returncode}"
            else:
                why = "not recorded"
            rows.append(f"| {name} | | | **missing** ({why}) | `{run.command}` |")
            counts["missing"] += 1
            continue
        verdict = "met" if goal["met"] else "**NOT met**"
        counts["met" if goal["met"] else "not met"] += 1
        measured = f"{_number(goal['value'])}{goal['unit']}"
        rows.append(f"| {name} | {measured} | {goal['target']} | {verdict} | `{run.command}` |")
    failed = [f"`{run.command}` (exit status {run.returncode})" for run in runs if run.returncode]
    lines = [
        "## Goals",
        "",
        f"`python -m bench` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores): every goal as "
        "measured in that one run, by the benchmark named; its section below has the details.",
        f"{counts['met']} met, {counts['not met']} not met, {counts['missing']} missing.",
        "",
        "| goal | measured | target | verdict | benchmark |",
        "| --- | ---: | --- | --- | --- |",
        *rows,
    ]
    if failed:
        lines += ["", "Benchmarks that failed: " + ", ".join(failed) + "."]
    return "\n".join(lines) + "\n"


def goals_short_of_target(runs: list[BenchmarkRun]) -> list[str]:
    """The goals of ``runs`` not met, or not recorded at all."""
    return [name for _, name, goal in _goals_of(runs) if goal is None or not goal["met"]]


def _goals_of(runs: list[BenchmarkRun]) -> Iterator[tuple[BenchmarkRun, str, dict[str, Any] | None]]:
    """Every goal of ``runs``: those each should record (None where it did not), then any others
    it recorded."""
    for run in runs:
        recorded = {goal["name"]: goal for goal in read_goals(run.goals_file)}
        for name in run.goals + [name for name in recorded if name not in run.goals]:
            yield run, name, recorded.get(name)


def report_goals(runs: list[BenchmarkRun], docs: Path | None = DOCS) -> str:
    """Print the goals table and write it between the ``bench:goals`` markers of ``docs`` (near the
    top; None: print only)."""
    section = goals_section(runs)
    print()
    print(section)
    if docs is not None:
        write_section(GOALS_BEGIN, GOALS_END, section, docs, top=True)
    return section
