"""Seeing what others change in the backends directory: snapshots compared a few seconds apart.

LocalAI installs, upgrades and deletes backends in the same directory the portal manages. A
snapshot records, per entry, the directory's identity and modification time and those of its
``metadata.json`` and ``run.sh`` (three ``lstat`` calls); two snapshots differ exactly where a
backend appeared, went, was swapped (a new directory), or had its metadata rewritten in place
(LocalAI's upgrade writes metadata.json without a rename) or its run.sh replaced or made executable.
LocalAI's own in-flight names (``layout.is_transient``) are left out: their operation is still
running, and its end shows as a change of the real name.

Why polling and not inotify: a backends directory shared between machines is often a network
filesystem, where inotify sees only this machine's changes; and inotify needs a watch on every
backend directory too (a metadata.json rewritten in place does not touch its parent). Measured
(``python -m bench.bench_watch``): a snapshot of 1,000 backends costs about 5 ms of CPU, so one
every 2 seconds is about a quarter of a percent of one core. A plain module: no Django.
"""

from __future__ import annotations

import os
import stat

from backends_app.disk.layout import METADATA_FILE, RUN_FILE, is_transient

# (inode, mtime_ns, size, mode) of a file, or None when it is missing.
FileState = tuple[int, int, int, int] | None
EntryState = tuple[int, int, int, FileState, FileState]
Snapshot = dict[str, EntryState]


def _file_state(path: str) -> FileState:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size, stat.S_IMODE(info.st_mode))


def snapshot(backends: str | os.PathLike[str]) -> Snapshot:
    """The state of every directory (or symlink) in ``backends`` that could be a backend.

    A missing backends directory is an empty snapshot. Plain files are left out, as LocalAI
    leaves them out of its listing.
    """
    found: Snapshot = {}
    try:
        listing = os.scandir(backends)
    except (FileNotFoundError, NotADirectoryError):
        return found
    with listing:
        for entry in listing:
            if is_transient(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the listing
            if not (stat.S_ISDIR(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                continue
            found[entry.name] = (
                info.st_ino,
                info.st_mtime_ns,
                stat.S_IFMT(info.st_mode),
                _file_state(os.path.join(entry.path, METADATA_FILE)),
                _file_state(os.path.join(entry.path, RUN_FILE)),
            )
    return found


def changed(before: Snapshot, after: Snapshot) -> set[str]:
    """The names that appeared, went or changed between two snapshots."""
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def merge(before: Snapshot, after: Snapshot, keep: set[str]) -> Snapshot:
    """``after``, except that the names in ``keep`` keep their state from ``before`` (still to be
    looked at again: an operation of the portal's own was under way on them)."""
    merged = {name: state for name, state in after.items() if name not in keep}
    merged.update({name: state for name, state in before.items() if name in keep})
    return merged
