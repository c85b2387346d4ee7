"""`manage.py serve`: the ASGI web server and a django-q2 worker together, both stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from backends_app import metrics


class Command(BaseCommand):
    help = "Start the web server (daphne, ASGI) and a django-q2 worker; Ctrl-C stops both."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("PORTAL_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-worker", action="store_true", help="Start the web server only.")

    def handle(self, *args: Any, host: str, port: int, no_worker: bool, **options: Any) -> None:
        web = [sys.executable, "-m", "daphne", "-b", host, "-p", str(port), "portal.asgi:application"]
        worker = [sys.executable, "manage.py", "worker"]
        self.stdout.write(metrics.prepare_metric_files())  # before any child counts anything
        children = [subprocess.Popen(web)]
        if not no_worker:
            children.append(subprocess.Popen(worker))
        self.stdout.write(f"Backend Portal on http://{host}:{port}/ (admin at /admin/); Ctrl-C stops it")

        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        failed = None
        try:
            while failed is None:
                failed = next((c for c in children if c.poll() is not None), None)
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if failed is not None and failed.returncode:
            raise CommandError(f"{' '.join(failed.args[2:4])} exited with status {failed.returncode}")
