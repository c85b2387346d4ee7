"""What tests that start servers and processes share: free ports, waiting on a condition, and
children that do not outlive the test run."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

# Seconds: a process's start and a job's run on a loaded 2-core machine fit well inside this.
DEADLINE = 120.0


def free_port(bind: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at the moment, on ``bind``."""
    with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as sock:
        sock.bind((bind, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the test process dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_until(condition: Callable[[], _T], what: str, deadline: float = DEADLINE) -> _T:
    """Poll ``condition`` every 0.2 s until it returns something true, and return that."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")
