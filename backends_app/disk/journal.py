"""The write-ahead journal of operations in flight: one JSON record per backend, guarded by a lock.

Written before each irreversible move, so a crash can be reconciled from the record and the disk
alone. A plain module: no ORM, no Django. See ``docs/on-disk-layout.md``.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backends_app.disk.errors import LayoutError
from backends_app.disk.fsops import StrPath, atomic_write, fsync_dir
from backends_app.disk.layout import check_name, mkdir_private

OPERATIONS = ("install", "upgrade", "rollback", "uninstall")
# The paths a journal record may name; each is a directory the operation moves around.
ROLES = ("live", "staging", "kept", "trash")

_JOURNAL_FORMAT = 1


def _now_precise() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _identity(path: str) -> list[int] | None:
    if not path:
        return None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return [info.st_dev, info.st_ino]


@dataclass
class JournalRecord:
    """One operation in flight on one backend, as written before its latest irreversible move.

    ``inodes`` holds, for each role path that existed when ``step`` was recorded, the
    ``[st_dev, st_ino]`` of what was there. A rename moves an inode without changing it, so after a
    crash ``now_at(role)`` tells whether the move announced by ``step`` happened, without any other
    bookkeeping. ``owner_alive`` is not stored: it is read from the record's lock when listed.
    """

    op: str
    backend: str
    job_id: str
    step: str
    live: str
    staging: str = ""
    kept: str = ""
    trash: str = ""
    started_at: str = ""
    updated_at: str = ""
    inodes: dict[str, list[int]] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    owner_alive: bool = False

    def path(self, role: str) -> Path | None:
        """The path this record gives for ``role`` (one of ``ROLES``), or None if unused."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        value: str = getattr(self, role)
        return Path(value) if value else None

    def now_at(self, role: str) -> str | None:
        """Where the directory that was at ``role`` when ``step`` was recorded is now.

        Returns the role whose path holds it today (``role`` itself if it has not moved), or None
        if it is at none of the record's paths (it did not exist then, or was deleted since).
        """
        wanted = self.inodes.get(role)
        if wanted is None:
            return None
        for candidate in ROLES:
            if _identity(getattr(self, candidate)) == wanted:
                return candidate
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _JOURNAL_FORMAT,
            "op": self.op,
            "backend": self.backend,
            "job_id": self.job_id,
            "step": self.step,
            "live": self.live,
            "staging": self.staging,
            "kept": self.kept,
            "trash": self.trash,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "inodes": self.inodes,
            "history": self.history,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> JournalRecord:
        if not isinstance(data, dict) or data.get("format") != _JOURNAL_FORMAT:
            raise LayoutError("not a journal record of a known format")
        try:
            return cls(
                op=str(data["op"]),
                backend=str(data["backend"]),
                job_id=str(data["job_id"]),
                step=str(data["step"]),
                live=str(data["live"]),
                staging=str(data.get("staging", "")),
                kept=str(data.get("kept", "")),
                trash=str(data.get("trash", "")),
                started_at=str(data.get("started_at", "")),
                updated_at=str(data.get("updated_at", "")),
                inodes={str(k): [int(n) for n in v] for k, v in dict(data.get("inodes", {})).items()},
                history=list(data.get("history", [])),
                extra=dict(data.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutError(f"journal record is malformed: {exc!r}") from exc

    def _snapshot(self) -> None:
        self.inodes = {}
        for role in ROLES:
            if (identity := _identity(getattr(self, role))) is not None:
                self.inodes[role] = identity


class Journal:
    """Write-ahead journal of multi-step operations: ``<journal dir>/<backend>.json``, one per backend.

    The procedure calls ``begin`` before touching anything and ``advance(backend, step)`` right
    before each irreversible move, then ``clear`` when done. Each record is guarded by an ``flock``
    on ``<backend>.lock`` held for the operation's life: the kernel drops it when the process dies,
    so ``pending()`` can tell a crashed operation (``owner_alive`` False, reconcile it) from one
    still running in another worker (leave it alone). One Journal object may own several backends.
    """

    def __init__(self, path: StrPath) -> None:
        self.path = Path(path)
        self._locks: dict[str, int] = {}

    def _record_path(self, backend: str) -> Path:
        return self.path / f"{check_name(backend)}.json"

    def _lock(self, backend: str) -> int | None:
        """Take the backend's lock; None if another open file (any process) holds it."""
        fd = os.open(self.path / f"{check_name(backend)}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _held_elsewhere(self, backend: str) -> bool:
        if backend in self._locks:
            return True
        fd = self._lock(backend)
        if fd is None:
            return True
        os.close(fd)  # closing the descriptor releases the probe's lock
        return False

    def _write(self, record: JournalRecord) -> None:
        data = json.dumps(record.to_json(), indent=2, ensure_ascii=False).encode()
        atomic_write(self._record_path(record.backend), data, mode=0o600)

    def _owned(self, backend: str) -> JournalRecord:
        if backend not in self._locks:
            raise LayoutError(f"this process does not own the operation on {backend}")
        record = self.read(backend)
        if record is None:
            raise LayoutError(f"no journal record for {backend}")
        record.owner_alive = True
        return record

    def read(self, backend: str) -> JournalRecord | None:
        """The record for ``backend``, or None. ``LayoutError`` if the file is not a record."""
        path = self._record_path(backend)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return JournalRecord.from_json(json.loads(raw))
        except ValueError as exc:
            raise LayoutError(f"journal record {path} is not valid JSON: {exc}") from exc
        except LayoutError as exc:
            raise LayoutError(f"{path}: {exc}") from exc

    def begin(
        self,
        op: str,
        backend: str,
        job_id: str | int,
        *,
        live: StrPath,
        staging: StrPath = "",
        kept: StrPath = "",
        trash: StrPath = "",
        step: str = "begin",
        extra: dict[str, Any] | None = None,
    ) -> JournalRecord:
        """Start an operation: take the backend's lock and write its first record.

        ``LayoutError`` if another process is operating on this backend, or if an interrupted
        operation's record is still there (reconcile it first).
        """
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; expected one of {', '.join(OPERATIONS)}")
        if backend in self._locks:
            raise LayoutError(f"an operation on {backend} is already in progress in this process")
        mkdir_private(self.path)
        fd = self._lock(backend)
        if fd is None:
            raise LayoutError(f"an operation on {backend} is already in progress in another process")
        try:
            stale = self.read(backend)
            if stale is not None:
                raise LayoutError(
                    f"an interrupted {stale.op} of {backend} (job {stale.job_id}, step {stale.step!r}) "
                    "must be reconciled first"
                )
            now = _now_precise()
            record = JournalRecord(
                op=op,
                backend=backend,
                job_id=str(job_id),
                step=step,
                live=str(live),
                staging=str(staging),
                kept=str(kept),
                trash=str(trash),
                started_at=now,
                updated_at=now,
                history=[{"step": step, "at": now}],
                extra=dict(extra or {}),
                owner_alive=True,
            )
            record._snapshot()
            self._write(record)
        except BaseException:
            os.close(fd)
            raise
        self._locks[backend] = fd
        return record

    def advance(
        self,
        backend: str,
        step: str,
        *,
        staging: StrPath | None = None,
        kept: StrPath | None = None,
        trash: StrPath | None = None,
        extra: dict[str, Any] | None = None,
    ) -> JournalRecord:
        """Record ``step`` (and any new paths or extra data) before the move it announces.

        Snapshots where each role's directory is now, so reconcile can later see whether the move
        happened. Only the owner of the operation (``begin`` or ``take_over``) may advance it.
        """
        record = self._owned(backend)
        for role, value in (("staging", staging), ("kept", kept), ("trash", trash)):
            if value is not None:
                setattr(record, role, str(value))
        if extra:
            record.extra.update(extra)
        record.step = step
        record.updated_at = _now_precise()
        record.history.append({"step": step, "at": record.updated_at})
        record._snapshot()
        self._write(record)
        return record

    def clear(self, backend: str) -> None:
        """The operation is over (done or fully rolled back): delete its record, release its lock."""
        self._owned(backend)
        path = self._record_path(backend)
        path.unlink()
        fsync_dir(path.parent)
        self.release(backend)

    def pending(self) -> list[JournalRecord]:
        """Every record on disk, sorted by backend, each with ``owner_alive`` read from its lock."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.path))
        except FileNotFoundError:
            return []
        records: list[JournalRecord] = []
        for name in names:
            # Temp files of an interrupted write end in ".tmp", never ".json".
            if not name.endswith(".json"):
                continue
            record = self.read(name[: -len(".json")])
            if record is None:  # cleared since the listing
                continue
            record.owner_alive = self._held_elsewhere(record.backend)
            records.append(record)
        return records

    def take_over(self, backend: str) -> JournalRecord:
        """Adopt an interrupted operation so reconcile can ``advance`` and ``clear`` it.

        ``LayoutError`` if its owner is still alive or there is nothing to take over.
        """
        if backend in self._locks:
            return self._owned(backend)
        if not self.path.is_dir():
            raise LayoutError(f"no interrupted operation on {backend}")
        fd = self._lock(backend)
        if fd is None:
            raise LayoutError(f"the operation on {backend} is still running in another process")
        try:
            record = self.read(backend)
        except BaseException:
            os.close(fd)
            raise
        if record is None:
            os.close(fd)
            raise LayoutError(f"no interrupted operation on {backend}")
        self._locks[backend] = fd
        record.owner_alive = True
        return record

    def release(self, backend: str) -> None:
        """Drop the lock without touching the record (what a crash does)."""
        fd = self._locks.pop(backend, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for backend in list(self._locks):
            self.release(backend)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
