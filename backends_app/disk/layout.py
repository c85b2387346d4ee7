"""LocalAI's on-disk layout: the backends directory, metadata.json, and the portal's state directory.

A plain module: no ORM, no Django, no network. It knows two places:

* the **backends directory**, laid out exactly as LocalAI lays it out (``<name>/run.sh`` and
  ``<name>/metadata.json``; a meta backend is ``<meta>/metadata.json`` alone), because LocalAI reads
  it and lists every directory in it as a backend;
* the **state directory** beside it (same filesystem, so renames between the two are atomic), which
  holds what LocalAI must never see: staging trees, kept versions, the journal and the trash.

Errors are ``LayoutError`` with a message fit for an operator. See ``docs/on-disk-layout.md``; the
journal is in ``disk.journal``, the health checks in ``disk.health``, the file primitives in
``disk.fsops``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from backends_app.disk.errors import LayoutError
from backends_app.disk.fsops import StrPath, atomic_write, nearest_existing, remove_tree, same_filesystem

__all__ = ["LayoutError"]  # re-exported: callers catch layout.LayoutError

METADATA_FILE = "metadata.json"
RUN_FILE = "run.sh"

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
# What the portal adds to metadata.json, under a key LocalAI's decoder ignores (Go's json.Unmarshal
# skips unknown keys, and LocalAI rewrites the file only when it installs the backend itself): the
# outcome of the signature check of the installed image (docs/signatures.md).
SIGNATURE_KEY = "portal_signature"


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


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# What Go's encoder escapes and Python's writes raw: HTML's three (json.Marshal's default
# SetEscapeHTML(true)) and the two JavaScript line terminators. None of them can occur inside an
# escape sequence, a number or a literal, so replacing them in the finished text is exact.
_GO_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


def _go_strings(value: Any) -> Any:
    """Strings as Go holds them after decoding: a lone surrogate (from a ``\\udXXX`` escape) is U+FFFD."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_go_strings(key): _go_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_go_strings(item) for item in value]
    return value


def metadata_bytes(metadata: BackendMetadata) -> bytes:
    """The exact bytes LocalAI's ``json.MarshalIndent(metadata, "", "  ")`` writes (Go 1.26).

    Struct order, two-space indent, ``": "`` and ``","`` separators, no trailing newline; non-ASCII
    raw in UTF-8; ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u`` escapes; ``\\b``, ``\\f``,
    ``\\n``, ``\\r``, ``\\t`` as such and other control characters as ``\\u00xx`` (Python's
    ``json`` does the same since Go 1.22 writes ``\\b`` and ``\\f`` short too).
    """
    text = json.dumps(_go_strings(metadata.to_json()), indent=2, ensure_ascii=False)
    for raw, escaped in _GO_ESCAPES:
        text = text.replace(raw, escaped)
    return text.encode()


def write_metadata(backend_dir: StrPath, metadata: BackendMetadata) -> None:
    """Write ``<backend_dir>/metadata.json`` atomically, byte for byte as LocalAI writes it.

    LocalAI refuses to list *any* backend while one metadata.json is unparsable, so a torn write
    here would take every backend down: hence temp file, fsync, rename, fsync of the directory.
    """
    atomic_write(Path(backend_dir) / METADATA_FILE, metadata_bytes(metadata), mode=0o644)


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


def run_sh_state(run: Path) -> tuple[bool, bool, str]:
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


def meta_target_problem(backends: Path, target: str) -> str:
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
    has_run, executable, run_problem = run_sh_state(path / RUN_FILE)
    is_meta = metadata is not None and metadata.is_meta
    if run_problem:
        problems.append(run_problem)
    if metadata is not None and is_meta:
        if target_problem := meta_target_problem(backends, metadata.meta_backend_for):
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


# What LocalAI's own install and upgrade leave in the backends directory while they run
# (core/gallery/backends.go, upgrade.go): ``<name>.install-tmp`` and ``<name>.upgrade-tmp`` (staging),
# ``<name>.install-backup`` and ``<name>.backup`` (the previous tree during the swap) and
# ``<name>.install-tmp.partial`` (a download). They come and go within one operation.
LOCALAI_TRANSIENT_SUFFIXES = (".install-tmp", ".upgrade-tmp", ".install-backup", ".backup", ".partial")


def is_transient(name: str) -> bool:
    """Whether ``name`` is one of LocalAI's in-flight staging or backup names, not a backend."""
    return name.endswith(LOCALAI_TRANSIENT_SUFFIXES)


def scan(backends_path: StrPath) -> list[ScannedBackend]:
    """Every directory under ``backends_path``, sorted by name, each checked as LocalAI would use it.

    One bad entry is flagged in its ``problem`` and never breaks the listing. Hidden directories are
    reported (LocalAI lists them too). LocalAI's own staging and backup directories
    (`is_transient`) are skipped: they belong to an operation of LocalAI's still running, and
    become (or replace) a backend when it ends. Plain files are skipped, as LocalAI skips them. A symlink to a
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
        if is_transient(entry.name):
            continue
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


def mkdir_private(path: Path) -> Path:
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
    anchor = nearest_existing(state)
    if not os.access(anchor, os.W_OK):
        problems.append(f"the state directory {state} is not writable (checked {anchor})")
    if not same_filesystem(backends, state):
        problems.append(
            f"the state directory {state} is on another filesystem than {backends}; "
            "upgrades need atomic renames between them"
        )
    return problems


# The directory under staging/<name>/ that holds downloads in progress (reconcile keeps it).
BLOB_DIR_NAME = "blobs"


class StateDirs:
    """The portal's own directory, beside the backends directory and hidden from LocalAI.

    Layout: ``staging/<name>/<token>/`` (a tree being prepared), ``staging/<name>/blobs/`` (the
    part files of layers being downloaded, kept across jobs so a retry resumes),
    ``kept/<name>/<label>/`` (earlier versions kept for rollback), ``journal/`` (operations in
    flight), ``trash/`` (garbage: always safe to delete). Directories are created on demand with mode 0700.
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
        mkdir_private(self.root)
        for sub in (self.staging_root, self.kept_root, self.journal_path, self.trash):
            mkdir_private(sub)

    def require_usable(self, backends_path: StrPath) -> None:
        """Raise ``LayoutError`` listing every problem of this state directory, if any."""
        if problems := state_path_problems(backends_path, self.root):
            raise LayoutError("; ".join(problems))

    def staging(self, name: str, token: str) -> Path:
        """Create and return the empty staging directory ``staging/<name>/<token>``.

        Unlike its 0700 parents it gets mode 0755: it becomes the live backend directory by rename,
        and LocalAI may run as another user. ``LayoutError`` if it already exists.
        """
        self.ensure()
        parent = mkdir_private(self.staging_root / check_name(name))
        path = parent / check_name(token, "staging token")
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            raise LayoutError(f"staging directory {path} already exists") from None
        os.chmod(path, 0o755)  # noqa: S103  (see the docstring: LocalAI must read it)
        return path

    def blob_dir(self, name: str) -> Path:
        """``staging/<name>/blobs``: where backend ``name``'s layers download (not a staging tree)."""
        return self.staging_root / check_name(name) / BLOB_DIR_NAME

    def kept(self, name: str, label: str) -> Path:
        """Return ``kept/<name>/<label>``, a rename target: its parent is created, it is not."""
        self.ensure()
        parent = mkdir_private(self.kept_root / check_name(name))
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
