"""The goals summary of ``python -m bench``: what each benchmark records, and the table printed at the
end and written near the top of docs/benchmarks.md (here a copy in a temporary directory)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from bench.report import (
    GOALS_BEGIN,
    GOALS_END,
    GOALS_FILE_ENV,
    BenchmarkRun,
    goals_short_of_target,
    record_goal,
    report_goals,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = """# Benchmarks

Numbers measured on the project's 2-core machines.

<!-- bench:pull -->
## Pull, verify and unpack

Ratio ours/baseline: **0.70**.
<!-- /bench:pull -->
"""


def row(table: str, name: str) -> list[str]:
    """The cells of the table row of goal ``name``."""
    lines = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    assert len(lines) == 1, f"{name!r} has {len(lines)} rows in:\n{table}"
    return [cell.strip() for cell in lines[0].strip("|").split("|")]


def test_the_table_shows_values_targets_verdicts_and_missing_goals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pull, check = tmp_path / "pull.jsonl", tmp_path / "check.jsonl"
    monkeypatch.setenv(GOALS_FILE_ENV, str(pull))
    record_goal("pull on loopback: ours / (skopeo + tar)", 0.7012, "<= 0.6", False)
    record_goal("pull on loopback: peak RSS", 57.4, "< 200 MB", True, " MB")
    record_goal("an extra goal", 3.0, ">= 2x", True, "x")
    monkeypatch.setenv(GOALS_FILE_ENV, str(check))
    record_goal("upgrade check on loopback: ours vs skopeo inspect", 123.4, ">= 20x", True, "x")
    runs = [
        BenchmarkRun(
            "bench.bench_pull",
            ["pull on loopback: ours / (skopeo + tar)", "pull on loopback: peak RSS"],
            pull,
            0,
        ),
        # Exited non-zero after its first goal: the other two are missing, not left out.
        BenchmarkRun(
            "bench.bench_check",
            [
                "upgrade check on loopback: ours vs skopeo inspect",
                "upgrade check on loopback: ours vs a HEAD loop",
                "upgrade check on loopback: manifest GETs when nothing changed",
            ],
            check,
            1,
        ),
        # Failed before recording anything: its file was never written.
        BenchmarkRun("bench.bench_gallery", ["gallery sync: peak RSS"], tmp_path / "none.jsonl", 2),
        BenchmarkRun("bench.bench_watch", [], tmp_path / "watch.jsonl", 0),
    ]
    docs = tmp_path / "benchmarks.md"
    docs.write_text(DOCS)

    report_goals(runs, docs)
    printed = capsys.readouterr().out

    assert row(printed, "pull on loopback: ours / (skopeo + tar)") == [
        "pull on loopback: ours / (skopeo + tar)",
        "0.70",
        "<= 0.6",
        "**NOT met**",
        "`bench.bench_pull`",
    ]
    assert row(printed, "pull on loopback: peak RSS")[1:4] == ["57.4 MB", "< 200 MB", "met"]
    assert row(printed, "an extra goal")[1:4] == ["3x", ">= 2x", "met"]
    assert row(printed, "upgrade check on loopback: ours vs skopeo inspect")[1:5] == [
        "123x",
        ">= 20x",
        "met",
        "`bench.bench_check`",
    ]
    assert row(printed, "upgrade check on loopback: ours vs a HEAD loop")[1:4] == [
        "",
        "",
        "**missing** (exit status 1)",
    ]
    assert row(printed, "upgrade check on loopback: manifest GETs when nothing changed")[3] == (
        "**missing** (exit status 1)"
    )
    assert row(printed, "gallery sync: peak RSS")[3:] == [
        "**missing** (exit status 2)",
        "`bench.bench_gallery`",
    ]
    assert "bench.bench_watch" not in printed
    assert "3 met, 1 not met, 3 missing." in printed
    assert (
        "Benchmarks that failed: `bench.bench_check` (exit status 1), `bench.bench_gallery` (exit status 2)."
        in (printed)
    )

    # What makes `make bench` exit non-zero besides a failed benchmark: the unmet and missing goals.
    assert goals_short_of_target(runs) == [
        "pull on loopback: ours / (skopeo + tar)",
        "upgrade check on loopback: ours vs a HEAD loop",
        "upgrade check on loopback: manifest GETs when nothing changed",
        "gallery sync: peak RSS",
    ]
    assert goals_short_of_target(runs[:1] + runs[3:]) == ["pull on loopback: ours / (skopeo + tar)"]

    # The same table in the docs, between its markers, after the introduction and before the
    # first benchmark's section, which is left as it was.
    text = docs.read_text()
    goals = text[text.index(GOALS_BEGIN) : text.index(GOALS_END)]
    assert row(goals, "pull on loopback: ours / (skopeo + tar)") == row(
        printed, "pull on loopback: ours / (skopeo + tar)"
    )
    assert row(goals, "gallery sync: peak RSS")[3] == "**missing** (exit status 2)"
    assert text.startswith(
        "# Benchmarks\n\nNumbers measured on the project's 2-core machines.\n\n" + GOALS_BEGIN
    )
    assert text.index(GOALS_END) < text.index("<!-- bench:pull -->")
    assert text.endswith(DOCS[DOCS.index("<!-- bench:pull -->") :])

    # A second run replaces the table instead of adding another.
    check.unlink()
    report_goals(runs, docs)
    text = docs.read_text()
    assert text.count(GOALS_BEGIN) == 1
    assert row(text, "upgrade check on loopback: ours vs skopeo inspect")[3] == "**missing** (exit status 1)"


def test_without_the_variable_a_benchmark_records_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(GOALS_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    record_goal("pull on loopback: peak RSS", 57.4, "< 200 MB", True, " MB")
    assert list(tmp_path.iterdir()) == []


def recorded_names(module: str) -> set[str]:
    """The goal names a benchmark module passes to ``record_goal``, read from its source."""
    tree = ast.parse((ROOT / "bench" / f"{module.removeprefix('bench.')}.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "record_goal"
        and isinstance(node.args[0], ast.Constant)
    }


def test_every_goal_python_m_bench_expects_is_one_its_benchmark_records() -> None:
    expected: dict[str, set[str]] = {}
    for command, goals in BENCHMARKS:
        expected.setdefault(command[0], set()).update(goals)
    for module, goals in expected.items():
        assert goals == recorded_names(module), module
    # and every module that records goals is run by `python -m bench`
    for path in (ROOT / "bench").glob("bench_*.py"):
        if re.search(r"\brecord_goal\(", path.read_text()):
            assert f"bench.{path.stem}" in expected


def test_a_benchmark_run_under_python_m_bench_appends_its_goals(tmp_path: Path) -> None:
    """record_goal from a child process, as each benchmark runs, appends to the file it is given."""
    goals = tmp_path / "goals.jsonl"
    code = (
        "from bench.report import record_goal\n"
        "record_goal('a', 1.5, '<= 2', True)\n"
        "record_goal('b', 250.0, '< 200 MB', False, ' MB')\n"
    )
    for _ in range(2):
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env={GOALS_FILE_ENV: str(goals)}, check=True, timeout=60
        )
    lines = goals.read_text().splitlines()
    assert len(lines) == 4
    run = BenchmarkRun("bench.x", ["a", "b"], goals, 0)
    section = report_goals([run], None)
    assert row(section, "b")[1:4] == ["250 MB", "< 200 MB", "**NOT met**"]
