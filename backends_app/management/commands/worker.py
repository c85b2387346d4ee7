"""`manage.py worker`: a django-q2 worker for this node, reconciled at start and heartbeating."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from backends_app import procedure
from backends_app.models import Node

HEARTBEAT_SECONDS = 30


class Command(BaseCommand):
    help = (
        "Recover interrupted operations and record the backends directory, then run a django-q2 "
        "cluster until stopped, heartbeating for this node."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="Reconcile and exit (no cluster).")

    def handle(self, *args: Any, once: bool, **options: Any) -> None:
        node = Node.local()
        node.heartbeat()
        report = procedure.reconcile(node)
        self.stdout.write(f"{node.name}: {report.summary()}")
        if once:
            return
        cluster = subprocess.Popen([sys.executable, "manage.py", "qcluster"], env=os.environ.copy())
        stop = threading.Event()

        def forward(signum: int, _frame: Any) -> None:
            stop.set()
            if cluster.poll() is None:
                cluster.send_signal(signum)

        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGTERM, forward)
        next_beat = time.monotonic() + HEARTBEAT_SECONDS
        while not stop.wait(1) and cluster.poll() is None:
            if time.monotonic() >= next_beat:
                node.heartbeat()
                next_beat = time.monotonic() + HEARTBEAT_SECONDS
        code = cluster.wait()
        if code and not stop.is_set():
            sys.exit(code)
