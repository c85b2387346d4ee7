"""LocalAI's on-disk layout, and the crash-safe file primitives the install/upgrade procedure uses.

A plain module: no ORM, no Django, no network. It knows three places:

* the **backends directory**, laid out exactly as LocalAI lays it out (``<name>/run.sh`` and
  ``<name>/metadata.json``; a meta backend is ``<meta>/metadata.json`` alone), because LocalAI reads
  it and lists every directory in it as a backend;
* the **state directory** beside it (same filesystem, so renames between the two are atomic), which
  holds what LocalAI must never see: staging trees, kept versions, the journal and the trash;
* the **journal**, one JSON record per operation in flight, written before each irreversible move so
  a crash can be reconciled from the record and the disk alone.

Low-level primitives (``exchange``, ``rename_noreplace``, ``remove_tree``...) raise ``OSError``
subclasses like ``os.rename`` does, so callers keep the errno; everything else raises
``LayoutError`` with a message fit for an operator. See ``docs/on-disk-layout.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]

METADATA_FILE = "metadata.json"
RUN_FILE = "run.sh"
MiB = 1024 * 1024

# metadata.json keys in the order LocalAI's BackendMetadata struct declares (and so writes) them.
METADATA_KEYS = (
    "alias",
    "meta_backend_for",
    "name",
    "gallery_url",
    "installed_at",
    "version",
    "uri",
    "digest",
)

OPERATIONS = ("install", "upgrade", "rollback", "uninstall")
# The paths a journal record may name; each is a directory the operation moves around.
ROLES = ("live", "staging", "kept", "trash")

_JOURNAL_FORMAT = 1
_HEALTH_OUTPUT_LINES = 20
_HEALTH_OUTPUT_CHARS = 2000


class LayoutError(Exception):
    """A backends or state directory is not as it must be; the message says what and where."""


class RenameUnsupported(LayoutError):
    """The kernel or filesystem does not support this ``renameat2`` flag.

    Raised by ``exchange`` so the caller can fall back to the journaled two-rename path.
    """


# --- names and timestamps ----------------------------------------------------------------------


def check_name(value: str, what: str = "backend name") -> str:
    """Return ``value`` if it is usable as one directory name, else raise ``LayoutError``.

    Backend names come from gallery files and metadata.json, which we do not control: a name such as
    ``../x`` must never become a path outside the directory it is joined to.
    """
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise LayoutError(f"{what} {value!r} is not a single directory name")
    return value


def format_rfc3339(moment: datetime) -> str:
    """Format an aware datetime the way LocalAI writes ``installed_at`` (Go's ``time.RFC3339``)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("an RFC 3339 timestamp needs an aware datetime")
    text = moment.replace(microsecond=0).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def parse_rfc3339(text: str) -> datetime | None:
    """Parse an RFC 3339 timestamp (``Z`` or an offset, optional fraction); None if it is not one."""
    try:
        moment = datetime.fromisoformat(text.strip().upper())
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _now_precise() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- metadata.json -----------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


@dataclass
class BackendMetadata:
    """The contents of ``<backends>/<name>/metadata.json``, as LocalAI reads and writes it.

    ``installed_at`` is kept as the raw string so a file round-trips byte for byte in meaning;
    ``installed_datetime`` parses it. Keys LocalAI may add later are kept in ``extra`` and written
    back, so rewriting a file never drops them.
    """

    name: str = ""
    alias: str = ""
    meta_backend_for: str = ""
    gallery_url: str = ""
    installed_at: str = ""
    version: str = ""
    uri: str = ""
    digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_meta(self) -> bool:
        return bool(self.meta_backend_for)

    @property
    def installed_datetime(self) -> datetime | None:
        return parse_rfc3339(self.installed_at) if self.installed_at else None

    def to_json(self) -> dict[str, Any]:
        """The JSON object LocalAI writes: its key names and order, empty values omitted."""
        data: dict[str, Any] = {key: getattr(self, key) for key in METADATA_KEYS if getattr(self, key)}
        for key, value in self.extra.items():
            data.setdefault(key, value)
        return data

    @classmethod
    def from_json(cls, data: Any) -> BackendMetadata:
        """Build from a parsed JSON value; ``LayoutError`` where LocalAI's own parser would fail.

        Like Go's ``json.Unmarshal``, a ``null`` value reads as empty and unknown keys are accepted.
        """
        if not isinstance(data, dict):
            raise LayoutError(f"metadata.json is not a JSON object (it is a JSON {_json_type(data)})")
        values: dict[str, str] = {}
        for key in METADATA_KEYS:
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise LayoutError(f"metadata.json: {key!r} must be a string, not a {_json_type(value)}")
            values[key] = value
        extra = {key: value for key, value in data.items() if key not in METADATA_KEYS}
        return cls(**values, extra=extra)


def _load_metadata(path: Path) -> BackendMetadata:
    """Read one metadata.json; ``LayoutError`` messages name the problem but not the directory."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LayoutError("metadata.json missing") from None
    except OSError as exc:
        raise LayoutError(f"metadata.json cannot be read: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise LayoutError(f"metadata.json is not valid JSON: {exc}") from exc
    return BackendMetadata.from_json(data)


def read_metadata(backend_dir: StrPath) -> BackendMetadata:
    """Read ``<backend_dir>/metadata.json``; ``LayoutError`` if missing, unreadable or malformed."""
    try:
        return _load_metadata(Path(backend_dir) / METADATA_FILE)
    except LayoutError as exc:
        raise LayoutError(f"{exc} (in {backend_dir})") from exc.__cause__


def write_metadata(backend_dir: StrPath, metadata: BackendMetadata) -> None:
    """Write ``<backend_dir>/metadata.json`` atomically, formatted as LocalAI formats it.

    LocalAI refuses to list *any* backend while one metadata.json is unparsable, so a torn write
    here would take every backend down: hence temp file, fsync, rename, fsync of the directory.
    """
    text = json.dumps(metadata.to_json(), indent=2, ensure_ascii=False)
    atomic_write(Path(backend_dir) / METADATA_FILE, text.encode(), mode=0o644)


# --- crash-safe file primitives ----------------------------------------------------------------


def fsync_dir(path: StrPath) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: StrPath, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a reader or a crash sees the old or the new file, whole.

    The temp file (``.<name>.<random>.tmp`` beside ``path``) is removed on failure; after a crash it
    may stay behind, which is harmless to LocalAI (it lists directories, not files).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+), or None when this C library lacks it."""
    func = getattr(_libc(), "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# What the kernel answers when it or the filesystem lacks a flag. EINVAL is also the answer to
# "a directory into its own subtree", which _check_not_nested rules out before the call.
_UNSUPPORTED_ERRNOS = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _rename2(src: Path, dst: Path, flags: int) -> None:
    func = _renameat2()
    if func is None:
        raise RenameUnsupported("the C library has no renameat2")
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in _UNSUPPORTED_ERRNOS:
        raise RenameUnsupported(
            f"renameat2 flag {flags} is not supported for {src} -> {dst}: {os.strerror(code)}"
        )
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _real(path: Path) -> Path:
    # Resolve the parent only: the last component may itself be a symlink we must not follow.
    return Path(os.path.realpath(path.parent)) / path.name


def _check_not_nested(a: Path, b: Path) -> None:
    ra, rb = _real(a), _real(b)
    if ra == rb or ra in rb.parents or rb in ra.parents:
        raise LayoutError(f"cannot rename between {a} and {b}: one contains the other")


def _fsync_parents(*paths: Path) -> None:
    for parent in dict.fromkeys(path.parent for path in paths):
        fsync_dir(parent)


def exchange(a: StrPath, b: StrPath) -> None:
    """Swap paths ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``).

    Both must exist, on one filesystem. At every instant each path holds a complete tree, so
    LocalAI never sees a missing backend. Raises ``RenameUnsupported`` when the kernel or
    filesystem cannot do it (the caller then uses the journaled two-rename path), an ``OSError``
    subclass for anything else (``FileNotFoundError``, ``EXDEV``...).
    """
    pa, pb = Path(a), Path(b)
    _check_not_nested(pa, pb)
    _rename2(pa, pb, _RENAME_EXCHANGE)
    _fsync_parents(pa, pb)


def rename_noreplace(src: StrPath, dst: StrPath) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Uses ``renameat2(RENAME_NOREPLACE)``, which is atomic. Where that is unsupported it falls back
    to check-then-rename, whose small window is closed by the per-backend journal lock (only the
    operation holding it moves that backend's directories).
    """
    ps, pd = Path(src), Path(dst)
    _check_not_nested(ps, pd)
    try:
        _rename2(ps, pd, _RENAME_NOREPLACE)
    except RenameUnsupported:
        _rename_noreplace_portable(ps, pd)
    _fsync_parents(ps, pd)


def _rename_noreplace_portable(src: Path, dst: Path) -> None:
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


def sync_tree(path: StrPath) -> None:
    """Flush everything written under ``path`` to disk, before it is renamed into place.

    Uses ``syncfs`` on the filesystem holding ``path``: one call instead of an fsync for each of
    the tens of thousands of files a Python backend carries. Without it, a power cut after the
    rename could leave the live backend with empty files.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        func = getattr(_libc(), "syncfs", None)
        if func is None:
            os.sync()
        elif func(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def remove_tree(path: StrPath) -> None:
    """Delete ``path`` and everything under it; no-op if it does not exist.

    Never follows a symlink: a symlink (at the top or inside) is removed, its target left alone.
    Read-only or unlistable directories (backend images ship them) are made writable first.
    """
    top = Path(path)
    try:
        info = top.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        top.unlink()
        return
    _make_tree_writable(top, info)
    shutil.rmtree(top)


def _make_tree_writable(top: Path, info: os.stat_result) -> None:
    def allow(path: str | Path, mode: int) -> None:
        if mode & 0o700 != 0o700:
            os.chmod(path, stat.S_IMODE(mode) | 0o700)

    allow(top, info.st_mode)
    # Top-down: each subdirectory is made listable here, before os.walk descends into it.
    for root, dirs, _files in os.walk(top):
        for name in dirs:
            child = os.path.join(root, name)
            child_info = os.lstat(child)
            if stat.S_ISDIR(child_info.st_mode):  # symlinks to directories are listed in dirs too
                allow(child, child_info.st_mode)


def tree_size(path: StrPath) -> int:
    """Apparent size in bytes of the regular files under ``path``, hard links counted once.

    Symlinks are not followed. This is the space a copy of the tree would need.
    """
    top = Path(path)
    info = top.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(top):
        for name in files:
            file_info = os.lstat(os.path.join(root, name))
            if not stat.S_ISREG(file_info.st_mode):
                continue
            if file_info.st_nlink > 1:
                key = (file_info.st_dev, file_info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += file_info.st_size
    return total


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: StrPath) -> int:
    """Bytes available to this process on the filesystem of ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(Path(path))).free


def _mib(size: int) -> str:
    return f"{size / MiB:.1f}"


def ensure_free_space(path: StrPath, needed: int, margin: int = 0) -> None:
    """Raise ``LayoutError`` unless ``needed + margin`` bytes are free on the filesystem of ``path``."""
    free = free_bytes(path)
    total = needed + margin
    if total > free:
        detail = f" ({_mib(needed)} MiB plus a {_mib(margin)} MiB margin)" if margin else ""
        raise LayoutError(f"need {_mib(total)} MiB{detail}, {_mib(free)} MiB free on {path}")


def same_filesystem(a: StrPath, b: StrPath) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing parents) are on one filesystem (st_dev)."""
    return _nearest_existing(Path(a)).stat().st_dev == _nearest_existing(Path(b)).stat().st_dev


# --- scanning the backends directory ------------------------------------------------------------


@dataclass
class ScannedBackend:
    """One entry of the backends directory as LocalAI would see it.

    ``problem`` is empty when LocalAI can use the entry as it stands; ``note`` carries observations
    that are not faults (for example a backend without metadata.json, which LocalAI accepts).
    """

    name: str
    path: Path
    metadata: BackendMetadata | None
    is_meta: bool
    has_run_sh: bool
    run_sh_executable: bool
    is_symlink: bool = False
    problem: str = ""
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def meta_backend_for(self) -> str:
        return self.metadata.meta_backend_for if self.metadata else ""


def _run_sh_state(run: Path) -> tuple[bool, bool, str]:
    """(present as a file, executable, problem) for a run.sh path."""
    if not os.path.lexists(run):
        return False, False, ""
    try:
        info = run.stat()
    except OSError:
        return False, False, "run.sh is a broken symlink"
    if not stat.S_ISREG(info.st_mode):
        return False, False, "run.sh is not a regular file"
    # os.access alone says yes to root for any mode with an x bit; LocalAI may run as another user.
    executable = bool(info.st_mode & 0o111) and os.access(run, os.X_OK)
    if not executable:
        return True, False, f"run.sh is not executable (mode {stat.S_IMODE(info.st_mode):04o})"
    return True, True, ""


def _meta_target_problem(backends: Path, target: str) -> str:
    try:
        check_name(target, "meta_backend_for")
    except LayoutError as exc:
        return str(exc)
    concrete = backends / target
    if not concrete.is_dir():
        return f"meta backend points to missing directory {target}"
    if not (concrete / RUN_FILE).is_file():
        return f"meta backend points to {target}, which has no run.sh"
    return ""


def _scan_directory(path: Path, backends: Path) -> ScannedBackend:
    problems: list[str] = []
    notes: list[str] = []
    metadata: BackendMetadata | None = None
    if os.path.lexists(path / METADATA_FILE):
        try:
            metadata = _load_metadata(path / METADATA_FILE)
        except LayoutError as exc:
            problems.append(f"{exc}; LocalAI lists no backend at all until it is fixed or removed")
    has_run, executable, run_problem = _run_sh_state(path / RUN_FILE)
    is_meta = metadata is not None and metadata.is_meta
    if run_problem:
        problems.append(run_problem)
    if metadata is not None and is_meta:
        if target_problem := _meta_target_problem(backends, metadata.meta_backend_for):
            problems.append(target_problem)
        # LocalAI registers a meta backend under metadata.name, not under its directory name.
        if not metadata.name:
            problems.append("meta backend has no name; LocalAI would register it under an empty name")
        elif metadata.name != path.name:
            notes.append(f"LocalAI lists this meta backend as {metadata.name!r}")
    elif not has_run and not run_problem:
        problems.append("run.sh missing")
    if metadata is None and has_run and not problems:
        notes.append("no metadata.json: LocalAI names it after its directory; version and origin unknown")
    return ScannedBackend(
        name=path.name,
        path=path,
        metadata=metadata,
        is_meta=is_meta,
        has_run_sh=has_run,
        run_sh_executable=executable,
        problem="; ".join(problems),
        note="; ".join(notes),
    )


def scan(backends_path: StrPath) -> list[ScannedBackend]:
    """Every directory under ``backends_path``, sorted by name, each checked as LocalAI would use it.

    One bad entry is flagged in its ``problem`` and never breaks the listing. Hidden directories are
    reported (LocalAI lists them too). Plain files are skipped, as LocalAI skips them. A symlink to a
    directory is reported as a problem without being followed: LocalAI ignores it, and the portal
    does not manage a tree that lives elsewhere. A missing backends directory is an empty listing.
    """
    backends = Path(backends_path)
    try:
        with os.scandir(backends) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LayoutError(f"cannot list the backends directory {backends}: {exc.strerror}") from exc
    found: list[ScannedBackend] = []
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink():
            if entry.is_dir(follow_symlinks=True):
                found.append(
                    ScannedBackend(
                        name=entry.name,
                        path=path,
                        metadata=None,
                        is_meta=False,
                        has_run_sh=False,
                        run_sh_executable=False,
                        is_symlink=True,
                        problem=f"symlink to {os.readlink(path)}: LocalAI does not list symlinked "
                        "directories and the portal does not manage them",
                    )
                )
        elif entry.is_dir(follow_symlinks=False):
            found.append(_scan_directory(path, backends))
    return found


# --- the state directory -----------------------------------------------------------------------


def _mkdir_private(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise LayoutError(f"{path} exists and is not a directory") from None
    else:
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask; be exact
    return path


def state_path_problems(backends_path: StrPath, state_path: StrPath) -> list[str]:
    """What is wrong with using ``state_path`` as the state directory for ``backends_path``.

    Side-effect free, for a Django system check. Empty when all is well.
    """
    backends = Path(os.path.realpath(backends_path))
    state = Path(os.path.realpath(state_path))
    problems: list[str] = []
    if state == backends or backends in state.parents:
        problems.append(
            f"the state directory {state} is inside the backends directory {backends}, "
            "where LocalAI would list it as a backend"
        )
    if state.exists() and not state.is_dir():
        problems.append(f"the state directory {state} exists and is not a directory")
    anchor = _nearest_existing(state)
    if not os.access(anchor, os.W_OK):
        problems.append(f"the state directory {state} is not writable (checked {anchor})")
    if not same_filesystem(backends, state):
        problems.append(
            f"the state directory {state} is on another filesystem than {backends}; "
            "upgrades need atomic renames between them"
        )
    return problems


class StateDirs:
    """The portal's own directory, beside the backends directory and hidden from LocalAI.

    Layout: ``staging/<name>/<token>/`` (a tree being prepared), ``kept/<name>/<label>/`` (earlier
    versions kept for rollback), ``journal/`` (operations in flight), ``trash/`` (garbage: always
    safe to delete). Directories are created on demand with mode 0700.
    """

    def __init__(self, state_path: StrPath) -> None:
        self.root = Path(state_path)

    @property
    def staging_root(self) -> Path:
        return self.root / "staging"

    @property
    def kept_root(self) -> Path:
        return self.root / "kept"

    @property
    def journal_path(self) -> Path:
        return self.root / "journal"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    def ensure(self) -> None:
        """Create the state directory and its four subdirectories (mode 0700) where missing."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        _mkdir_private(self.root)
        for sub in (self.staging_root, self.kept_root, self.journal_path, self.trash):
            _mkdir_private(sub)

    def problems(self, backends_path: StrPath) -> list[str]:
        return state_path_problems(backends_path, self.root)

    def check(self, backends_path: StrPath) -> None:
        """Raise ``LayoutError`` listing every problem of this state directory, if any."""
        if problems := self.problems(backends_path):
            raise LayoutError("; ".join(problems))

    def staging(self, name: str, token: str) -> Path:
        """Create and return the empty staging directory ``staging/<name>/<token>``.

        Unlike its 0700 parents it gets mode 0755: it becomes the live backend directory by rename,
        and LocalAI may run as another user. ``LayoutError`` if it already exists.
        """
        self.ensure()
        parent = _mkdir_private(self.staging_root / check_name(name))
        path = parent / check_name(token, "staging token")
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            raise LayoutError(f"staging directory {path} already exists") from None
        os.chmod(path, 0o755)  # noqa: S103  (see the docstring: LocalAI must read it)
        return path

    def kept(self, name: str, label: str) -> Path:
        """Return ``kept/<name>/<label>``, a rename target: its parent is created, it is not."""
        self.ensure()
        parent = _mkdir_private(self.kept_root / check_name(name))
        return parent / check_name(label, "kept version label")

    def kept_versions(self, name: str) -> list[Path]:
        """The kept directories of backend ``name``, sorted by label."""
        parent = self.kept_root / check_name(name)
        if not parent.is_dir():
            return []
        return sorted(child for child in parent.iterdir() if child.is_dir() and not child.is_symlink())

    def trash_slot(self, name: str) -> Path:
        """A fresh path in the trash to rename something into; not created."""
        self.ensure()
        return self.trash / f"{check_name(name)}.{uuid.uuid4().hex[:12]}"

    def empty_trash(self) -> int:
        """Delete everything in the trash; return how many entries were removed."""
        if not self.trash.is_dir():
            return 0
        removed = 0
        for entry in sorted(self.trash.iterdir()):
            remove_tree(entry)
            removed += 1
        return removed


# --- the journal -------------------------------------------------------------------------------


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
        _mkdir_private(self.path)
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


# --- health checks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str


def _default_health(backend_dir: Path, backends: Path, follow_meta: bool = True) -> HealthResult:
    if not backend_dir.is_dir():
        return HealthResult(False, f"{backend_dir} is not a directory")
    run = backend_dir / RUN_FILE
    if not os.path.lexists(run):
        if not os.path.lexists(backend_dir / METADATA_FILE):
            return HealthResult(False, "run.sh missing")
        try:
            metadata = read_metadata(backend_dir)
        except LayoutError as exc:
            return HealthResult(False, f"run.sh missing, and no usable metadata.json: {exc}")
        if not metadata.is_meta or not follow_meta:
            return HealthResult(False, "run.sh missing")
        if problem := _meta_target_problem(backends, metadata.meta_backend_for):
            return HealthResult(False, problem)
        concrete = _default_health(backends / metadata.meta_backend_for, backends, follow_meta=False)
        return HealthResult(concrete.ok, f"meta backend for {metadata.meta_backend_for}: {concrete.detail}")
    present, executable, problem = _run_sh_state(run)
    if not present or not executable:
        return HealthResult(False, problem)
    with run.open("rb") as handle:
        head = handle.read(4)
    # LocalAI execs run.sh directly: without one of these, exec fails with "exec format error".
    if not head.startswith((b"#!", b"\x7fELF")):
        return HealthResult(False, "run.sh starts with neither a #! line nor an ELF header")
    return HealthResult(True, "run.sh present and executable")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _output_tail(handle: Any) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 8 * _HEALTH_OUTPUT_CHARS))
    text = handle.read().decode(errors="replace")
    tail = "\n".join(text.splitlines()[-_HEALTH_OUTPUT_LINES:])
    return tail[-_HEALTH_OUTPUT_CHARS:]


def _command_health(backend_dir: Path, command: str, timeout: float) -> HealthResult:
    try:
        # Substitute after splitting, so a path with spaces stays one argument.
        argv = [arg.replace("{path}", str(backend_dir)) for arg in shlex.split(command)]
    except ValueError as exc:
        return HealthResult(False, f"health check command cannot be parsed: {exc}")
    if not argv:
        return HealthResult(False, "health check command is empty")
    with tempfile.TemporaryFile() as output:
        try:
            # A file, not a pipe, for output: a killed check's orphans cannot keep us waiting on EOF.
            process = subprocess.Popen(
                argv,
                cwd=backend_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return HealthResult(False, f"health check command {argv[0]!r} cannot start: {exc.strerror}")
        timed_out = False
        try:
            deadline = time.monotonic() + timeout
            delay = 0.005
            # Wait without reaping (WNOWAIT): while the leader is unreaped its pid, and so the
            # process group id, cannot be reused, so killing the group below is always safe.
            while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        finally:
            # Kill the whole group: on timeout, and also whatever the check left running.
            _kill_group(process.pid)
            code = process.wait()
        tail = _output_tail(output)
    output_part = f"; output:\n{tail}" if tail else ""
    if timed_out:
        return HealthResult(False, f"timed out after {timeout:g} s; process group killed{output_part}")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return HealthResult(False, f"killed by signal {name}{output_part}")
    return HealthResult(code == 0, f"exit {code}{output_part}")


def health_check(
    backend_dir: StrPath,
    command: str | None = None,
    timeout: float = 30,
    *,
    backends_path: StrPath | None = None,
) -> HealthResult:
    """Check that LocalAI could run the backend in ``backend_dir``.

    The default check: ``run.sh`` is a regular, executable file starting with ``#!`` or an ELF
    header; for a meta directory (metadata.json alone), its ``meta_backend_for`` names a sibling in
    ``backends_path`` (default: ``backend_dir``'s parent) that passes the same check.

    With ``command``, it runs after the default check passes: split like a shell would (no shell
    involved), ``{path}`` replaced by ``backend_dir``, run in ``backend_dir`` in its own process
    group, killed with its group after ``timeout`` seconds; ok when it exits 0. ``detail`` gives the
    exit status and the last lines of output.
    """
    directory = Path(backend_dir)
    backends = Path(backends_path) if backends_path is not None else directory.parent
    result = _default_health(directory, backends)
    if not result.ok or command is None:
        return result
    return _command_health(directory, command, timeout)
