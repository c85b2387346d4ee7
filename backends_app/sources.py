"""Backends that are not images: a local directory, or an archive over http(s):// or file://.

A plain module (no Django, no ORM): the seam between the install procedure and these two outside
systems, as ``oci`` is for registries. It classifies a gallery ``uri`` (`kind_of`), checks a local
path against the directories it may come from (`confine`), copies a directory (`copy_tree`),
downloads an archive while hashing it (`download`) and extracts it (`extract`). Every tree is
written by the OCI unpacker's `RootfsWriter`, so the same rules hold whatever the source: names
relative and free of ``..``, nothing written through a symlink, no device or FIFO, modes without
setuid/setgid/sticky or world-write, and no symlink of the finished tree resolving outside it.

Symlinks. LocalAI refuses any symlink in an archive and copies a directory's symlinks as they are.
Here a relative symlink is kept when it resolves inside the tree (checked on the finished tree);
an absolute one is refused, since it would reach the host's files. In a copied directory, an
absolute link to a place inside the source tree is rewritten as the equivalent relative link.

Digests. The digest recorded for an archive is ``sha256:<hex>`` of the archive file as downloaded;
for a directory, the tree digest defined by `tree_digest` (computed while copying).

Errors are `SourceError` (this source failed: the caller may try the next one) and the OCI
engine's `UnsafeArchive` (a hostile tree: the caller stops).
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import logging
import lzma
import os
import random
import stat
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from backends_app.http_retry import retry_after_seconds
from backends_app.oci.client import TRANSFER_ERRORS, RegistryConfig, _TooSlow, _TransferWatch, _watched_body
from backends_app.oci.errors import OCIError, UnsafeArchive
from backends_app.oci.reference import parse_reference
from backends_app.oci.tarstream import DIRECTORY, REGULAR, SYMLINK, TarEntry
from backends_app.oci.unpack import (
    COPY_CHUNK,
    INFLATE_INPUT_SLICE,
    INFLATE_OUTPUT_CAP,
    MAX_SYMLINK_TARGET,
    MODE_MASK,
    GzipReader,
    Readable,
    RootfsWriter,
    decompressing_reader,
    remove_tree,
)

log = logging.getLogger(__name__)

IMAGE = "image"
PATH = "path"
URL = "url"

METADATA_FILE = "metadata.json"  # never copied from a source: the procedure writes its own
ARCHIVE_SUFFIXES = (
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.xz",
    ".txz",
    ".tar.zst",
    ".tzst",
    ".tar.bz2",
    ".tbz2",
    ".zip",
)
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# A copied tree deeper than this is refused (the walk recurses once per level).
MAX_DEPTH = 200

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all or 0 when unknown) as a transfer advances."""


class SourceError(Exception):
    """This source could not provide the backend (missing, unreachable, corrupt, too big)."""


class IntegrityMismatch(SourceError):
    """The archive does not hash to the sha256 its gallery entry declares."""


# --- what a uri names ------------------------------------------------------------------------------


def kind_of(uri: str) -> str:
    """`IMAGE`, `PATH` (an absolute local path: a directory, or an archive file) or `URL`.

    As LocalAI reads a gallery ``uri`` (pkg/downloader/uri.go): ``http(s)://`` and ``file://`` are
    downloaded, a local path is copied (a directory) or read (a file); anything else is an image
    reference. A local path must be absolute here; LocalAI also takes one relative to its working
    directory, which a portal running elsewhere cannot mean.
    """
    text = uri.strip()
    if text.lower().startswith(("http://", "https://", "file://")):
        return URL
    if text.startswith("/"):
        return PATH
    return IMAGE


def is_archive_name(name: str) -> bool:
    """Whether a path or URL ends like an archive LocalAI would extract (query strings aside)."""
    path = urlsplit(name).path if "://" in name else name
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def shown(uri: str) -> str:
    """A URL as messages may show it: no user, password or query values (they may be secrets)."""
    parts = urlsplit(uri.strip())
    if parts.scheme.lower() not in ("http", "https"):
        return uri.strip()
    netloc = parts.netloc.rpartition("@")[2]
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def fallback_uris(
    uri: str, release_tag: str = "latest", branch_tag: str = "master", dev_suffix: str = "development"
) -> list[str]:
    """LocalAI's tag fallbacks for an image reference (core/gallery/backends.go InstallBackend).

    ``...:latest-cpu-x`` falls back to ``...:master-cpu-x`` and then ``...:master-cpu-x-development``
    (the second only when the first has no ``-development``). LocalAI replaces the first
    ``latest-`` anywhere in the string; here only in the tag, where it means something. A reference
    pinned to a digest has no fallback.
    """
    text = uri.strip()
    if kind_of(text) != IMAGE or "@" in text:
        return []
    head, colon, tag = text.rpartition(":")
    if not colon or "/" in tag:
        return []
    branch = tag.replace(f"{release_tag}-", f"{branch_tag}-", 1)
    if branch == tag:
        return []
    found = [f"{head}:{branch}"]
    if f"-{dev_suffix}" not in branch:
        found.append(f"{head}:{branch}-{dev_suffix}")
    valid = []
    for candidate in found:
        try:
            parse_reference(candidate)
        except OCIError:
            continue
        valid.append(candidate)
    return valid


def development_uri(uri: str, release_tag: str = "latest", branch_tag: str = "master") -> str | None:
    """The branch build of a released image (``...:latest-cpu-x`` -> ``...:master-cpu-x``), which
    LocalAI's PreferDevelopmentBackends installs first (core/gallery/backends.go developmentURI);
    None when there is none (no release tag, a branch tag already, a digest, not an image). As in
    :func:`fallback_uris`, only the tag is looked at."""
    text = uri.strip()
    if kind_of(text) != IMAGE or "@" in text:
        return None
    head, colon, tag = text.rpartition(":")
    if not colon or "/" in tag or f"{branch_tag}-" in tag:
        return None
    branch = tag.replace(f"{release_tag}-", f"{branch_tag}-", 1)
    if branch == tag:
        return None
    try:
        parse_reference(f"{head}:{branch}")
    except OCIError:
        return None
    return f"{head}:{branch}"


def confine(path: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]], what: str) -> Path:
    """``path`` with symlinks followed, if it lies strictly below one of ``roots``; else SourceError.

    LocalAI's trusted-root rule (pkg/utils/path.go InTrustedRoot), on both the path as written and
    the path with symlinks followed: the first makes the answer for a path elsewhere independent of
    what exists there, the second refuses a link under a root that leads out of it. The root
    itself does not qualify.
    """
    written, real = Path(os.path.abspath(path)), Path(os.path.realpath(path))
    for root in roots:
        base, real_base = Path(os.path.abspath(root)), Path(os.path.realpath(root))
        if base in written.parents and real_base in real.parents:
            return real
    allowed = ", ".join(str(root) for root in roots) or "(none)"
    raise SourceError(f"{what} {path} is not below a directory backends may come from ({allowed})")


# --- the tree digest -----------------------------------------------------------------------------


class _TreeHasher:
    """Collects one record per entry of a tree; `digest` hashes them in path order.

    A record is ``kind, mode, path, data``, each field followed by a NUL byte (no field can hold
    one): kind ``d`` (directory, data empty), ``f`` (file, data the hex SHA-256 of its content) or
    ``l`` (symlink, data its target, mode 0); mode is the octal permission bits as installed
    (``mode & 0o775``); path is relative, ``/``-separated, encoded as UTF-8 (undecodable bytes
    kept). The records are sorted by path bytes. The top-level metadata.json is left out: the
    portal writes it, so the digest describes what the source provided.
    """

    def __init__(self) -> None:
        self.records: list[tuple[bytes, bytes]] = []

    def add(self, kind: str, mode: int, path: str, data: str) -> None:
        raw = os.fsencode(path)
        shown_mode = f"{mode & MODE_MASK:04o}" if kind != "l" else "0000"
        record = b"\0".join([kind.encode(), shown_mode.encode(), raw, os.fsencode(data)]) + b"\0"
        self.records.append((raw, record))

    @property
    def digest(self) -> str:
        hasher = hashlib.sha256()
        for _, record in sorted(self.records):
            hasher.update(record)
        return f"sha256:{hasher.hexdigest()}"


def tree_digest(root: str | os.PathLike[str]) -> str:
    """The digest of a backend tree on disk (see `_TreeHasher`), without following any symlink.

    What `copy_tree` returns for the tree it wrote, recomputed from the disk: the installed
    directory of a directory backend hashes to the digest in its metadata.json.
    """
    hasher = _TreeHasher()
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as entries:
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                if child == METADATA_FILE:
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    hasher.add("l", 0, child, os.readlink(entry.path))
                elif stat.S_ISDIR(info.st_mode):
                    hasher.add("d", info.st_mode, child, "")
                    pending.append(child)
                else:
                    content = hashlib.sha256()
                    with open(entry.path, "rb") as handle:
                        while chunk := handle.read(COPY_CHUNK):
                            content.update(chunk)
                    hasher.add("f", info.st_mode, child, content.hexdigest())
    return hasher.digest


# --- budgets and progress --------------------------------------------------------------------------


@dataclass
class _Budget:
    """Bytes a download or an extraction may still write before the disk runs out."""

    limit: int | None
    what: str
    used: int = 0

    def add(self, count: int) -> None:
        self.used += count
        if self.limit is not None and self.used > self.limit:
            raise SourceError(
                f"{self.what} needs more than the {self.limit} bytes free on the state directory's disk"
            )


# --- copying a directory ---------------------------------------------------------------------------


@dataclass
class CopyResult:
    digest: str
    files: int
    bytes: int


class _FileData:
    """A source file opened without following links; its bytes hashed and counted as they are read."""

    def __init__(self, fd: int, rel: str, on_bytes: Callable[[int], None]) -> None:
        self.fd = fd
        self.rel = rel
        self.on_bytes = on_bytes
        self.sha256 = hashlib.sha256()
        self.complete = False

    def read_data(self, size: int) -> Iterator[bytes]:
        remaining = size
        while remaining:
            chunk = os.read(self.fd, min(COPY_CHUNK, remaining))
            if not chunk:
                raise SourceError(f"{self.rel} shrank while it was copied")
            remaining -= len(chunk)
            self.sha256.update(chunk)
            self.on_bytes(len(chunk))
            yield chunk
        self.complete = True


class _NoData:
    def read_data(self, size: int) -> Iterator[bytes]:
        return iter(())


def _measure(fd: int, depth: int = 0) -> tuple[int, int]:
    """(regular files, their bytes) under the directory opened as ``fd``, following no link."""
    if depth > MAX_DEPTH:
        raise SourceError(f"the tree is more than {MAX_DEPTH} directories deep")
    files = size = 0
    for entry in os.scandir(fd):
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            child = os.open(entry.name, _OPEN_DIR, dir_fd=fd)
            try:
                more_files, more_bytes = _measure(child, depth + 1)
            finally:
                os.close(child)
            files, size = files + more_files, size + more_bytes
        elif stat.S_ISREG(info.st_mode):
            files += 1
            size += info.st_size
    return files, size


def copy_tree(
    source: Path,
    dest: Path,
    *,
    label: str,
    progress: Progress | None = None,
    free_bytes: int | None = None,
) -> CopyResult:
    """Copy the directory ``source`` to ``dest`` (created; must not exist) and return its digest.

    ``source`` should be the real path (see `confine`); every directory under it is opened relative
    to its parent without following a symlink, and every file with ``O_NOFOLLOW``, so the copy never
    leaves the source tree whatever changes in it meanwhile. Only directories, regular files and
    symlinks are copied (a socket, FIFO or device refuses the tree); hard links become separate
    files; a top-level metadata.json is not copied. ``free_bytes`` bounds what may be written. On
    any failure ``dest`` is removed.
    """
    try:
        root_fd = os.open(source, _OPEN_DIR)
    except FileNotFoundError:
        raise SourceError(f"{source} does not exist") from None
    except NotADirectoryError:
        raise SourceError(f"{source} is not a directory") from None
    except OSError as exc:
        raise SourceError(f"cannot open {source}: {exc.strerror}") from None
    try:
        files, total = _measure(root_fd)
        budget = _Budget(free_bytes, f"copying {source} ({total} bytes)")
        budget.add(total)
        done = [0]
        last = [0.0]

        def on_bytes(count: int) -> None:
            done[0] += count
            now = time.monotonic()
            if progress is not None and (now - last[0] >= 0.2 or done[0] == total):
                last[0] = now
                progress(done[0], total)

        hasher = _TreeHasher()
        try:
            dest.mkdir(mode=0o755)
        except FileExistsError:
            raise SourceError(f"destination {dest} already exists") from None
        writer = RootfsWriter(dest, whiteouts=False, reroot_absolute_links=False)
        try:
            writer.apply_entries(_walk(root_fd, str(source), "", hasher, on_bytes), label)
            writer.finish()
        except BaseException:
            remove_tree(dest)
            raise
        if progress is not None:
            progress(done[0], total)
        return CopyResult(digest=hasher.digest, files=files, bytes=done[0])
    finally:
        os.close(root_fd)


def _walk(
    fd: int, root: str, rel_dir: str, hasher: _TreeHasher, on_bytes: Callable[[int], None]
) -> Iterator[tuple[TarEntry, Any]]:
    """The entries under the directory opened as ``fd``, depth first in name order, as
    `RootfsWriter` takes them. One descriptor is open per level of the tree being walked."""
    for name in sorted(os.listdir(fd)):
        rel = f"{rel_dir}/{name}" if rel_dir else name
        if rel == METADATA_FILE:
            continue
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            hasher.add("d", mode, rel, "")
            yield TarEntry(rel + "/", DIRECTORY, mode, 0, info.st_mtime, ""), _NoData()
            child = os.open(name, _OPEN_DIR, dir_fd=fd)
            try:
                yield from _walk(child, root, rel, hasher, on_bytes)
            finally:
                os.close(child)
        elif stat.S_ISLNK(info.st_mode):
            target = _relative_link(os.readlink(name, dir_fd=fd), root, rel)
            hasher.add("l", 0, rel, target)
            yield TarEntry(rel, SYMLINK, 0o777, 0, info.st_mtime, target), _NoData()
        elif stat.S_ISREG(info.st_mode):
            yield from _file_entry(fd, name, rel, mode, info, hasher, on_bytes)
        else:
            raise UnsafeArchive(
                f"{root}: {rel!r} is {_special_kind(info.st_mode)}; only directories, regular files "
                "and symlinks are copied"
            )


def _file_entry(
    dir_fd: int,
    name: str,
    rel: str,
    mode: int,
    info: os.stat_result,
    hasher: _TreeHasher,
    on_bytes: Callable[[int], None],
) -> Iterator[tuple[TarEntry, Any]]:
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError as exc:
        raise SourceError(f"cannot read {rel}: {exc.strerror}") from None
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(opened.st_mode):
            raise SourceError(f"{rel} changed while it was copied")
        data = _FileData(fd, rel, on_bytes)
        yield TarEntry(rel, REGULAR, mode, opened.st_size, opened.st_mtime, ""), data
        if not data.complete:
            raise SourceError(f"{rel} was not copied whole")
        hasher.add("f", mode, rel, data.sha256.hexdigest())
    finally:
        os.close(fd)


def _relative_link(target: str, root: str, rel: str) -> str:
    """An absolute link to a place inside the source tree, as the same link relative to its directory.

    Any other absolute target is left as it is, for `RootfsWriter` to refuse.
    """
    if not target.startswith("/"):
        return target
    inside = os.path.normpath(target)
    if inside != root and not inside.startswith(root.rstrip("/") + "/"):
        return target
    link_dir = os.path.join(root, os.path.dirname(rel))
    return os.path.relpath(inside, link_dir)


def _special_kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "of an unknown file type"


# --- downloading an archive -------------------------------------------------------------------------


@dataclass
class Download:
    path: Path
    sha256: str
    """Lower-case hex SHA-256 of the bytes downloaded."""
    size: int
    resumes: int = 0


def download(
    uri: str,
    dest: Path,
    *,
    config: RegistryConfig,
    progress: Progress | None = None,
    free_bytes: int | None = None,
    confined_to: Sequence[str | os.PathLike[str]] | None = None,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Download:
    """Stream ``uri`` (http(s)://, file:// or a local file path) into ``dest``, hashing as it comes.

    ``dest`` is created (mode 0600) and must not exist; on failure it is removed. http(s) uses the
    registry client's limits (``config``): connect and read timeouts, ``retries`` with backoff on
    connection errors, timeouts, 429 and 5xx (``Retry-After`` honoured up to ``max_retry_wait``),
    the low-speed limit and the per-blob deadline. A body cut off or too slow is resumed with a
    ``Range`` request where the server advertised ``Accept-Ranges: bytes`` (else started again),
    within ``retries``. ``confined_to`` (a local file set through the web or a gallery): the file
    must lie below one of these directories (`confine`).
    """
    text = uri.strip()
    what = shown(text)
    budget = _Budget(free_bytes, f"downloading {what}")
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SourceError(f"download target {dest} already exists") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            if text.lower().startswith(("http://", "https://")):
                result = _download_http(text, handle, dest, config, progress, budget, session, sleep)
            else:
                result = _copy_local_file(text, handle, dest, progress, budget, confined_to)
            handle.flush()
            os.fsync(handle.fileno())
        return result
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise


def local_path(uri: str) -> Path:
    if uri.lower().startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise SourceError(f"{uri!r} must name an absolute path: file:///absolute/path/backend.tar.gz")
        return Path(unquote(parts.path))
    return Path(uri)


def _copy_local_file(
    uri: str,
    handle: Any,
    dest: Path,
    progress: Progress | None,
    budget: _Budget,
    confined_to: Sequence[str | os.PathLike[str]] | None,
) -> Download:
    path = local_path(uri)
    if confined_to is not None:
        path = confine(path, confined_to, "archive")
    # O_NONBLOCK: a FIFO must not block; O_NOFOLLOW: a link put there since the check must not lead out.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_NOFOLLOW if confined_to is not None else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SourceError(f"{path} does not exist") from None
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(f"{path} is not a regular file")
        os.set_blocking(source.fileno(), True)
        sha256 = hashlib.sha256()
        size = 0
        while chunk := source.read(COPY_CHUNK):
            budget.add(len(chunk))
            handle.write(chunk)
            sha256.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress(size, info.st_size)
    return Download(path=dest, sha256=sha256.hexdigest(), size=size)


def _download_http(
    url: str,
    handle: Any,
    dest: Path,
    config: RegistryConfig,
    progress: Progress | None,
    budget: _Budget,
    session: requests.Session | None,
    sleep: Callable[[float], None],
) -> Download:
    what = shown(url)
    own = session is None
    http = session or _session(url, config)
    watch = _TransferWatch(
        where=what,
        speed_limit=max(0, int(config.speed_limit)),
        speed_time=max(0.001, float(config.speed_time)),
        deadline=max(0.0, float(config.blob_deadline)),
    )
    sha256 = hashlib.sha256()
    received = 0
    attempts = 0  # failed requests and cut-off bodies, against config.retries
    resumes = 0
    ranges = False
    try:
        while True:
            headers = {"Accept-Encoding": "identity"}
            if received and ranges:
                headers["Range"] = f"bytes={received}-"
            try:
                response = http.get(
                    url,
                    headers=headers,
                    stream=True,
                    timeout=config.connect_read_timeout,
                    allow_redirects=True,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempts >= config.retries:
                    raise SourceError(
                        f"downloading {what}: {type(exc).__name__} after {attempts + 1} attempts"
                    ) from None
                sleep(_backoff(config, attempts))
                attempts += 1
                continue
            with contextlib.closing(response):
                status = response.status_code
                if status in _RETRY_STATUSES:
                    wait = retry_after_seconds(response.headers.get("Retry-After"))
                    if attempts >= config.retries or (wait is not None and wait > config.max_retry_wait):
                        raise SourceError(f"downloading {what}: HTTP {status} after {attempts + 1} attempts")
                    sleep(wait if wait is not None else _backoff(config, attempts))
                    attempts += 1
                    continue
                if status not in (200, 206):
                    raise SourceError(f"downloading {what}: HTTP {status} {response.reason or ''}".rstrip())
                if status == 206 and _range_start(response.headers.get("Content-Range")) != received:
                    raise SourceError(f"downloading {what}: the server resumed at the wrong offset")
                if status == 200 and received:
                    # The server started again from the first byte: so do we.
                    handle.seek(0)
                    handle.truncate()
                    budget.used -= received
                    sha256 = hashlib.sha256()
                    received = 0
                ranges = ranges or response.headers.get("Accept-Ranges", "").lower() == "bytes"
                length = response.headers.get("Content-Length", "")
                total = received + int(length) if length.isdigit() else 0
                if total and budget.limit is not None and total > budget.limit:
                    raise SourceError(
                        f"downloading {what}: {total} bytes is more than the {budget.limit} bytes free "
                        "on the state directory's disk"
                    )
                try:
                    for chunk in _watched_body(response, watch):
                        budget.add(len(chunk))
                        handle.write(chunk)
                        sha256.update(chunk)
                        received += len(chunk)
                        if progress is not None:
                            progress(received, total)
                except TRANSFER_ERRORS as exc:
                    cause = str(exc) if isinstance(exc, _TooSlow) else type(exc).__name__
                    if attempts >= config.retries:
                        raise SourceError(
                            f"downloading {what}: {cause} after {received} bytes and {attempts + 1} attempts"
                        ) from None
                    log.info("resuming %s at byte %d after %s", what, received if ranges else 0, cause)
                    attempts += 1
                    resumes += 1
                    sleep(_backoff(config, attempts - 1))
                    watch.check_deadline(received)
                    watch.restart_window()
                    continue
                if total and received != total:
                    raise SourceError(f"downloading {what}: received {received} of {total} bytes")
                return Download(path=dest, sha256=sha256.hexdigest(), size=received, resumes=resumes)
    except OCIError as exc:  # the transfer watch's deadline
        raise SourceError(str(exc)) from None
    finally:
        if own:
            http.close()


def _session(url: str, config: RegistryConfig) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = config.user_agent
    # Proxies from the environment, as the registry client takes them; never credentials from ~/.netrc.
    session.proxies.update(requests.utils.get_environ_proxies(url))
    session.trust_env = False
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    return session


def _backoff(config: RegistryConfig, attempt: int) -> float:
    delay = float(config.backoff * 2.0**attempt * random.uniform(0.9, 1.1))  # noqa: S311 (jitter)
    return min(delay, config.max_retry_wait)


def _range_start(value: str | None) -> int | None:
    text = (value or "").strip()
    if not text.startswith("bytes ") or "-" not in text:
        return None
    start = text[len("bytes ") :].partition("-")[0]
    return int(start) if start.isdigit() else None


def check_sha256(download: Download, expected: str, uri: str) -> None:
    """Refuse a download whose SHA-256 is not the declared one (compared without regard to case;
    LocalAI compares exactly, so an upper-case sha256 never matches there)."""
    declared = expected.strip().lower().removeprefix("sha256:")
    if download.sha256 != declared:
        raise IntegrityMismatch(
            f"sha256 mismatch for {shown(uri)}: calculated {download.sha256}, "
            f"the gallery declares {expected.strip()}"
        )


# --- extracting an archive ---------------------------------------------------------------------------


@dataclass
class ExtractResult:
    format: str
    files: int
    bytes: int
    symlinks: int
    notes: list[str] = field(default_factory=list)


def sniff(path: Path) -> str:
    """The archive format from the file's first bytes: ``tar``, ``tar.gz``, ``tar.zst``, ``tar.xz``,
    ``tar.bz2`` or ``zip``. The content decides, not the name (a URL need not end in one)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "tar.zst"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if len(head) == 512 and head[257:262] == b"ustar":
        return "tar"
    raise SourceError(
        "not an archive this portal extracts (tar, tar.gz, tar.xz, tar.zst, tar.bz2 or zip, by content)"
    )


class _StreamDecompressor:
    """xz or bzip2 (several streams allowed) with every decompressor call's output capped."""

    def __init__(self, source: Readable, make: Callable[[], Any], label: str) -> None:
        self._source = source
        self._make = make
        self._label = label
        self._decompressor = make()
        self._pending = b""

    def read(self, n: int = -1, /) -> bytes:
        want = INFLATE_OUTPUT_CAP if n < 0 else min(n, INFLATE_OUTPUT_CAP)
        while True:
            if self._decompressor.eof:
                # Another stream may follow; zero bytes between or after streams are padding.
                self._pending = (self._decompressor.unused_data + self._pending).lstrip(b"\0")
                if not self._pending:
                    self._pending = self._source.read(INFLATE_INPUT_SLICE)
                    if not self._pending:
                        return b""
                    continue
                self._decompressor = self._make()
            data = b""
            if self._decompressor.needs_input:
                if not self._pending:
                    self._pending = self._source.read(INFLATE_INPUT_SLICE)
                    if not self._pending:
                        raise SourceError(f"{self._label}: truncated compressed stream")
                data, self._pending = self._pending[:INFLATE_INPUT_SLICE], self._pending[INFLATE_INPUT_SLICE:]
            try:
                out: bytes = self._decompressor.decompress(data, want)
            except (OSError, lzma.LZMAError, EOFError, ValueError) as exc:
                raise SourceError(f"{self._label}: corrupt compressed data ({exc})") from None
            if out:
                return out


class _Counted:
    """A tar stream whose bytes count against the extraction's budget."""

    def __init__(self, source: Readable, budget: _Budget) -> None:
        self._source = source
        self._budget = budget

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(n)
        self._budget.add(len(data))
        return data


def extract(
    archive: Path, dest: Path, *, label: str, free_bytes: int | None = None, progress: Progress | None = None
) -> ExtractResult:
    """Extract ``archive`` into ``dest`` (created; must not exist) with `RootfsWriter`'s rules.

    Compressed streams are inflated with every decompressor call's output capped, and the tar
    stream (or the zip's members) may not exceed ``free_bytes``. No top-level folder is stripped
    (as LocalAI): ``run.sh`` must be at the archive's root. On any failure ``dest`` is removed.
    """
    fmt = sniff(archive)
    budget = _Budget(free_bytes, f"extracting {label}")
    try:
        dest.mkdir(mode=0o755)
    except FileExistsError:
        raise SourceError(f"destination {dest} already exists") from None
    writer = RootfsWriter(dest, whiteouts=False, reroot_absolute_links=False)
    try:
        if fmt == "zip":
            _extract_zip(archive, writer, label, budget)
        else:
            with open(archive, "rb") as handle:
                writer.apply_layer(_Counted(_decompressed(handle, fmt, label), budget), label)
        writer.finish()
    except OCIError as exc:
        remove_tree(dest)
        if isinstance(exc, UnsafeArchive):
            raise
        raise SourceError(str(exc)) from None
    except BaseException:
        remove_tree(dest)
        raise
    if progress is not None:
        progress(budget.used, budget.used)
    stats = writer.stats
    return ExtractResult(format=fmt, files=stats.files, bytes=stats.bytes_written, symlinks=stats.symlinks)


def _decompressed(handle: Any, fmt: str, label: str) -> Readable:
    if fmt == "tar.gz":
        return GzipReader(handle, label)
    if fmt == "tar.zst":
        return decompressing_reader(handle, "application/vnd.oci.image.layer.v1.tar+zstd", label)
    if fmt == "tar.xz":
        return _StreamDecompressor(handle, lzma.LZMADecompressor, label)
    if fmt == "tar.bz2":
        return _StreamDecompressor(handle, bz2.BZ2Decompressor, label)
    return handle


class _ZipMember:
    def __init__(self, stream: Any, budget: _Budget, name: str) -> None:
        self._stream = stream
        self._budget = budget
        self._name = name

    def read_data(self, size: int) -> Iterator[bytes]:
        remaining = size
        while remaining:
            chunk = self._stream.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise SourceError(f"zip member {self._name!r} is shorter than its header says")
            self._budget.add(len(chunk))
            remaining -= len(chunk)
            yield chunk
        if self._stream.read(1):
            raise SourceError(f"zip member {self._name!r} is longer than its header says")


def _extract_zip(archive: Path, writer: RootfsWriter, label: str, budget: _Budget) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            declared = sum(info.file_size for info in infos)
            if budget.limit is not None and declared > budget.limit:
                raise SourceError(f"{label}: unpacks to {declared} bytes, more than the {budget.limit} free")
            writer.apply_entries(_zip_entries(zf, infos, budget), label)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks.
        raise SourceError(f"{label}: {exc}") from None


def _zip_entries(
    zf: zipfile.ZipFile, infos: Iterable[zipfile.ZipInfo], budget: _Budget
) -> Iterator[tuple[TarEntry, Any]]:
    for info in infos:
        unix = info.external_attr >> 16 if info.create_system == 3 else 0  # Unix modes, if any
        kind = stat.S_IFMT(unix)
        mtime = time.mktime((*info.date_time, 0, 0, -1))
        name = info.filename
        if info.is_dir() or kind == stat.S_IFDIR:
            yield TarEntry(name, DIRECTORY, stat.S_IMODE(unix) or 0o755, 0, mtime, ""), _NoData()
        elif kind == stat.S_IFLNK:
            if info.file_size > MAX_SYMLINK_TARGET:
                raise UnsafeArchive(
                    f"zip member {name!r}: symlink target longer than {MAX_SYMLINK_TARGET} bytes"
                )
            target = zf.read(info).decode("utf-8", "surrogateescape")
            yield TarEntry(name, SYMLINK, 0o777, 0, mtime, target), _NoData()
        elif kind in (0, stat.S_IFREG):
            with zf.open(info) as stream:
                mode = stat.S_IMODE(unix) or 0o644
                yield (
                    TarEntry(name, REGULAR, mode, info.file_size, mtime, ""),
                    _ZipMember(stream, budget, name),
                )
        else:
            raise UnsafeArchive(f"zip member {name!r} is {_special_kind(unix)}; not allowed")
