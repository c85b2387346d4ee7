"""`python -m bench`: every benchmark in turn; each writes its section of docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

LINK = "40:25"  # an internet-like link: 40 ms round trip, 25 MB/s per connection
BENCHMARKS = [
    ["bench.bench_pull"],
    ["bench.bench_publish"],
    ["bench.bench_check"],
    ["bench.bench_fleet"],
    ["bench.bench_gallery"],
    ["bench.bench_netproxy"],
    ["bench.bench_signatures"],
    ["bench.bench_signatures", "--via-proxy", LINK],
    ["bench.bench_watch"],
    # A 1 GiB backend in 4 gzip layers through the link, with a kill at 80% and a resume.
    ["bench.bench_pull", "--size-mib", "1024", "--via-proxy", LINK],
    # LocalAI's concrete gallery is about 900 images: the check of all of them through the link.
    ["bench.bench_check", "--backends", "900", "--rounds", "3", "--via-proxy", LINK],
    ["bench.bench_http2", "--tags", "900", "--rounds", "3", "--via-proxy", LINK],
]

if __name__ == "__main__":
    failed = [
        " ".join(command)
        for command in BENCHMARKS
        if subprocess.run([sys.executable, "-m", *command]).returncode
    ]
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
