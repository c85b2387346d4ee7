"""Verify, decompress and safely unpack layer blobs in one streaming pass.

Each layer blob is read once: its bytes are hashed as they arrive (:class:`BlobReader`), inflated
with a cap on the output of every decompressor call (:class:`GzipReader`, zstd's own stream
reader), and the resulting tar stream is applied entry by entry onto a target directory
(:class:`RootfsWriter`). No copy of a layer or of a flattened tar ever touches the disk.

Safety rules (a hostile entry makes the whole image fail; :func:`unpack_layers` then removes the
target directory it created):

* entry names must be relative and free of ``..``; no entry may be written through a symlink (every
  parent component must be a real directory, checked with ``lstat`` and ``O_NOFOLLOW``);
* an absolute symlink target is re-rooted in the target directory (``/lib/x`` seen from ``usr/a``
  becomes ``../lib/x``), as if the image were the root filesystem it was built as;
* no symlink of the finished tree may resolve outside it: a last pass over every link resolves it
  component by component inside the tree (following the other links as the kernel would), since a
  later entry or layer can replace a directory on a link's path by another link;
* hard links must name an existing non-directory inside the target;
* device nodes, FIFOs and other special types are refused;
* permission bits are kept without world-write (``mode & 0o775``: exec bits yes, setuid, setgid,
  sticky and write-by-anyone no), owners are not.

OCI whiteouts are applied across layers: ``dir/.wh.name`` removes ``dir/name`` and
``dir/.wh..wh..opq`` empties ``dir``, in both cases only of what lower layers put there, whatever
the order of the entries inside the layer.

A digest mismatch is reported as such even when the corruption first shows up as a decompression or
tar error: on any error the rest of the blob is drained and hashed before deciding what to report.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

import zstandard
from isal import isal_zlib

from .errors import DigestMismatch, OCIError, RegistryUnavailable, UnsafeArchive
from .manifest import Descriptor
from .tarstream import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    TarEntry,
    TarReader,
)

log = logging.getLogger(__name__)

# gzip layers are inflated with ISA-L's igzip (``isal``), about 3x zlib's speed on text-like layers
# (measured: 690 vs 230 MB/s), with zlib's interface and the same bounds. Compressed input is fed to
# the inflater in slices of this size: it copies the unconsumed input
# (``unconsumed_tail``) on every call that hits ``max_length``, so big slices make inflating
# highly compressible data quadratic (backend layers compress up to 1000:1 in places).
INFLATE_INPUT_SLICE = 64 * 1024
# The most a single decompressor call may produce; bounds memory whatever the compression ratio.
INFLATE_OUTPUT_CAP = 1024 * 1024
# Reads from the network and copies into files use this size.
COPY_CHUNK = 1024 * 1024
# Default minimum interval between two progress callbacks (start and end of a layer always report).
PROGRESS_INTERVAL = 0.2

# Permission bits an unpacked entry keeps: no setuid, setgid or sticky bit, and no write for
# "other": a world-writable file or directory in a backend would let any local user change code
# the portal and LocalAI run. (The sticky bit only matters in a directory others may write to.)
MODE_MASK = 0o775
# Symlinks nested deeper than this cannot be followed by Linux either (MAXSYMLINKS); the final
# check refuses them rather than trying to decide where they lead.
MAX_SYMLINK_DEPTH = 40
# Linux stores no longer symlink target (PATH_MAX - 1); a longer one could not be created anyway.
MAX_SYMLINK_TARGET = 4095

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

_REFUSED_TYPES = {CHARDEV: "character device", BLOCKDEV: "block device", FIFO: "FIFO"}
_OPEN_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class PullProgress:
    """What a progress callback receives. Byte counts are compressed bytes, as downloaded."""

    layer_index: int  # 0-based index of the layer being transferred
    layer_count: int
    layer_digest: str
    layer_done: int
    layer_total: int
    done: int  # all layers so far
    total: int  # sum of all layer sizes

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


ProgressCallback = Callable[[PullProgress], None]


class ProgressTracker:
    """Turns per-chunk byte counts into :class:`PullProgress` calls at a bounded rate."""

    def __init__(
        self,
        callback: ProgressCallback | None,
        layers: Sequence[Descriptor],
        interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self._callback = callback
        self._layers = layers
        self._interval = interval
        self._total = sum(layer.size for layer in layers)
        self._before = 0  # bytes of the finished layers
        self._index = 0
        self._layer_done = 0
        self._last = 0.0

    def start_layer(self, index: int) -> None:
        self._index = index
        self._layer_done = 0
        self._emit(force=True)

    def add(self, n: int) -> None:
        self._layer_done += n
        self._emit(force=False)

    def end_layer(self) -> None:
        self._emit(force=True)
        self._before += self._layer_done
        self._layer_done = 0

    def _emit(self, *, force: bool) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        layer = self._layers[self._index]
        self._callback(
            PullProgress(
                layer_index=self._index,
                layer_count=len(self._layers),
                layer_digest=layer.digest,
                layer_done=self._layer_done,
                layer_total=layer.size,
                done=self._before + self._layer_done,
                total=self._total,
            )
        )


class BlobReader:
    """A file-like view of a blob's chunks that hashes and counts every byte it receives.

    It refuses to read past the descriptor's size (a registry streaming endless data) and
    :meth:`verify` drains what is left, then compares size and digest.
    """

    def __init__(
        self, chunks: Iterable[bytes], descriptor: Descriptor, on_bytes: Callable[[int], None] | None = None
    ) -> None:
        self.descriptor = descriptor
        self._chunks: Iterator[bytes] = iter(chunks)
        algorithm = descriptor.digest.partition(":")[0]
        self._hash = hashlib.new(algorithm)
        self._on_bytes = on_bytes
        self._buffer = memoryview(b"")
        self._eof = False
        self.received = 0

    def _next_chunk(self) -> bytes | None:
        while not self._eof:
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._eof = True
                return None
            if not chunk:
                continue
            self.received += len(chunk)
            if self.received > self.descriptor.size:
                raise DigestMismatch(
                    f"blob {self.descriptor.digest}: registry sent more than the "
                    f"{self.descriptor.size} bytes the manifest declares"
                )
            self._hash.update(chunk)
            if self._on_bytes is not None:
                self._on_bytes(len(chunk))
            return chunk
        return None

    def read(self, n: int = -1, /) -> bytes:
        if not self._buffer:
            chunk = self._next_chunk()
            if chunk is None:
                return b""
            self._buffer = memoryview(chunk)
        if n < 0 or n >= len(self._buffer):
            out = self._buffer.tobytes()
            self._buffer = memoryview(b"")
        else:
            out = self._buffer[:n].tobytes()
            self._buffer = self._buffer[n:]
        return out

    def close(self) -> None:
        """Release the chunk source (an HTTP response) early, e.g. after an error."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def drain(self) -> None:
        """Consume (and hash) the rest of the blob without decompressing it."""
        self._buffer = memoryview(b"")
        while self._next_chunk() is not None:
            pass

    def verify(self) -> None:
        self.drain()
        digest = f"{self._hash.name}:{self._hash.hexdigest()}"
        if self.received != self.descriptor.size:
            raise DigestMismatch(
                f"blob {self.descriptor.digest}: received {self.received} bytes, "
                f"the manifest declares {self.descriptor.size}"
            )
        if digest != self.descriptor.digest:
            raise DigestMismatch(f"blob {self.descriptor.digest}: content hashes to {digest}")


# The inflater's exception class (its type stubs declare it as an instance).
_INFLATE_ERROR = cast("type[Exception]", isal_zlib.error)


def _gzip_inflater() -> isal_zlib.Decompress:
    return isal_zlib.decompressobj(16 + isal_zlib.MAX_WBITS)


class GzipReader:
    """Inflates a gzip stream (several members allowed) with bounded memory per call.

    ``read(n)`` returns at most ``n`` bytes; each zlib call produces at most
    :data:`INFLATE_OUTPUT_CAP` bytes from at most :data:`INFLATE_INPUT_SLICE` bytes of input.
    """

    def __init__(self, source: Readable, label: str) -> None:
        self._source = source
        self._label = label
        self._inflater = _gzip_inflater()
        self._pending = memoryview(b"")  # compressed input not yet given to zlib
        self._tail = b""  # input zlib held back because it hit max_length
        self._out = memoryview(b"")
        self._in_member = False
        self._trailing = False

    def _inflate_some(self) -> bool:
        """Produce some output into ``self._out``; False at the end of the stream."""
        while True:
            if self._tail:
                data: bytes | memoryview = self._tail
            else:
                if not self._pending:
                    chunk = self._source.read(COPY_CHUNK)
                    if not chunk:
                        if self._in_member and not self._inflater.eof:
                            raise OCIError(f"{self._label}: truncated gzip stream")
                        return False
                    self._pending = memoryview(chunk)
                if self._trailing:
                    self._pending = memoryview(b"")  # bytes after the last member are ignored
                    continue
                data = self._pending[:INFLATE_INPUT_SLICE]
                self._pending = self._pending[INFLATE_INPUT_SLICE:]
            self._in_member = True
            try:
                out = self._inflater.decompress(data, INFLATE_OUTPUT_CAP)
            except _INFLATE_ERROR as exc:
                raise OCIError(f"{self._label}: corrupt gzip data ({exc})") from None
            self._tail = self._inflater.unconsumed_tail
            if self._inflater.eof:
                rest = self._inflater.unused_data + self._pending.tobytes()
                self._pending = memoryview(rest)
                self._inflater = _gzip_inflater()
                self._in_member = False
                # Another member follows only if it starts with the gzip magic (whose two bytes
                # may be split across chunks); anything else (zero padding written by some
                # tools) is ignored, as gzip(1) does.
                if rest and not b"\x1f\x8b".startswith(rest[:2]):
                    self._trailing = True
            if out:
                self._out = memoryview(out)
                return True

    def read(self, n: int = -1, /) -> bytes:
        if not self._out and not self._inflate_some():
            return b""
        if n < 0 or n >= len(self._out):
            result = self._out.tobytes()
            self._out = memoryview(b"")
        else:
            result = self._out[:n].tobytes()
            self._out = self._out[n:]
        return result


class _ZstdReader:
    """zstd via ``zstandard``'s stream reader, whose ``read(n)`` never returns more than ``n`` bytes."""

    def __init__(self, source: Readable, label: str) -> None:
        self._label = label
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", source), read_size=INFLATE_INPUT_SLICE, read_across_frames=True
        )

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._reader.read(min(n, INFLATE_OUTPUT_CAP) if n >= 0 else INFLATE_OUTPUT_CAP)
        except zstandard.ZstdError as exc:
            raise OCIError(f"{self._label}: corrupt zstd data ({exc})") from None


def decompressing_reader(source: Readable, media_type: str, label: str) -> Readable:
    """The uncompressed tar stream of a layer, chosen by its media type."""
    if media_type.endswith("+zstd"):
        return _ZstdReader(source, label)
    if media_type.endswith(("+gzip", ".gzip")) or media_type.endswith("tar.gzip"):
        return GzipReader(source, label)
    if media_type.endswith((".tar", "layer.v1.tar", "rootfs.diff.tar")) or media_type == "":
        return source
    raise OCIError(f"{label}: unsupported layer media type {media_type!r}")


@dataclass
class UnpackStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    rerooted_symlinks: int = 0  # absolute targets rewritten as relative links inside the tree
    whiteouts: int = 0
    bytes_written: int = 0


class EntryData(Protocol):
    """Where a regular file's bytes come from: :class:`TarReader`, or any source of the same shape."""

    def read_data(self, size: int) -> Iterable[bytes | memoryview]: ...


class RootfsWriter:
    """Applies tar layers, in order, onto ``root`` with the safety rules of the module docstring.

    The same rules serve trees that are not image layers (an archive, a directory being copied;
    see ``backends_app.sources``): with ``whiteouts`` False a ``.wh.`` name is an ordinary file, and
    with ``reroot_absolute_links`` False an absolute symlink target is refused instead of being
    re-rooted, since such a tree was never a root filesystem.
    """

    def __init__(self, root: Path, *, whiteouts: bool = True, reroot_absolute_links: bool = True) -> None:
        self.root = Path(root)
        self._whiteouts = whiteouts
        self._reroot = reroot_absolute_links
        self._root_str = os.fspath(self.root)
        self.stats = UnpackStats()
        # Relative directory paths known to be real directories (not symlinks) right now. Any
        # removal clears it, since a directory may be replaced by a symlink afterwards.
        self._real_dirs: set[str] = {""}
        # Paths created by the layer being applied: whiteouts only remove what lower layers made.
        self._this_layer: set[str] = set()
        # Directory modes and mtimes are applied last, so read-only directories can be filled.
        self._dir_meta: dict[str, tuple[int, float]] = {}
        # Which layer wrote each symlink, to name it when the final check refuses the tree.
        self._link_layers: dict[str, str] = {}
        self._label = ""

    # -- entry points -----------------------------------------------------------------------

    def apply_layer(self, tar_stream: Readable, label: str) -> None:
        """Apply one uncompressed tar stream. ``label`` names the layer in error messages."""
        self._label = label
        self._this_layer = set()
        reader = TarReader(tar_stream, label)
        for entry in reader:
            self._apply_entry(reader, entry)

    def apply_entries(self, entries: Iterable[tuple[TarEntry, EntryData]], label: str) -> None:
        """Apply entries that come from elsewhere than a tar stream, as one layer named ``label``.

        Each entry comes with the source of its data (read only for a regular file, exactly
        ``entry.size`` bytes). The tree still needs :meth:`finish`.
        """
        self._label = label
        self._this_layer = set()
        for entry, data in entries:
            self._apply_entry(data, entry)

    def finish(self) -> None:
        """Check every symlink of the finished tree, then set directory modes and times.

        The modes wait until now so read-only directories could be filled; the links are checked
        here, not only when written, because a later entry or layer may replace a directory on a
        link's path with another link.
        """
        self.verify_links()
        for rel, (mode, mtime) in sorted(self._dir_meta.items(), key=lambda item: -item[0].count("/")):
            try:
                fd = self._open_dir(rel)
            except OSError:
                continue  # removed or replaced by a later layer
            try:
                os.fchmod(fd, mode)
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)

    # -- one entry --------------------------------------------------------------------------

    def _unsafe(self, name: str, reason: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self._label}: entry {name!r}: {reason}")

    def _split(self, name: str, path: str | None = None, what: str = "path") -> list[str]:
        """The components of ``path`` (default: the entry ``name``), refusing absolute and '..'."""
        text = name if path is None else path
        shown = "" if path is None else f" {path!r}"
        if text.startswith("/"):
            raise self._unsafe(name, f"absolute {what}{shown}")
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self._unsafe(name, f"'..' in {what}{shown}")
        if "\x00" in text:
            raise self._unsafe(name, f"NUL byte in {what}{shown}")
        return parts

    def _apply_entry(self, reader: EntryData, entry: TarEntry) -> None:
        name = entry.name
        parts = self._split(name)
        if not parts:
            return  # the root directory entry "./"
        if entry.type in _REFUSED_TYPES:
            raise self._unsafe(name, f"{_REFUSED_TYPES[entry.type]} not allowed")
        if self._whiteouts and parts[-1].startswith(WHITEOUT_PREFIX):
            self._apply_whiteout(name, parts)
            return
        rel = "/".join(parts)
        parent = "/".join(parts[:-1])
        if parent not in self._real_dirs:
            self._ensure_parent_dirs(name, parts[:-1])
        path = os.path.join(self._root_str, rel)

        if entry.type == REGULAR:
            self._write_file(reader, entry, rel, path)
        elif entry.type == DIRECTORY:
            self._make_dir(rel, path)
            self._dir_meta[rel] = (entry.mode & MODE_MASK, entry.mtime)
            self.stats.directories += 1
        elif entry.type == SYMLINK:
            target = self._symlink_target(name, parts[:-1], entry.linkname, rerooted=self._reroot)
            self._clear_path(rel, path)
            os.symlink(target, path)
            with contextlib.suppress(OSError):
                os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)
            self._link_layers[rel] = self._label
            self.stats.symlinks += 1
        elif entry.type == HARDLINK:
            source = self._hardlink_source(name, entry.linkname)
            if source == path:
                return  # a link to itself (some tools write them); the file is already there
            if source.startswith(path + "/"):
                raise self._unsafe(name, f"hard link to {entry.linkname!r} would remove its own target")
            if os.path.islink(source):
                # A hard link to a symlink is a second symlink with the same target, now seen
                # from another directory: check it as one.
                self._symlink_target(name, parts[:-1], os.readlink(source), rerooted=False)
                self._link_layers[rel] = self._label
            self._clear_path(rel, path)
            os.link(source, path, follow_symlinks=False)
            self.stats.hardlinks += 1
        else:
            raise self._unsafe(name, f"unsupported tar entry type {entry.type!r}")
        self._mark_written(parts)

    def _mark_written(self, parts: list[str]) -> None:
        """Record ``parts`` and its parents as made by this layer (a set member's parents are members)."""
        written = self._this_layer
        for i in range(len(parts), 0, -1):
            rel = "/".join(parts[:i])
            if rel in written:
                return  # its parents were marked with it
            written.add(rel)

    def _ensure_parent_dirs(self, name: str, parts: list[str]) -> None:
        """Make sure every parent of an entry is a real directory, creating missing ones."""
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            if rel in self._real_dirs:
                continue
            path = os.path.join(self._root_str, rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                self._real_dirs.add(rel)
                continue  # marked as this layer's by _mark_written, with the entry
            if stat.S_ISLNK(st.st_mode):
                raise self._unsafe(name, f"would be written through the symlink {rel!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise OCIError(f"{self._label}: entry {name!r}: parent {rel!r} is not a directory")
            self._real_dirs.add(rel)

    def _clear_path(self, rel: str, path: str) -> None:
        """Remove whatever is at ``path`` (a lower layer's file, or an earlier entry)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self._forget_dirs()
        else:
            os.unlink(path)

    def _forget_dirs(self) -> None:
        self._real_dirs = {""}

    def _make_dir(self, rel: str, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                self._real_dirs.add(rel)
                return
            os.unlink(path)  # a file or symlink becomes a directory
        # Owner rwx until finish(), whatever the final mode, so children can be written.
        os.mkdir(path, 0o700)
        self._real_dirs.add(rel)

    def _write_file(self, reader: EntryData, entry: TarEntry, rel: str, path: str) -> None:
        try:
            fd = os.open(path, _OPEN_NEW_FILE, 0o600)
        except FileExistsError:
            # A lower layer's file (or symlink, or directory) is there: replace it.
            self._clear_path(rel, path)
            fd = os.open(path, _OPEN_NEW_FILE, 0o600)
        try:
            for view in reader.read_data(entry.size):
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            os.fchmod(fd, entry.mode & MODE_MASK)
            os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.bytes_written += entry.size

    def _symlink_target(self, name: str, parent: list[str], target: str, *, rerooted: bool = True) -> str:
        """The target to write for a symlink in directory ``parent``: absolute ones re-rooted.

        Only the lexical check happens here; where the link really leads depends on the links
        around it, which later entries may still change, so :meth:`verify_links` decides that on
        the finished tree.
        """
        if not target:
            raise self._unsafe(name, "symlink with an empty target")
        if "\x00" in target:
            raise self._unsafe(name, "NUL byte in symlink target")
        if len(os.fsencode(target)) > MAX_SYMLINK_TARGET:
            raise self._unsafe(name, f"symlink target longer than {MAX_SYMLINK_TARGET} bytes")
        if target.startswith("/"):
            if not rerooted:
                raise self._unsafe(name, f"symlink to the absolute path {target!r}")
            target = reroot_symlink_target(parent, target)
            self.stats.rerooted_symlinks += 1
        lexical = posixpath.normpath(posixpath.join(*parent, target) if parent else target)
        if lexical == ".." or lexical.startswith("../"):
            raise self._unsafe(name, f"symlink {target!r} points outside the target")
        return target

    def _hardlink_source(self, name: str, linkname: str) -> str:
        parts = self._split(name, linkname, "hard link target")
        if not parts:
            raise self._unsafe(name, "hard link to the root directory")
        for i in range(1, len(parts)):
            rel = "/".join(parts[:i])
            try:
                st = os.lstat(os.path.join(self._root_str, rel))
            except FileNotFoundError:
                raise self._unsafe(name, f"hard link to missing {linkname!r}") from None
            if not stat.S_ISDIR(st.st_mode):
                raise self._unsafe(name, f"hard link target {linkname!r} goes through non-directory {rel!r}")
        source = os.path.join(self._root_str, *parts)
        try:
            st = os.lstat(source)
        except FileNotFoundError:
            raise self._unsafe(name, f"hard link to missing {linkname!r}") from None
        if stat.S_ISDIR(st.st_mode):
            raise self._unsafe(name, f"hard link to the directory {linkname!r}")
        return source

    # -- whiteouts --------------------------------------------------------------------------

    def _apply_whiteout(self, name: str, parts: list[str]) -> None:
        base = parts[-1]
        parent_parts = parts[:-1]
        parent = "/".join(parent_parts)
        if base == OPAQUE_WHITEOUT:
            self._ensure_parent_dirs(name, parent_parts)
            self._mark_written(parent_parts)
            self._remove_lower(os.path.join(self._root_str, parent) if parent else self._root_str, parent)
            self.stats.whiteouts += 1
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk and friends): nothing to apply
        victim = base[len(WHITEOUT_PREFIX) :]
        if victim in ("", ".", ".."):
            raise self._unsafe(name, "malformed whiteout")
        rel = "/".join([*parent_parts, victim])
        self.stats.whiteouts += 1
        if rel in self._this_layer:
            # This layer made it (the whiteout came after it in the archive): keep what this
            # layer wrote, hide only what lower layers had there.
            path = os.path.join(self._root_str, rel)
            if rel in self._real_dirs or (os.path.isdir(path) and not os.path.islink(path)):
                self._ensure_parent_dirs(name, [*parent_parts, victim])
                self._remove_lower(path, rel)
            return
        # Never delete through a symlink: every parent must be a real directory (or missing).
        for i in range(1, len(parent_parts) + 1):
            prefix = "/".join(parent_parts[:i])
            try:
                st = os.lstat(os.path.join(self._root_str, prefix))
            except FileNotFoundError:
                return
            if stat.S_ISLNK(st.st_mode):
                raise self._unsafe(name, f"whiteout through the symlink {prefix!r}")
            if not stat.S_ISDIR(st.st_mode):
                return
        self._clear_path(rel, os.path.join(self._root_str, rel))

    def _remove_lower(self, path: str, rel: str) -> None:
        """Opaque directory: remove everything under ``path`` that this layer did not create."""
        with os.scandir(path) as entries:
            children = list(entries)
        for entry in children:
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if child_rel not in self._this_layer:
                if is_dir:
                    shutil.rmtree(entry.path)
                    self._forget_dirs()
                else:
                    os.unlink(entry.path)
            elif is_dir:
                self._remove_lower(entry.path, child_rel)

    # -- the finished tree's links ------------------------------------------------------------

    def verify_links(self) -> None:
        """Refuse the tree if any of its symlinks resolves outside it, whatever wrote it and when.

        Each link is resolved component by component from its own directory, following the
        other links of the tree as the kernel would; a ``..`` above the root is an escape, even
        if the path would come back in. Components that are missing or not directories are
        taken as plain names (the kernel would fail there, but a backend could create them
        later). Cost: one directory walk plus, per link, the length of its target (a link
        already resolved is not resolved again).
        """
        links = self._tree_links()
        resolved: dict[str, _Location] = {}
        for rel in sorted(links):
            self._resolve_link(rel, links, resolved, [])

    def _tree_links(self) -> dict[str, str]:
        """Every symlink under the root (relative path -> target), without following any."""
        links: dict[str, str] = {}
        pending = [""]
        while pending:
            rel = pending.pop()
            with os.scandir(os.path.join(self._root_str, rel) if rel else self._root_str) as entries:
                for entry in entries:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_symlink():
                        links[child] = os.readlink(entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        pending.append(child)
        return links

    def _resolve_link(
        self, rel: str, links: dict[str, str], resolved: dict[str, _Location], active: list[str]
    ) -> _Location:
        """Where the link ``rel`` leads, as a location inside the tree; raises if it leads out.

        ``active`` holds the links whose resolution is under way (the chain that led here).
        """
        if rel in resolved:
            return resolved[rel]
        target = links[rel]
        if rel in active:
            raise self._link_refused(rel, target, "is part of a symlink loop")
        if len(active) >= MAX_SYMLINK_DEPTH:
            first = active[0]
            raise self._link_refused(
                first, links[first], f"leads through more than {MAX_SYMLINK_DEPTH} nested symlinks"
            )
        if target.startswith("/"):
            raise self._link_refused(rel, target, "points to an absolute path")
        active.append(rel)
        location: _Location = None
        for part in rel.split("/")[:-1]:
            location = _Step(part if location is None else f"{location.path}/{part}", location)
        followed = ""
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if location is None:
                    through = (
                        f" through the symlink {followed!r}{self._layer_of(followed)}" if followed else ""
                    )
                    raise self._link_refused(rel, target, f"resolves outside the target{through}")
                location = location.parent
                continue
            location = _Step(part if location is None else f"{location.path}/{part}", location)
            if location.path in links:
                followed = location.path
                location = self._resolve_link(location.path, links, resolved, active)
        active.pop()
        resolved[rel] = location
        return location

    def _layer_of(self, rel: str) -> str:
        label = self._link_layers.get(rel)
        return f" written by {label}" if label else ""

    def _link_refused(self, rel: str, target: str, reason: str) -> UnsafeArchive:
        label = self._link_layers.get(rel, "image")
        return UnsafeArchive(f"{label}: entry {rel!r}: symlink {target!r} {reason}")

    # -- helpers ----------------------------------------------------------------------------

    def _open_dir(self, rel: str) -> int:
        """Open ``rel`` as a directory without following any symlink on the way."""
        fd = os.open(self._root_str, _OPEN_DIR)
        try:
            for part in [p for p in rel.split("/") if p]:
                child = os.open(part, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError:
            os.close(fd)
            raise
        return fd


@dataclass(frozen=True, slots=True)
class _Step:
    """A location inside the tree: its path from the root and the location of its parent.

    Shared parent chains make ``..`` and "continue from where that link led" cost O(1).
    """

    path: str
    parent: _Location


_Location = _Step | None  # None: the root of the tree


def reroot_symlink_target(parent: Sequence[str], target: str) -> str:
    """An absolute target rewritten relative to the link's directory ``parent``, inside the tree.

    The image's ``/`` is the tree's root, as it was the root filesystem of the image's build: a
    link ``usr/lib/x/libz.so -> /lib/x/libz.so.1`` becomes ``../../../lib/x/libz.so.1``. Leading
    ``..`` components are dropped (``/..`` is ``/``); the rest is kept as written, so a ``..``
    after a link still goes where it would have gone in the image.
    """
    parts = [p for p in target.split("/") if p not in ("", ".")]
    while parts and parts[0] == "..":
        parts.pop(0)
    relative = "/".join([".."] * len(parent) + parts)
    return relative or "."


LayerSource = tuple[Descriptor, Callable[[], Iterable[bytes]]]


def apply_blob(
    writer: RootfsWriter,
    descriptor: Descriptor,
    chunks: Iterable[bytes],
    label: str,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Verify, inflate and apply one layer blob in a single pass over ``chunks``."""
    blob = BlobReader(chunks, descriptor, on_bytes)
    try:
        writer.apply_layer(decompressing_reader(blob, descriptor.media_type, label), label)
        blob.verify()
    except (DigestMismatch, RegistryUnavailable):
        raise
    except OCIError as exc:
        # Corruption often surfaces as a gzip or tar error first; the digest is the real verdict.
        # (Anything else, such as a progress callback cancelling the job or a full disk,
        # propagates at once without reading the rest of the blob.)
        try:
            blob.verify()
        except DigestMismatch as mismatch:
            raise mismatch from exc
        except Exception:
            log.debug("could not finish reading %s after an error", descriptor.digest, exc_info=True)
        raise
    finally:
        blob.close()


def create_destination(dest: str | os.PathLike[str]) -> Path:
    """Create the directory a pull unpacks into (0755); it must not exist, its parent must."""
    dest_path = Path(dest)
    try:
        dest_path.mkdir(mode=0o755)
    except FileExistsError:
        raise OCIError(f"destination {dest_path} already exists") from None
    except FileNotFoundError:
        raise OCIError(f"parent directory of {dest_path} does not exist") from None
    return dest_path


def unpack_layers(
    dest: str | os.PathLike[str],
    layers: Sequence[LayerSource],
    progress: ProgressCallback | None = None,
    progress_interval: float = PROGRESS_INTERVAL,
) -> UnpackStats:
    """Create ``dest`` (which must not exist) and apply ``layers`` onto it, in order.

    Each layer is a descriptor plus a function opening its chunk stream (called once, when the
    layer's turn comes, so only one connection is open at a time). On any failure ``dest`` is
    removed entirely before the exception propagates.
    """
    dest_path = create_destination(dest)
    tracker = ProgressTracker(progress, [descriptor for descriptor, _ in layers], progress_interval)
    writer = RootfsWriter(dest_path)
    try:
        for index, (descriptor, open_chunks) in enumerate(layers):
            label = f"layer {index + 1}/{len(layers)} ({descriptor.digest[:19]})"
            tracker.start_layer(index)
            apply_blob(writer, descriptor, open_chunks(), label, tracker.add)
            tracker.end_layer()
        writer.finish()
    except BaseException:
        remove_tree(dest_path)
        raise
    return writer.stats


def remove_tree(path: Path) -> None:
    """Remove a tree we created, even where a layer left directories without write permission."""

    def _make_writable_and_retry(func: Callable[..., object], failed: str, _exc: object) -> None:
        parent = os.path.dirname(failed)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(failed)

    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, onerror=_make_writable_and_retry)
