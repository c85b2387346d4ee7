"""The multi-process metric files of one host: reading them, folding in the dead, starting afresh.

prometheus_client's multi-process mode gives every process that counts something its own files in
one directory (``counter_<pid>.db``, ``histogram_<pid>.db``); a scrape adds them up. Two things are
left to us, and done here, without Django:

* **Dead processes.** Workers are recycled, commands exit, processes crash: their files stay (their
  counts must: a total never goes down) and pile up, one set per pid, making every scrape slower.
  :meth:`MetricFiles.compact` folds the files of dead pids into one archive per metric type and
  removes them, so the totals are unchanged and the number of files stays bounded. Deleting them
  instead would make a total drop while the other processes go on, which Prometheus reads as a
  counter reset: ``increase()`` would then report the survivors' whole count as new, and alerts on
  failed jobs would fire for old failures.
* **Starting afresh.** :meth:`MetricFiles.reset_if_idle`, called when ``manage.py serve`` or
  ``manage.py worker`` starts, empties the directory only when no process with files in it is
  alive: then every total drops to zero at once, which is an ordinary counter reset (as when a
  single-process exporter restarts), and the series of metrics renamed by an upgrade disappear.
  With any process still alive (another replica on this host) it compacts instead.

Layout of the directory::

    counter_<pid>.db, histogram_<pid>.db   written by live (or dead, not yet folded) processes
    archive -> archive.<n>/                the folded counts of dead processes (a symlink)
    archive.<n>/counter_archive.db ...     one file per metric type
    archive.<n>/merged.json                files folded into this generation but maybe not yet removed
    .lock                                  flock: compaction exclusive, reads shared

A compaction writes a new generation beside the current one, switches the symlink (atomic), removes
the folded files, then switches to a generation with an empty ``merged.json``. Readers skip the
files ``merged.json`` names, so a reader never counts a file twice, even after a crash between two
of these steps; the next compaction finishes the job.

Liveness is a pid check on this host (``kill(pid, 0)``): the processes sharing a directory must
share a pid namespace, hence the default of one directory per host name (settings).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

ARCHIVE_LINK = "archive"
LOCK_FILE = ".lock"
MERGED_LIST = "merged.json"
# counter_123.db, histogram_123.db, summary_123.db, gauge_livesum_123.db: the pid is the last part.
_PROCESS_FILE = re.compile(r"^(?P<prefix>[a-z]+(?:_[a-z]+)?)_(?P<pid>\d+)\.db$")
# Types whose values add up across processes, so a dead process's values can be folded in.
_ADDITIVE = ("counter", "histogram", "summary")


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricFiles:
    """The metric files of one directory (PROMETHEUS_MULTIPROC_DIR); a prometheus_client collector.

    Register it in a fresh ``CollectorRegistry`` per scrape; :meth:`collect` adds up every live and
    dead process's counts under a shared lock.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    # -- reading --------------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        with self._lock(fcntl.LOCK_SH):
            return MultiProcessCollector.merge(self._readable_files(), accumulate=True)

    def _readable_files(self) -> list[str]:
        archive = self._current_archive()
        merged = self._merged(archive) if archive else set()
        files = [str(path) for name, path, _ in self._process_files() if name not in merged]
        if archive is not None:
            files += [str(path) for path in sorted(archive.glob("*.db"))]
        return files

    def _process_files(self) -> Iterator[tuple[str, Path, int]]:
        """(name, path, pid) of each process's file in the directory."""
        with os.scandir(self.path) as entries:
            for entry in entries:
                match = _PROCESS_FILE.match(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    yield entry.name, Path(entry.path), int(match.group("pid"))

    def _current_archive(self) -> Path | None:
        link = self.path / ARCHIVE_LINK
        if not link.is_symlink():
            return None
        target = self.path / os.readlink(link)
        return target if target.is_dir() else None

    @staticmethod
    def _merged(archive: Path) -> set[str]:
        try:
            return set(json.loads((archive / MERGED_LIST).read_text()))
        except (OSError, ValueError):
            return set()

    # -- folding in dead processes ----------------------------------------------------------------

    def compact(self) -> int:
        """Fold the files of dead processes into the archive and remove them; returns how many.

        Waits for readers and other compactions (each takes milliseconds). Totals are unchanged.
        """
        with self._lock(fcntl.LOCK_EX):
            return self._compact()

    def _compact(self) -> int:
        archive = self._current_archive()
        if archive is not None and self._merged(archive):
            self._finish(archive)
            archive = self._current_archive()
        dead = [(name, path) for name, path, pid in self._process_files() if not pid_alive(pid)]
        if not dead:
            self._remove_old_generations(keep=archive)
            return 0
        # Sum every additive file, old archive included, by type and raw key. Gauges of dead
        # processes are dropped, as prometheus_client's mark_process_dead does for live gauges.
        totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        sources = [(p.name.partition("_")[0], p) for p in archive.glob("*.db")] if archive else []
        sources += [(name.partition("_")[0], path) for name, path in dead]
        for kind, path in sources:
            if kind not in _ADDITIVE:
                continue
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
                totals[kind][key] += value
        folded = self._write_generation(totals, merged=[name for name, _ in dead])
        for _, path in dead:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._write_generation(None, merged=[], link_from=folded)
        self._remove_old_generations(keep=self._current_archive())
        return len(dead)

    def _finish(self, archive: Path) -> None:
        """After a crash between switching to a generation and removing what it folded in."""
        merged = self._merged(archive)
        for name, path, pid in self._process_files():
            if name in merged and not pid_alive(pid):
                path.unlink()
        self._write_generation(None, merged=[], link_from=archive)

    def _write_generation(
        self,
        totals: dict[str, dict[str, float]] | None,
        *,
        merged: list[str],
        link_from: Path | None = None,
    ) -> Path:
        """Make the next archive generation and point the symlink at it (atomically).

        With `totals`, its files are written from them; otherwise they are hard links to the files
        of `link_from` (the same data, a different `merged.json`).
        """
        number = 1 + max(
            (int(p.name.rpartition(".")[2]) for p in self.path.glob("archive.*") if p.name[8:].isdigit()),
            default=0,
        )
        generation = self.path / f"archive.{number}"
        generation.mkdir()
        if totals is not None:
            for kind, values in totals.items():
                store = MmapedDict(str(generation / f"{kind}_archive.db"))
                try:
                    for key, value in values.items():
                        store.write_value(key, value, 0.0)
                finally:
                    store.close()
        elif link_from is not None:
            for path in link_from.glob("*.db"):
                os.link(path, generation / path.name)
        (generation / MERGED_LIST).write_text(json.dumps(sorted(merged)))
        temporary = self.path / f"{ARCHIVE_LINK}.{number}.link"
        os.symlink(generation.name, temporary)
        os.replace(temporary, self.path / ARCHIVE_LINK)
        return generation

    def _remove_old_generations(self, keep: Path | None) -> None:
        for path in self.path.glob("archive.*"):
            if keep is None or path.name != keep.name:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    # -- starting afresh --------------------------------------------------------------------------

    def reset_if_idle(self) -> bool:
        """Empty the directory when no process with files in it is alive, else compact; True if
        emptied. Only files of dead processes and the archive are removed: a process that creates
        its first file meanwhile keeps it."""
        with self._lock(fcntl.LOCK_EX):
            files = list(self._process_files())
            if any(pid_alive(pid) for _, _, pid in files):
                self._compact()
                return False
            for _, path, _ in files:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            with contextlib.suppress(FileNotFoundError):
                (self.path / ARCHIVE_LINK).unlink()
            self._remove_old_generations(keep=None)
            return True

    # -- locking ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, mode: int) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)  # removed by hand while processes run
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock
