"""The worker's watch on its node's backends directory (`manage.py worker`).

Backends that LocalAI (or a person) installs, upgrades or removes in the shared directory while the
portal runs are recorded within `PORTAL_WATCH_INTERVAL` seconds, without a manual scan: the
directory is compared with its last snapshot (`disk.watch`) and the names that changed are
recorded (`procedure.record_disk_state`). A name with a journal record is left alone: the
portal's own operation on it is under way (it records the result itself) or was interrupted
(reconcile decides it); it is looked at again once the record is gone.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from django.db import connection

from backends_app import procedure
from backends_app.disk import layout, watch
from backends_app.disk.journal import Journal
from backends_app.models import Node

log = logging.getLogger(__name__)


class BackendsWatch(threading.Thread):
    """Looks at the node's backends directory every `interval` seconds until `stop` is set.

    The first snapshot is taken when the watch is made, so changes from then on are seen (the
    worker makes it before its reconcile, which records everything once). A failure (a database
    that is locked or away for a while) is logged and the changes are looked at again next time.
    """

    def __init__(self, node: Node, interval: float, stop: threading.Event) -> None:
        super().__init__(name="backends-watch", daemon=True)
        self.node = node
        self.interval = max(0.1, interval)
        self.stop = stop
        self.backends = Path(node.backends_path)
        self.journal_path = layout.StateDirs(node.state_path).journal_path
        self.previous = watch.snapshot(self.backends)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.look()
            except Exception:
                log.exception(
                    "%s: recording changes in %s failed; trying again", self.node.name, self.backends
                )
                connection.close()  # a broken connection is opened afresh next time
        connection.close()

    def look(self) -> list[str]:
        """Record what changed since the last look; returns the names recorded."""
        current = watch.snapshot(self.backends)
        names = watch.changed(self.previous, current)
        if not names:
            self.previous = current
            return []
        busy = names & self.journaled()
        recorded = sorted(names - busy)
        if recorded:
            problems = procedure.record_disk_state(self.node, recorded)
            log.info("%s: recorded changes made by others to %s", self.node.name, ", ".join(recorded))
            for problem in problems:
                log.warning("%s: %s", self.node.name, problem)
        self.previous = watch.merge(self.previous, current, busy)
        return recorded

    def journaled(self) -> set[str]:
        """Names with a journal record: an operation of the portal's own, running or interrupted."""
        return {record.backend for record in Journal(self.journal_path).pending()}
