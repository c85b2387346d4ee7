"""`python -m bench`: every benchmark in turn; each writes its section of docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["bench.bench_pull", "bench.bench_check", "bench.bench_fleet", "bench.bench_gallery"]

if __name__ == "__main__":
    failed = [name for name in BENCHMARKS if subprocess.run([sys.executable, "-m", name]).returncode]
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")
