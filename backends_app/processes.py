"""The child processes of `manage.py serve` and `manage.py worker`: started, watched and stopped.

Each child runs in a process group of its own, so that stopping it reaches everything it forked
(django-q2's cluster forks a sentinel, which forks the pool, the pusher and the monitor) and a
terminal's Ctrl-C reaches only the parent, which then stops its children in order. Each child also
gets a death signal (Linux ``PR_SET_PDEATHSIG``): if its parent dies, even by SIGKILL, the kernel
signals the child, so no child outlives the process that started it.

Stopping is bounded: the group is asked to stop with a signal, given a grace period
(``PORTAL_SHUTDOWN_GRACE``), then killed. A child that has exited is reaped only after its group has
been swept, so its pid, and with it the group id, cannot have been reused by an unrelated process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.1


def set_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signum))


def start(argv: Sequence[str], *, death_signal: int = signal.SIGTERM, **popen: Any) -> subprocess.Popen[Any]:
    """Start `argv` in a new process group, signalled with `death_signal` if this process dies.

    The parent may die between the fork and the ``prctl``; the child checks for that afterwards
    and exits at once rather than run without a parent.
    """
    parent = os.getpid()

    def prepare() -> None:  # in the child, between fork and exec
        set_death_signal(death_signal)
        if os.getppid() != parent:
            os._exit(1)

    return subprocess.Popen(list(argv), process_group=0, preexec_fn=prepare, **popen)


def has_exited(process: subprocess.Popen[Any]) -> bool:
    """Whether the child has exited, without reaping it: its pid and process group stay reserved."""
    if process.returncode is not None:
        return True
    try:
        found = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return found is not None


def signal_group(process: subprocess.Popen[Any], signum: int) -> None:
    """Send `signum` to the child's whole process group (nothing if it is already reaped)."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum)


def stop(processes: Sequence[subprocess.Popen[Any]], signum: int, grace: float) -> list[int | None]:
    """Stop the children: `signum` to each, then SIGKILL to whatever is left of their process
    groups after `grace` seconds.

    The polite signal goes to the child alone, which stops what it started in its own order (a
    django-q2 cluster finishes with its pool, then its pusher and monitor; a signal to all of them
    at once would cut that short). Every child gets it at the same moment, so they stop in parallel
    and the whole stop takes at most about `grace` seconds. Returns each child's exit status
    (negative: the signal that ended it).
    """
    for process in processes:
        if not has_exited(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)
    deadline = time.monotonic() + max(0.0, grace)
    while time.monotonic() < deadline and not all(has_exited(p) for p in processes):
        time.sleep(POLL_SECONDS)
    for process in processes:
        if not has_exited(process):
            log.warning(
                "%s still running %.0f s after %s: killing its process group",
                _describe(process),
                grace,
                signal.Signals(signum).name,
            )
        # Also sweeps what an exited leader left behind in its group (forked helpers).
        signal_group(process, signal.SIGKILL)
    return [process.wait() for process in processes]


def _describe(process: subprocess.Popen[Any]) -> str:
    args = process.args if isinstance(process.args, list | tuple) else [process.args]
    shown = [str(arg) for arg in args[1:4]]
    return f"{' '.join(shown)} (pid {process.pid})"
