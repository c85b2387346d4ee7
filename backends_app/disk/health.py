"""Health checks: could LocalAI run this backend? The default check, and an operator's command run in
its own process group with a deadline. A plain module: no ORM, no Django.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends_app.disk.fsops import StrPath
from backends_app.disk.layout import (
    METADATA_FILE,
    RUN_FILE,
    LayoutError,
    meta_target_problem,
    read_metadata,
    run_sh_state,
)

_HEALTH_OUTPUT_LINES = 20
_HEALTH_OUTPUT_CHARS = 2000


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str


def _default_health(backend_dir: Path, backends: Path, follow_meta: bool = True) -> HealthResult:
    if not backend_dir.is_dir():
        return HealthResult(False, f"{backend_dir} is not a directory")
    run = backend_dir / RUN_FILE
    if not os.path.lexists(run):
        if not os.path.lexists(backend_dir / METADATA_FILE):
            return HealthResult(False, "run.sh missing")
        try:
            metadata = read_metadata(backend_dir)
        except LayoutError as exc:
            return HealthResult(False, f"run.sh missing, and no usable metadata.json: {exc}")
        if not metadata.is_meta or not follow_meta:
            return HealthResult(False, "run.sh missing")
        if problem := meta_target_problem(backends, metadata.meta_backend_for):
            return HealthResult(False, problem)
        concrete = _default_health(backends / metadata.meta_backend_for, backends, follow_meta=False)
        return HealthResult(concrete.ok, f"meta backend for {metadata.meta_backend_for}: {concrete.detail}")
    present, executable, problem = run_sh_state(run)
    if not present or not executable:
        return HealthResult(False, problem)
    with run.open("rb") as handle:
        head = handle.read(4)
    # LocalAI execs run.sh directly: without one of these, exec fails with "exec format error".
    if not head.startswith((b"#!", b"\x7fELF")):
        return HealthResult(False, "run.sh starts with neither a #! line nor an ELF header")
    return HealthResult(True, "run.sh present and executable")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _output_tail(handle: Any) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 8 * _HEALTH_OUTPUT_CHARS))
    text = handle.read().decode(errors="replace")
    tail = "\n".join(text.splitlines()[-_HEALTH_OUTPUT_LINES:])
    return tail[-_HEALTH_OUTPUT_CHARS:]


def _command_health(backend_dir: Path, command: str, timeout: float) -> HealthResult:
    try:
        # Substitute after splitting, so a path with spaces stays one argument.
        argv = [arg.replace("{path}", str(backend_dir)) for arg in shlex.split(command)]
    except ValueError as exc:
        return HealthResult(False, f"health check command cannot be parsed: {exc}")
    if not argv:
        return HealthResult(False, "health check command is empty")
    with tempfile.TemporaryFile() as output:
        try:
            # A file, not a pipe, for output: a killed check's orphans cannot keep us waiting on EOF.
            process = subprocess.Popen(
                argv,
                cwd=backend_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return HealthResult(False, f"health check command {argv[0]!r} cannot start: {exc.strerror}")
        timed_out = False
        try:
            deadline = time.monotonic() + timeout
            delay = 0.005
            # Wait without reaping (WNOWAIT): while the leader is unreaped its pid, and so the
            # process group id, cannot be reused, so killing the group below is always safe.
            while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            # Kill the whole group: on timeout, and also whatever the check left running.
            _kill_group(process.pid)
            code = process.wait()
        tail = _output_tail(output)
    output_part = f"; output:\n{tail}" if tail else ""
    if timed_out:
        return HealthResult(False, f"timed out after {timeout:g} s; process group killed{output_part}")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return HealthResult(False, f"killed by signal {name}{output_part}")
    return HealthResult(code == 0, f"exit {code}{output_part}")


def health_check(
    backend_dir: StrPath,
    command: str | None = None,
    timeout: float = 30,
    *,
    backends_path: StrPath | None = None,
) -> HealthResult:
    """Check that LocalAI could run the backend in ``backend_dir``.

    The default check: ``run.sh`` is a regular, executable file starting with ``#!`` or an ELF
    header; for a meta directory (metadata.json alone), its ``meta_backend_for`` names a sibling in
    ``backends_path`` (default: ``backend_dir``'s parent) that passes the same check.

    With ``command``, it runs after the default check passes: split like a shell would (no shell
    involved), ``{path}`` replaced by ``backend_dir``, run in ``backend_dir`` in its own process
    group, killed with its group after ``timeout`` seconds; ok when it exits 0. ``detail`` gives the
    exit status and the last lines of output.
    """
    directory = Path(backend_dir)
    backends = Path(backends_path) if backends_path is not None else directory.parent
    result = _default_health(directory, backends)
    if not result.ok or command is None:
        return result
    return _command_health(directory, command, timeout)
