"""`manage.py worker`: a django-q2 worker for one node, reconciled at start and heartbeating.

Without options it serves the node this machine's settings describe, on the default queue. With
`--node NAME --backends-path PATH` it registers (or updates) that node and runs a cluster named after
it, so jobs for that node, routed by name, run here and touch only its backends directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from backends_app import metrics, procedure
from backends_app.models import Node

HEARTBEAT_SECONDS = 30


class Command(BaseCommand):
    help = (
        "Recover interrupted operations and record the backends directory, then run a django-q2 "
        "cluster for this node until stopped, heartbeating."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--node", help="Serve this node (its jobs are routed to a cluster of this name).")
        parser.add_argument("--backends-path", help="The node's backends directory.")
        parser.add_argument("--state-path", help="The node's state directory (default: beside the backends).")
        parser.add_argument("--capability", help="The node's capability for meta backends.")
        parser.add_argument("--platform", help="The node's platform, os/arch[/variant].")
        parser.add_argument("--workers", type=int, help="Worker processes in the cluster.")
        parser.add_argument("--once", action="store_true", help="Reconcile and exit (no cluster).")

    def handle(self, *args: Any, once: bool, **options: Any) -> None:
        env = self.node_environment(options)
        os.environ.update(env)
        for key in ("PORTAL_NODE_NAME", "PORTAL_NODE_QUEUE", "PORTAL_CAPABILITY", "PORTAL_PLATFORM"):
            if key in env:
                setattr(settings, key, env[key])
        for key in ("PORTAL_BACKENDS_PATH", "PORTAL_STATE_PATH"):
            if key in env:
                setattr(settings, key, Path(env[key]))
        self.stdout.write(metrics.prepare_metric_files())
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

    def node_environment(self, options: dict[str, Any]) -> dict[str, str]:
        """The settings this worker and its cluster run with, as environment variables."""
        env: dict[str, str] = {}
        if options.get("node"):
            env["PORTAL_NODE_NAME"] = env["PORTAL_NODE_QUEUE"] = env["Q_CLUSTER_NAME"] = options["node"]
        elif options.get("backends_path"):
            raise CommandError("--backends-path needs --node: name the node that owns the directory")
        if options.get("backends_path"):
            backends = Path(options["backends_path"]).resolve()
            env["PORTAL_BACKENDS_PATH"] = str(backends)
            env["PORTAL_STATE_PATH"] = str(
                Path(options["state_path"]).resolve()
                if options.get("state_path")
                else backends.parent / f".{backends.name}-portal"
            )
        for option, key in (("capability", "PORTAL_CAPABILITY"), ("platform", "PORTAL_PLATFORM")):
            if options.get(option):
                env[key] = options[option]
        if options.get("workers"):
            env["PORTAL_WORKERS"] = str(options["workers"])
        return env
