"""`manage.py serve`: the ASGI web server and a django-q2 worker together, both stopped by Ctrl-C.

SIGINT (Ctrl-C) or SIGTERM stops every process serve started: each child is asked to stop, given
`PORTAL_SHUTDOWN_GRACE` seconds, then its process group is killed (backends_app.processes). If one
child exits on its own, the other is stopped the same way and serve exits with an error, so a
supervisor sees the failure and restarts the whole. If serve itself is killed, its children get
SIGTERM from the kernel and stop as if serve had asked.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from backends_app import metrics, processes


class Command(BaseCommand):
    help = "Start the web server (daphne, ASGI) and a django-q2 worker; Ctrl-C stops both."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("PORTAL_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-worker", action="store_true", help="Start the web server only.")

    def handle(self, *args: Any, host: str, port: int, no_worker: bool, **options: Any) -> None:
        web = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "portal.asgi:application"]
        worker = [sys.executable, str(settings.BASE_DIR / "manage.py"), "worker"]
        stop = threading.Event()
        received: list[int] = [signal.SIGTERM]

        def request_stop(signum: int, _frame: Any) -> None:
            received[0] = signum
            stop.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        self.stdout.write(metrics.prepare_metric_files())  # before any child counts anything
        children = [processes.start(web)]
        if not no_worker:
            children.append(processes.start(worker))
        self.stdout.write(f"Backend Portal on http://{host}:{port}/ (admin at /admin/); Ctrl-C stops it")
        failed = None
        while failed is None and not stop.wait(0.5):
            failed = next((c for c in children if processes.has_exited(c)), None)
        processes.stop(children, received[0], settings.PORTAL_SHUTDOWN_GRACE)
        if failed is not None:
            name = "the worker" if failed.args == worker else "the web server"
            raise CommandError(f"{name} exited with status {failed.returncode}; stopped everything")
