"""`manage.py worker`: a django-q2 worker for one node, reconciled at start and heartbeating.

At start it also queues a sync of every enabled gallery never synced, so a fresh portal fills its
gallery list without anyone asking (a gallery that cannot be reached shows its error on the pages).

Without options it serves the node this machine's settings describe, on the default queue. With
`--node NAME --backends-path PATH` it registers (or updates) that node and runs a cluster named after
it, so jobs for that node, routed by name, run here and touch only its backends directory.

While it runs, a thread watches the node's backends directory (`backends_app.watcher`), so
backends that LocalAI or a person installs, changes or removes there are recorded within
PORTAL_WATCH_INTERVAL seconds.

The cluster runs in a child process with a process group of its own (see backends_app.processes).
Whichever way the worker ends (a signal, an error, the cluster dying), the cluster's whole group is
stopped before the worker exits; if the worker is killed outright, the kernel's death signal makes
the cluster kill its own group, so no orphaned cluster goes on taking jobs. A failed heartbeat (the
database locked by a long write, or unreachable for a while) is logged and retried, never fatal.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connection

from backends_app import metrics, procedure, processes
from backends_app.models import Gallery, Node, PortalSettings
from backends_app.watcher import BackendsWatch

log = logging.getLogger(__name__)

# Sent by the kernel to the cluster's leader when the worker dies; its handler kills the group.
CLUSTER_DEATH_SIGNAL = signal.SIGUSR1
# A failed heartbeat is tried again after this many seconds (or the interval, if shorter).
HEARTBEAT_RETRY_SECONDS = 5.0


class Heartbeat(threading.Thread):
    """Records the node's heartbeat every `interval` seconds until `stop` is set.

    In a thread of its own, so a heartbeat waiting on a locked database never delays the worker's
    answer to a signal. A failure is logged and retried sooner; it never ends the worker, whose
    cluster may well be able to work meanwhile.
    """

    def __init__(self, node: Node, interval: float, stop: threading.Event) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.node = node
        self.interval = max(0.1, interval)
        self.stop = stop

    def run(self) -> None:
        failures = 0
        delay = self.interval
        while not self.stop.wait(delay):
            try:
                self.node.heartbeat()
            except Exception as exc:  # never fatal; DatabaseError is the usual one
                failures += 1
                delay = min(self.interval, HEARTBEAT_RETRY_SECONDS)
                if isinstance(exc, DatabaseError):
                    log.warning("%s: heartbeat failed (%s); retrying in %.0f s", self.node.name, exc, delay)
                else:
                    log.exception("%s: heartbeat failed; retrying in %.0f s", self.node.name, delay)
                connection.close()  # a broken connection is opened afresh on the next try
            else:
                if failures:
                    log.info("%s: heartbeat recorded again after %d failure(s)", self.node.name, failures)
                failures = 0
                delay = self.interval
        connection.close()


class Command(BaseCommand):
    help = (
        "Recover interrupted operations and record the backends directory, queue the first sync of "
        "galleries never synced, then run a django-q2 cluster for this node until stopped, heartbeating."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--node", help="Serve this node (its jobs are routed to a cluster of this name).")
        parser.add_argument("--backends-path", help="The node's backends directory.")
        parser.add_argument("--state-path", help="The node's state directory (default: beside the backends).")
        parser.add_argument("--capability", help="The node's capability for meta backends.")
        parser.add_argument("--platform", help="The node's platform, os/arch[/variant].")
        parser.add_argument("--workers", type=int, help="Worker processes in the cluster.")
        parser.add_argument(
            "--once", action="store_true", help="Reconcile, queue first syncs, and exit (no cluster)."
        )
        # The worker's own child process: the django-q2 cluster, killed whole if the worker dies.
        parser.add_argument("--run-cluster", action="store_true", help=argparse.SUPPRESS)

    def handle(self, *args: Any, once: bool, run_cluster: bool, **options: Any) -> None:
        if run_cluster:
            self.run_cluster()
            return
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
        stop = threading.Event()
        # Made before the reconcile, so what changes on disk from here on is seen.
        watcher = BackendsWatch(node, settings.PORTAL_WATCH_INTERVAL, stop)
        # A job this node's worker was killed downloading is queued again, and resumes.
        report = procedure.reconcile(node, resume_downloads=True)
        self.stdout.write(f"{node.name}: {report.summary()}")
        # A fresh portal lists nothing until its galleries are read: sync those never synced now,
        # on this worker's own queue so it runs here at once.
        first = Gallery.objects.filter(enabled=True, last_synced_at=None).request_sync(
            cluster=settings.PORTAL_NODE_QUEUE or None
        )
        if first:
            self.stdout.write(f"first sync of gallery {', '.join(first)} queued")
        if once:
            return
        received: list[int] = [signal.SIGTERM]

        def request_stop(signum: int, _frame: Any) -> None:
            received[0] = signum
            stop.set()

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        # LocalAI's runtime_settings.json: applied now, then watched from a thread of its own.
        settings_watcher = PortalSettings.watch_runtime_settings()
        # From here the main thread only waits; the heartbeat thread opens its own connection.
        connection.close()
        cluster = processes.start(
            [sys.executable, str(settings.BASE_DIR / "manage.py"), "worker", "--run-cluster"],
            death_signal=CLUSTER_DEATH_SIGNAL,
            env=os.environ.copy(),
        )
        heartbeat = Heartbeat(node, settings.PORTAL_HEARTBEAT_INTERVAL, stop)
        heartbeat.start()
        if settings.PORTAL_WATCH_INTERVAL > 0:
            watcher.start()
        try:
            while not stop.wait(1) and not processes.has_exited(cluster):
                pass
        finally:
            requested = stop.is_set()
            stop.set()
            [code] = processes.stop([cluster], received[0], settings.PORTAL_SHUTDOWN_GRACE)
            heartbeat.join(timeout=1)
            if watcher.is_alive():
                watcher.join(timeout=5)
            if settings_watcher is not None:
                settings_watcher.stop()
        if not requested:
            raise CommandError(f"the django-q2 cluster exited with status {code}; stopping")

    def run_cluster(self) -> None:
        """In the cluster's own process: run django-q2's cluster, killed whole if the worker dies."""

        def parent_died(_signum: int, _frame: Any) -> None:
            os.killpg(os.getpgrp(), signal.SIGKILL)

        signal.signal(CLUSTER_DEATH_SIGNAL, parent_died)
        call_command("qcluster")

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
