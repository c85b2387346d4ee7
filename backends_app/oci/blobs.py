"""Layer blobs on disk while they download: ranged parts in files, fetched concurrently, resumable.

The store. A blob is cut into parts of ``part_size`` bytes; each part is an append-only file in the
store's directory named by the blob's digest and the part's byte range, ``sha256-<hex>.<start>-<end>``
(``end`` exclusive). A part is complete when its file holds ``end - start`` bytes; resuming it is
appending from its current size (``Range: bytes=<start+size>-<end-1>``). The files are the only
state: a process killed at any moment leaves valid prefixes, and the next pull of a blob adopts the
part files it finds (whatever part size made them) and plans fresh parts for the ranges none covers.

The scheduler (:class:`BlobPull`). ``connections`` threads fetch parts, always the first part not
yet fetched of the earliest layers, among the first ``layers_at_once`` layers whose download is not
complete: layer 1 completes first, and the next layers fill the connections it cannot use. A thread
that completes a part extends the blob's running hash over the parts complete in order, so a blob
is verified (size and digest) moments after its last byte arrives; only then may it be read
(:meth:`BlobPull.open`). A blob whose digest does not match is dropped and downloaded once more from
scratch; a second mismatch is :class:`DigestMismatch`.

A registry that ignores ``Range`` (answers 200 with the whole body) or refuses it (416) is served by
one sequential download per blob, which writes each part's missing bytes and skips those already held.

Nothing here speaks HTTP: the client passes a ``download`` function that fills parts from the
registry (see ``RegistryClient._download_parts``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DigestMismatch, OCIError
from .manifest import Descriptor

log = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 16 * 1024 * 1024
# A pull starts with FAST_CONNECTIONS connections and opens the others only if those turn out slower
# than FAST_RATE bytes/s each (measured over PROBE_SECONDS, or over a whole part): faster, the link
# is not what limits the pull, unpacking is (2 connections at that rate bring more than 2 cores
# unpack), and more connections would only take CPU from the unpacking thread (on 2 cores, 8
# loopback connections made a pull 1.5x slower than 2).
FAST_RATE = 50_000_000
FAST_CONNECTIONS = 2
PROBE_SECONDS = 0.4
READ_CHUNK = 1024 * 1024
_PART_NAME = re.compile(r"^([a-z0-9]+)-([0-9a-f]+)\.(\d+)-(\d+)$")
_OPEN_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class RangeIgnored(Exception):
    """The registry answered a ranged request with the whole blob (200): it does not do ranges."""


class RangeRefused(Exception):
    """The registry answered a ranged request with 416: fetch this blob without ranges."""


class Stopped(Exception):
    """The pull is over (failed or cancelled elsewhere): a download stops between two reads."""


@dataclass
class Part:
    """One byte range of a blob and the file holding what has arrived of it."""

    start: int
    end: int  # exclusive
    path: Path
    held: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def complete(self) -> bool:
        return self.held >= self.length


class PartWriter:
    """An open part file for a stream of appends (one open per request, not per chunk)."""

    def __init__(self, part: Part) -> None:
        self.part = part
        self._fd = os.open(part.path, _OPEN_APPEND, 0o600)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.part.held += len(data)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stem(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    if not re.fullmatch(r"[a-z0-9]+", algorithm) or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise OCIError(f"malformed digest {digest!r}")
    return f"{algorithm}-{hexpart}"


class BlobStore:
    """A directory of part files (created ``0700``). Safe for one pull at a time per blob."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _files_of(self, digest: str) -> list[tuple[int, int, Path]]:
        stem = _stem(digest)
        found = []
        for path in self.root.glob(f"{stem}.*"):
            match = _PART_NAME.match(path.name)
            if match and f"{match.group(1)}-{match.group(2)}" == stem:
                found.append((int(match.group(3)), int(match.group(4)), path))
        return sorted(found)

    def parts_for(self, descriptor: Descriptor, part_size: int) -> list[Part]:
        """The parts of ``descriptor``'s blob: those on disk (whatever part size made them), and
        fresh ones of ``part_size`` bytes for the ranges no file covers. A file that overlaps
        another, lies past the blob's end or holds more than its range is dropped."""
        size = max(0, descriptor.size)
        stem = _stem(descriptor.digest)
        step = max(1, part_size)
        parts: list[Part] = []

        def fresh(start: int, stop: int) -> None:
            for begin in range(start, stop, step):
                end = min(stop, begin + step)
                parts.append(Part(begin, end, self.root / f"{stem}.{begin}-{end}"))

        position = 0
        for start, end, path in self._files_of(descriptor.digest):
            held = _size_of(path)
            if start < position or end > size or end <= start or held > end - start:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            fresh(position, start)
            parts.append(Part(start, end, path, held))
            position = end
        fresh(position, size)
        return parts or [Part(0, 0, self.root / f"{stem}.0-0")]

    def held(self, digest: str) -> int:
        """Bytes of ``digest``'s blob on disk."""
        return sum(_size_of(path) for _, _, path in self._files_of(digest))

    def total_bytes(self) -> int:
        """Bytes of every part file in the store."""
        return sum(_size_of(path) for path in self.root.iterdir() if _PART_NAME.match(path.name))

    def discard(self, digest: str) -> None:
        """Drop every part of ``digest``'s blob."""
        for _, _, path in self._files_of(digest):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def clear(self) -> int:
        """Drop every file of the store; returns how many went."""
        return self.prune(max_age=-1.0)

    @staticmethod
    def remove(root: Path, max_age: float = -1.0) -> int:
        """Drop a store's files (those older than ``max_age`` seconds, or all), then the directory
        itself once empty; nothing happens where there is no store. Returns how many files went."""
        if not root.is_dir() or root.is_symlink():
            return 0
        removed = BlobStore(root).prune(max_age)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty: files a retry resumes from stay
        return removed

    def prune(self, max_age: float, now: float | None = None) -> int:
        """Drop the files not modified for more than ``max_age`` seconds; returns how many went."""
        now = time.time() if now is None else now
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.iterdir():
            try:
                st = path.lstat()
                if max_age < 0 or now - st.st_mtime > max_age:
                    path.unlink()
                    removed += 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                continue
        return removed


def _size_of(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


class PartsReader:
    """A verified blob read back from its part files, in order (``read(n)`` like a file)."""

    def __init__(self, parts: Sequence[Part], on_read: Callable[[int], None] | None = None) -> None:
        self._paths = [part.path for part in parts if part.length]
        self._handle: io.FileIO | None = None
        self._on_read = on_read

    def read(self, n: int = -1, /) -> bytes:
        want = READ_CHUNK if n is None or n < 0 else min(n, READ_CHUNK)
        while True:
            if self._handle is None:
                if not self._paths:
                    return b""
                self._handle = io.FileIO(self._paths.pop(0), "rb")
            data = self._handle.read(want)
            if data:
                if self._on_read is not None:
                    self._on_read(len(data))
                return bytes(data)
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


# download(descriptor, parts, ranged, should_stop): fill ``parts`` from the registry. With
# ``ranged`` True ``parts`` is one part, fetched with a Range request from its first missing byte;
# with False it is the whole blob, fetched in one stream. Raises RangeIgnored, RangeRefused,
# Stopped, or the registry's errors.
Download = Callable[[Descriptor, list[Part], bool, Callable[[], bool]], None]


@dataclass
class _Blob:
    index: int
    descriptor: Descriptor
    parts: list[Part]
    inflight: set[int] = field(default_factory=set)
    sequential: bool = False
    hasher: hashlib._Hash | None = None
    hashed: int = 0  # parts hashed so far, in order
    hashing: bool = False
    verified: bool = False
    attempts: int = 1
    error: BaseException | None = None

    @property
    def downloaded(self) -> bool:
        return all(part.complete for part in self.parts)

    @property
    def held(self) -> int:
        return sum(min(part.held, part.length) for part in self.parts)


class BlobPull:
    """Downloads the layers of one image into a :class:`BlobStore`; see the module docstring.

    Use as a context manager: threads start on entry and are stopped and joined on exit.
    :meth:`wait` returns once a layer's blob is verified (raising its error if it failed).
    """

    def __init__(
        self,
        store: BlobStore,
        layers: Sequence[Descriptor],
        download: Download,
        *,
        connections: int = 8,
        layers_at_once: int = 4,
        part_size: int = DEFAULT_PART_SIZE,
        ranged: bool = True,
        on_ranges_ignored: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self._on_stop = on_stop
        self._download = download
        self._part_size = max(1, part_size)
        self._connections = max(1, connections)
        self._layers_at_once = max(1, layers_at_once)
        self._ranged = ranged
        self._on_ranges_ignored = on_ranges_ignored
        self._cond = threading.Condition()
        self._stopping = False
        self._active = 0  # downloads in flight
        self._limit = min(self._connections, FAST_CONNECTIONS)  # until the link is measured
        self._probe_started = 0.0
        self._decided = self._limit == self._connections
        self._threads: list[threading.Thread] = []
        self.blobs = [
            _Blob(i, layer, store.parts_for(layer, self._part_size), hasher=_new_hash(layer.digest))
            for i, layer in enumerate(layers)
        ]
        self.resumed_bytes = sum(blob.held for blob in self.blobs)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> BlobPull:
        self._probe_started = time.monotonic()
        wanted = min(self._connections, max(1, sum(len(b.parts) for b in self.blobs if not b.downloaded)))
        for number in range(wanted):
            thread = threading.Thread(target=self._work, name=f"blob-pull-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the threads and wait for them. ``on_stop`` runs in between: it may cut the
        downloads in flight, so that a thread blocked on a silent connection stops at once."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._on_stop is not None and self._threads:
            try:
                self._on_stop()
            except Exception:
                log.exception("cutting the downloads of a stopped pull failed")
        for thread in self._threads:
            thread.join()
        self._threads = []

    # -- what the applying thread calls ---------------------------------------------------------

    @property
    def held(self) -> int:
        """Bytes on disk for this image's blobs (resumed ones included)."""
        return sum(blob.held for blob in self.blobs)

    def wait(self, index: int, timeout: float) -> bool:
        """True once blob ``index`` is verified; False after ``timeout`` seconds; its error if it failed."""
        if not self._decided:
            elapsed = time.monotonic() - self._probe_started
            if elapsed >= PROBE_SECONDS:
                fetched = self.held - self.resumed_bytes
                self._judge_link(fetched / elapsed / max(1, min(self._active, self._limit)))
        blob = self.blobs[index]
        self._advance_hash(blob)
        with self._cond:
            if blob.error is None and not blob.verified:
                self._cond.wait(timeout)
            if blob.error is not None:
                raise blob.error
            return blob.verified

    def open(self, index: int, on_read: Callable[[int], None] | None = None) -> PartsReader:
        blob = self.blobs[index]
        if not blob.verified:
            raise OCIError(f"blob {blob.descriptor.digest} read before it was verified")
        return PartsReader(blob.parts, on_read)

    def release(self, index: int) -> None:
        """Delete blob ``index``'s files (its layer is applied)."""
        self.store.discard(self.blobs[index].descriptor.digest)

    # -- the download threads -------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._stopping

    def _judge_link(self, rate_per_connection: float) -> None:
        """The first measure of a connection's rate decides how many connections the pull uses."""
        with self._cond:
            if self._decided:
                return
            self._decided = True
            if rate_per_connection < FAST_RATE:
                self._limit = self._connections
                self._cond.notify_all()
            else:
                log.debug(
                    "%.0f MB/s per connection: %d connections suffice", rate_per_connection / 1e6, self._limit
                )

    def _next_task(self) -> tuple[_Blob, list[int], bool] | None:
        if self._active >= self._limit:
            return None
        window = [b for b in self.blobs if b.error is None and not b.downloaded][: self._layers_at_once]
        for blob in window:
            if not self._ranged or blob.sequential:
                if not blob.inflight:
                    blob.inflight.update(range(len(blob.parts)))
                    return blob, list(range(len(blob.parts))), False
                continue
            for i, part in enumerate(blob.parts):
                if not part.complete and i not in blob.inflight:
                    blob.inflight.add(i)
                    return blob, [i], True
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                task = None
                while task is None:
                    if self._stopping:
                        return
                    task = self._next_task()
                    if task is None:
                        self._cond.wait()
                self._active += 1
            blob, indexes, ranged = task
            parts = [blob.parts[i] for i in indexes]
            before = sum(part.held for part in parts)
            started = time.monotonic()
            try:
                self._download(blob.descriptor, parts, ranged, self._stopped)
                elapsed = time.monotonic() - started
                received = sum(part.held for part in parts) - before
                if received >= 4 * 1024 * 1024:
                    self._judge_link(received / max(elapsed, 1e-6))
            except Stopped:
                pass
            except RangeIgnored:
                with self._cond:
                    if self._ranged:
                        log.info("the registry ignores Range requests: one stream per blob from now on")
                    self._ranged = False
                if self._on_ranges_ignored is not None:
                    self._on_ranges_ignored()
            except RangeRefused:
                with self._cond:
                    blob.sequential = True
            except BaseException as exc:
                with self._cond:
                    if blob.error is None:
                        blob.error = exc
            finally:
                with self._cond:
                    self._active -= 1
                    blob.inflight.difference_update(indexes)
                    self._cond.notify_all()
            self._advance_hash(blob)

    # -- verification ---------------------------------------------------------------------------

    def _advance_hash(self, blob: _Blob) -> None:
        """Extend ``blob``'s hash over the parts complete in order; verify once all are hashed."""
        while True:
            with self._cond:
                if blob.hashing or blob.verified or blob.error is not None:
                    return
                todo: list[Part] = []
                i = blob.hashed
                while i < len(blob.parts) and blob.parts[i].complete and i not in blob.inflight:
                    todo.append(blob.parts[i])
                    i += 1
                if not todo and blob.hashed < len(blob.parts):
                    return
                blob.hashing = True
                hasher = blob.hasher
            try:
                assert hasher is not None
                for part in todo:
                    _hash_file(part, hasher)
            except BaseException as exc:
                with self._cond:
                    blob.hashing = False
                    blob.error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                blob.hashing = False
                blob.hashed += len(todo)
                if blob.hashed == len(blob.parts):
                    self._verdict(blob)
                    self._cond.notify_all()
                    return

    def _verdict(self, blob: _Blob) -> None:
        """All parts hashed (lock held): verified, or dropped and fetched again, or failed."""
        assert blob.hasher is not None
        descriptor = blob.descriptor
        digest = f"{blob.hasher.name}:{blob.hasher.hexdigest()}"
        if digest == descriptor.digest:
            blob.verified = True
            return
        self.store.discard(descriptor.digest)
        if blob.attempts >= 2:
            blob.error = DigestMismatch(f"blob {descriptor.digest}: content hashes to {digest}")
            return
        log.warning("blob %s hashes to %s: downloading it again", descriptor.digest, digest)
        blob.attempts += 1
        blob.parts = self.store.parts_for(descriptor, self._part_size)
        blob.hasher = _new_hash(descriptor.digest)
        blob.hashed = 0


def _new_hash(digest: str) -> hashlib._Hash:
    algorithm = digest.partition(":")[0]
    try:
        return hashlib.new(algorithm)
    except ValueError:
        raise OCIError(f"unsupported digest algorithm in {digest!r}") from None


def _hash_file(part: Part, hasher: hashlib._Hash) -> None:
    """Hash exactly ``part.length`` bytes of the part's file (a longer file is a broken part)."""
    remaining = part.length
    if not remaining:
        return
    with open(part.path, "rb", buffering=0) as handle:
        while remaining:
            data = handle.read(min(READ_CHUNK, remaining))
            if not data:
                raise OCIError(f"part file {part.path.name} is shorter than its range")
            hasher.update(data)
            remaining -= len(data)
