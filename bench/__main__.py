"""`python -m bench`: every benchmark in turn; each writes its section of docs/benchmarks.md.

Each benchmark notes its goals (``bench.report.record_goal``) in a file of its own, named to it by
``$BENCH_GOALS_FILE``; at the end every goal of this run is printed with its target and verdict and
written between the ``bench:goals`` markers near the top of docs/benchmarks.md. A goal a benchmark
did not record shows as missing. A benchmark exits non-zero only when it could not measure; the run
exits non-zero when a benchmark failed or a goal is not met or missing, after the table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import GOALS_FILE_ENV, BenchmarkRun, goals_short_of_target, report_goals

LINK = "40:25"  # an internet-like link: 40 ms round trip, 25 MB/s per connection
# Each command, and the names of the goals it records (none: it has no goal).
BENCHMARKS: list[tuple[list[str], list[str]]] = [
    (
        ["bench.bench_pull"],
        ["pull on loopback: ours / (skopeo + tar)", "pull on loopback: peak RSS"],
    ),
    (["bench.bench_publish"], ["publish on loopback: ours / previous uploader"]),
    (
        ["bench.bench_check"],
        [
            "upgrade check on loopback: ours vs skopeo inspect",
            "upgrade check on loopback: ours vs a HEAD loop",
            "upgrade check on loopback: manifest GETs when nothing changed",
        ],
    ),
    (["bench.bench_fleet"], []),
    (["bench.bench_gallery"], ["gallery sync: first sync time", "gallery sync: peak RSS"]),
    (["bench.bench_netproxy"], []),
    (["bench.bench_signatures"], []),
    (["bench.bench_signatures", "--via-proxy", LINK], []),
    (["bench.bench_watch"], []),
    # A 1 GiB backend in 4 gzip layers through the link, with a kill at 80% and a resume.
    (
        ["bench.bench_pull", "--size-mib", "1024", "--via-proxy", LINK],
        [
            "pull through the link: ours / (skopeo to oci: + tar)",
            "pull through the link: peak RSS",
            "pull through the link: downloaded again after a kill at 80%",
        ],
    ),
    # LocalAI's concrete gallery is about 900 images: the check of all of them through the link.
    (
        ["bench.bench_check", "--backends", "900", "--rounds", "3", "--via-proxy", LINK],
        [
            "upgrade check through the link: ours vs skopeo inspect",
            "upgrade check through the link: ours vs a HEAD loop",
            "upgrade check through the link: manifest GETs when nothing changed",
        ],
    ),
    (["bench.bench_http2", "--tags", "900", "--rounds", "3", "--via-proxy", LINK], []),
]


def main() -> int:
    runs: list[BenchmarkRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-goals-") as tmp:
        for number, (command, goals) in enumerate(BENCHMARKS):
            run = BenchmarkRun(" ".join(command), goals, Path(tmp) / f"{number:02d}.jsonl")
            env = {**os.environ, GOALS_FILE_ENV: str(run.goals_file)}
            run.returncode = subprocess.run([sys.executable, "-m", *command], env=env).returncode
            runs.append(run)
        report_goals(runs)
        short = goals_short_of_target(runs)
    failed = [run.command for run in runs if run.returncode]
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
    if short:
        print(f"goals not met or missing: {'; '.join(short)}", file=sys.stderr)
    return 1 if failed or short else 0


if __name__ == "__main__":
    sys.exit(main())
