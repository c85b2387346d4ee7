"""LocalAI's `runtime_settings.json`: its keys, its formatting, reading, merging, writing and watching.

A plain module: no ORM, no Django. LocalAI keeps the settings its web UI edits in
``<LOCALAI_CONFIG_DIR>/runtime_settings.json`` (core/config/runtime_settings.go,
runtime_settings_persist.go), reads the file at start and watches it. The portal shares that file: it
reads the keys it manages (``auto_upgrade_backends``), writes them back when they change, and keeps
every other key exactly as LocalAI (or an operator) wrote it, so a LocalAI pointed at the same
directory keeps honouring them. See docs/settings.md.

The file is written the way LocalAI writes it (Go's ``json.MarshalIndent(settings, "", "  ")``): keys in
the order of LocalAI's ``RuntimeSettings`` struct, unset keys left out except ``api_keys`` and
``pii_default_detectors`` (written as ``null``), two-space indent, ``<``, ``>`` and ``&`` escaped as
Go escapes them, no trailing newline, mode 0600 (it may hold API keys and P2P tokens). Unlike
LocalAI the write is atomic (a reader sees the old file or the new one, whole) and the portal's
processes take turns (an exclusive lock on the directory), so two writers never lose each other's
change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends_app.disk.fsops import atomic_write

log = logging.getLogger(__name__)

FILE_NAME = "runtime_settings.json"
# A settings file is a few KiB; anything far larger is not one, and is not read into memory.
MAX_FILE_BYTES = 1 << 20


class RuntimeSettingsError(Exception):
    """The file cannot be read, parsed or written; the message says which and why."""


class Unreadable(RuntimeSettingsError):
    """The file is there but cannot be read as a JSON object; nothing may be written over it."""


class BodyError(RuntimeSettingsError):
    """A settings object LocalAI would refuse; the message is LocalAI's words for it."""


@dataclass(frozen=True)
class Key:
    """One field of LocalAI's RuntimeSettings: its JSON type and what an option-less LocalAI reports."""

    kind: str
    """bool, int, float, string, duration, galleries or strings."""
    default: Any = None
    omitempty: bool = True
    """False for the two fields LocalAI always writes (as null when unset)."""
    secret: bool = False
    """Credentials: written when posted, never shown (GET reports null, and a null leaves them be)."""


_MODEL_GALLERIES = [
    {
        "url": "https://index.localai.io/models",
        "mirrors": ["github:mudler/LocalAI/gallery/index.yaml@master"],
        "name": "localai",
    }
]
_BACKEND_GALLERIES = [
    {
        "url": "https://index.localai.io/backends",
        "mirrors": ["github:mudler/LocalAI/backend/index.yaml@master"],
        "name": "localai",
    }
]

#: LocalAI's RuntimeSettings (commit 82c191a), in struct order: the order LocalAI writes them in.
KEYS: dict[str, Key] = {
    "watchdog_enabled": Key("bool", False),
    "watchdog_idle_enabled": Key("bool", False),
    "watchdog_busy_enabled": Key("bool", False),
    "watchdog_idle_timeout": Key("duration", "15m"),
    "watchdog_busy_timeout": Key("duration", "5m"),
    "watchdog_interval": Key("duration", "500ms"),
    "single_backend": Key("bool", False),
    "max_active_backends": Key("int", 0),
    "auto_upgrade_backends": Key("bool", False),
    "prefer_development_backends": Key("bool", False),
    "memory_reclaimer_enabled": Key("bool", False),
    "memory_reclaimer_threshold": Key("float", 0.95),
    "force_eviction_when_busy": Key("bool", False),
    "size_aware_eviction": Key("bool", False),
    "lru_eviction_max_retries": Key("int", 30),
    "lru_eviction_retry_interval": Key("duration", "1s"),
    # LocalAI's default is the number of physical cores of the machine it runs on, unknown here.
    "threads": Key("int", None),
    "context_size": Key("int", 0),
    "artifact_download_concurrency": Key("int", 1),
    "vram_budget": Key("string", ""),
    "f16": Key("bool", False),
    "debug": Key("bool", False),
    "enable_tracing": Key("bool", False),
    "tracing_max_items": Key("int", 1024),
    "tracing_max_body_bytes": Key("int", 65536),
    "enable_backend_logging": Key("bool", True),
    "cors": Key("bool", False),
    "csrf": Key("bool", False),
    "cors_allow_origins": Key("string", ""),
    "p2p_token": Key("string", None, secret=True),
    "p2p_network_id": Key("string", ""),
    "federated": Key("bool", False),
    "galleries": Key("galleries", _MODEL_GALLERIES),
    "backend_galleries": Key("galleries", _BACKEND_GALLERIES),
    "autoload_galleries": Key("bool", True),
    "autoload_backend_galleries": Key("bool", True),
    "api_keys": Key("strings", None, omitempty=False, secret=True),
    "agent_job_retention_days": Key("int", 30),
    "open_responses_store_ttl": Key("string", "0"),
    "agent_pool_enabled": Key("bool", True),
    "agent_pool_default_model": Key("string", ""),
    "agent_pool_embedding_model": Key("string", "granite-embedding-107m-multilingual"),
    "agent_pool_max_chunking_size": Key("int", 400),
    "agent_pool_chunk_overlap": Key("int", 0),
    "agent_pool_enable_logs": Key("bool", False),
    "agent_pool_collection_db_path": Key("string", ""),
    "agent_pool_vector_engine": Key("string", "chromem"),
    # A PostgreSQL DSN, password included.
    "agent_pool_database_url": Key("string", None, secret=True),
    "agent_pool_agent_hub_url": Key("string", "https://agenthub.localai.io"),
    "distributed_disk_headroom_check": Key("bool", True),
    "localai_assistant_enabled": Key("bool", True),
    "instance_name": Key("string", ""),
    "instance_tagline": Key("string", ""),
    "logo_file": Key("string", ""),
    "logo_horizontal_file": Key("string", ""),
    "favicon_file": Key("string", ""),
    "mitm_listen": Key("string", ""),
    "pii_default_detectors": Key("strings", None, omitempty=False),
}

# Owned by LocalAI's branding upload endpoint: a settings POST never changes them (settings.go).
BRANDING_FILES = ("logo_file", "logo_horizontal_file", "favicon_file")
_BY_LOWER_NAME = {name.lower(): name for name in KEYS}
_GO_TYPES = {
    "bool": "bool",
    "int": "int",
    "float": "float64",
    "string": "string",
    "duration": "string",
    "galleries": "[]config.Gallery",
    "strings": "[]string",
}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def path_in(config_dir: str | os.PathLike[str]) -> Path:
    return Path(config_dir) / FILE_NAME


# --- reading --------------------------------------------------------------------------------------


def read(path: Path) -> dict[str, Any]:
    """The file's object as it is (every key, typed or not); {} when the file is missing or empty.

    Raises Unreadable when it is not a JSON object: nobody may then write over it, since what it
    holds could not be kept.
    """
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return {}  # not there (a parent that is not a directory: not there either)
    except OSError as exc:
        raise Unreadable(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise Unreadable(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a settings file")
    if not data.strip():
        return {}  # LocalAI ignores an empty file too (a Remove event, a writer halfway through)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise Unreadable(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise Unreadable(f"{path} does not hold a JSON object")
    return value


_current: dict[Path, tuple[tuple[int, int, int, int] | None, dict[str, Any]]] = {}


def current(path: Path) -> dict[str, Any]:
    """The file's typed values, read again only when the file changed on disk; {} when it is
    missing or cannot be used (a problem the watcher and the system checks report)."""
    signature = _signature(path)
    cached = _current.get(path)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        values = typed(read(path))
    except RuntimeSettingsError:
        values = {}
    _current[path] = (signature, values)
    return values


def typed(values: Mapping[str, Any]) -> dict[str, Any]:
    """The known keys of a settings object, checked as LocalAI's `json.Unmarshal` checks them.

    Keys match LocalAI's case-insensitively (as Go's decoder does); unknown keys are dropped; `null`
    means "not set" and is dropped. Raises BodyError with Go's wording for a value of the wrong type
    ("json: cannot unmarshal string into Go struct field RuntimeSettings.debug of type bool").
    """
    out: dict[str, Any] = {}
    for raw_name, value in values.items():
        name = raw_name if raw_name in KEYS else _BY_LOWER_NAME.get(str(raw_name).lower())
        if name is None:
            continue
        if value is None:
            out.pop(name, None)
            continue
        out[name] = _checked(name, KEYS[name].kind, value)
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return f"number {_number_text(value)}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _number_text(value: float) -> str:
    return json.dumps(value)


def _refuse(field: str, go_type: str, value: Any) -> BodyError:
    return BodyError(
        f"json: cannot unmarshal {_json_type(value)} into Go struct field RuntimeSettings.{field} "
        f"of type {go_type}"
    )


def _checked(name: str, kind: str, value: Any) -> Any:
    go_type = _GO_TYPES[kind]
    if kind == "bool":
        if not isinstance(value, bool):
            raise _refuse(name, go_type, value)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(name, go_type, value)
        if isinstance(value, float) and not value.is_integer():
            raise _refuse(name, go_type, value)
        number = int(value)
        if not _INT64[0] <= number <= _INT64[1]:
            raise _refuse(name, go_type, value)
        return number
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _refuse(name, go_type, value)
        return value
    if kind in ("string", "duration"):
        if not isinstance(value, str):
            raise _refuse(name, go_type, value)
        return value
    if kind == "strings":
        if not isinstance(value, list):
            raise _refuse(name, go_type, value)
        for item in value:
            if item is not None and not isinstance(item, str):
                raise _refuse(name, "string", item)
        return [item or "" for item in value]
    if not isinstance(value, list):  # galleries
        raise _refuse(name, go_type, value)
    return [_gallery(name, item) for item in value]


def _gallery(field: str, item: Any) -> dict[str, Any] | None:
    """One entry of LocalAI's gallery list, as Go decodes it: {url, mirrors?, name, verification?}."""
    if item is None:
        return None
    if not isinstance(item, dict):
        raise _refuse(field, "config.Gallery", item)
    fields = {key.lower(): value for key, value in item.items()}
    gallery: dict[str, Any] = {}
    for key in ("url", "name"):
        value = fields.get(key)
        if value is not None and not isinstance(value, str):
            raise _refuse(f"{field}.{key}", "string", value)
    gallery["url"] = fields.get("url") or ""
    mirrors = fields.get("mirrors")
    if mirrors is not None:
        if not isinstance(mirrors, list) or not all(m is None or isinstance(m, str) for m in mirrors):
            raise _refuse(f"{field}.mirrors", "[]string", mirrors)
        if mirrors:
            gallery["mirrors"] = [m or "" for m in mirrors]
    gallery["name"] = fields.get("name") or ""
    verification = fields.get("verification")
    if verification is not None:
        if not isinstance(verification, dict):
            raise _refuse(f"{field}.verification", "config.GalleryVerification", verification)
        kept = {}
        for key in ("issuer", "issuer_regex", "identity", "identity_regex", "not_before"):
            value = verification.get(key)
            if value is not None and not isinstance(value, str):
                raise _refuse(f"{field}.verification.{key}", "string", value)
            if value:
                kept[key] = value
        gallery["verification"] = kept
    return gallery


# --- what LocalAI refuses in a POST ---------------------------------------------------------------

# Go's time units, in nanoseconds.
_DURATION_UNITS = {
    "ns": 1,
    "us": 1e3,
    "\u00b5s": 1e3,
    "\u03bcs": 1e3,
    "ms": 1e6,
    "s": 1e9,
    "m": 60e9,
    "h": 3600e9,
}
_DURATIONS = [name for name, key in KEYS.items() if key.kind == "duration"]
_DURATION_PART = re.compile(r"(\d*)(\.\d*)?([^\d.]*)")


def go_duration_problem(text: str) -> str:
    """Why Go's `time.ParseDuration` refuses `text` (its own message), or "" when it accepts it."""
    quoted = json.dumps(text, ensure_ascii=False)
    body = text[1:] if text[:1] in "+-" else text
    if text == "0" or body == "0":
        return ""
    if not body:
        return f"time: invalid duration {quoted}"
    position, nanoseconds = 0, 0.0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        assert match is not None  # the pattern matches the empty string
        whole, fraction, unit = match.groups()
        if not whole and (not fraction or fraction == "."):
            return f"time: invalid duration {quoted}"
        if not unit:
            return f"time: missing unit in duration {quoted}"
        if unit not in _DURATION_UNITS:
            return f"time: unknown unit {json.dumps(unit, ensure_ascii=False)} in duration {quoted}"
        digits = f"{whole or '0'}{fraction if fraction and fraction != '.' else ''}"
        nanoseconds += float(digits) * _DURATION_UNITS[unit]
        if nanoseconds > 2**63 - 1:  # Go's Duration is an int64 of nanoseconds
            return f"time: invalid duration {quoted}"
        position = match.end()
    return ""


def _vram_budget_problem(text: str) -> str:
    """Why LocalAI's vrambudget.Parse refuses a budget ("80%", "0.8", "12GB", "12GiB", bytes), or ""."""
    value = text.strip()
    if not value:
        return ""
    upper = value.upper()
    if upper.endswith("%"):
        number = _go_float(upper[:-1].strip())
        if number is None:
            return f"invalid vram budget percentage {json.dumps(text)}"
        return f"vram budget {json.dumps(text)} exceeds 100%" if number / 100 > 1 else ""
    for suffix in ("KIB", "MIB", "GIB", "TIB", "KB", "MB", "GB", "TB", "B"):
        if upper.endswith(suffix):
            number = _go_float(upper[: -len(suffix)].strip())
            return f"invalid vram budget {json.dumps(text)}" if number is None or number < 0 else ""
    number = _go_float(value)
    if number is None:
        return f"invalid vram budget {json.dumps(text)}"
    if number < 0:
        return f"invalid vram budget {json.dumps(text)}: negative"
    if number > 1 and not number.is_integer():
        return f"invalid vram budget {json.dumps(text)}: out of range"
    return ""


def _go_float(text: str) -> float | None:
    if not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", text, re.I):
        return None
    return float(text)


def parse_post(body: bytes) -> dict[str, Any]:
    """A `POST /api/settings` body, checked as LocalAI's UpdateSettingsEndpoint checks it.

    Returns the known keys that were set (unknown keys, such as the `galleries_json` LocalAI's own
    page sends back, are ignored, as LocalAI ignores them). Raises BodyError with LocalAI's message:
    "Failed to parse JSON: ..." for a body that is not a settings object or a value of the wrong
    type, "Invalid <key> format: ..." for a duration or VRAM budget LocalAI cannot parse.
    """
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BodyError(f"Failed to parse JSON: {exc}") from None
    if value is None:
        value = {}  # Go decodes null into a struct as "nothing set"
    if not isinstance(value, dict):
        kind = "array" if isinstance(value, list) else _json_type(value).split(" ")[0]
        raise BodyError(
            f"Failed to parse JSON: json: cannot unmarshal {kind} into Go value of type "
            "config.RuntimeSettings"
        )
    try:
        values = typed(value)
    except BodyError as exc:
        raise BodyError(f"Failed to parse JSON: {exc}") from None
    for name in _DURATIONS:
        if name in values and (problem := go_duration_problem(values[name])):
            raise BodyError(f"Invalid {name} format: {problem}")
    ttl = values.get("open_responses_store_ttl")
    if isinstance(ttl, str) and ttl not in ("", "0") and (problem := go_duration_problem(ttl)):
        raise BodyError(f"Invalid open_responses_store_ttl format: {problem}")
    if "vram_budget" in values and (problem := _vram_budget_problem(values["vram_budget"])):
        raise BodyError(f"Invalid vram_budget format: {problem}")
    return values


# --- what GET /api/settings shows -----------------------------------------------------------------


def snapshot(stored: Mapping[str, Any], live: Mapping[str, Any]) -> dict[str, Any]:
    """Every LocalAI key in struct order, as `GET /api/settings` answers: `live` values (what the
    portal itself runs with) first, then the file's, then LocalAI's option-less defaults.

    Credentials are never shown: they come out null, and a null posted back leaves them as they are.
    """
    try:
        known = typed(stored)
    except BodyError:
        known = {}
    out: dict[str, Any] = {}
    for name, key in KEYS.items():
        if name in live:
            out[name] = live[name]
        elif key.secret:
            out[name] = None
        else:
            out[name] = known.get(name, key.default)
    return out


# --- writing --------------------------------------------------------------------------------------


def dumps(values: Mapping[str, Any]) -> bytes:
    """The bytes LocalAI's `json.MarshalIndent(settings, "", "  ")` would write for `values`.

    Known keys in struct order, unset ones left out (but `api_keys` and `pii_default_detectors`
    always present); keys LocalAI does not know (a newer LocalAI's) follow, as they were.
    """
    ordered: dict[str, Any] = {}
    for name, key in KEYS.items():
        value = values.get(name)
        if value is not None or not key.omitempty:
            ordered[name] = value
    for name, value in values.items():
        if name not in KEYS:
            ordered[name] = value
    text = json.dumps(_go_numbers(ordered), indent=2, ensure_ascii=False)
    # Go's encoder escapes these inside strings (they only ever occur inside strings in JSON).
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode("utf-8", "surrogatepass")


def _go_numbers(value: Any) -> Any:
    """Floats with no fraction as Go writes them (1, not 1.0)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    if isinstance(value, dict):
        return {key: _go_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_go_numbers(item) for item in value]
    return value


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the directory itself, so no extra file appears beside LocalAI's."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update(path: Path, changes: Mapping[str, Any], *, always: bool = False) -> dict[str, Any]:
    """Set `changes` (a None value leaves a key as it is) in the file, keeping every other key.

    Read, merge and write happen under the directory's lock. Nothing is written when nothing
    changes, unless `always` (LocalAI's POST writes the file even when it sends nothing new). The
    directory is created (0700, as LocalAI makes it) when missing. Returns the file's new content.
    Raises Unreadable when the file cannot be read as an object (it is then left alone), and
    RuntimeSettingsError when it cannot be written.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _directory_lock(path.parent):
            current = read(path)
            merged = dict(current)
            merged.update({name: value for name, value in changes.items() if value is not None})
            if merged != current or always:
                atomic_write(path, dumps(merged), mode=0o600)
            return merged
    except RuntimeSettingsError:
        raise
    except OSError as exc:
        raise RuntimeSettingsError(f"cannot write {path}: {exc.strerror or exc}") from exc


# --- watching -------------------------------------------------------------------------------------


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)


class Watcher(threading.Thread):
    """Calls `on_change(values)` with the file's typed values each time the file changes on disk.

    Polls the file's identity (inode, times, size) every `interval` seconds: one stat, cheap enough
    to run every few seconds in every process, and it works where inotify does not (network
    filesystems, files replaced by a rename). A file that is missing, empty, malformed or holds a
    value of the wrong type is logged and skipped, as LocalAI skips it; the last good values stand.
    An exception from `on_change` (the database unreachable, say) is logged and the file is read
    again at the next poll.
    """

    def __init__(
        self,
        path: Path,
        interval: float,
        on_change: Callable[[dict[str, Any]], None],
        *,
        after_each: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="runtime-settings-watcher", daemon=True)
        self.path = path
        self.interval = max(0.05, interval)
        self.on_change = on_change
        self.after_each = after_each
        """Called in the thread after each look (the caller's clean-up, such as closing a connection)."""
        self.stopped = threading.Event()
        self._seen: tuple[int, int, int, int] | None = None

    def check(self) -> bool:
        """Read the file if it changed since the last look; True when `on_change` was called."""
        signature = _signature(self.path)
        if signature == self._seen:
            return False
        self._seen = signature
        if signature is None:
            return False
        try:
            values = typed(read(self.path))
        except RuntimeSettingsError as exc:
            log.warning("%s ignored: %s", self.path, exc)
            return False
        try:
            self.on_change(values)
        except Exception:
            log.exception("applying %s failed; it is read again at the next poll", self.path)
            self._seen = None
            return False
        return True

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.check()
            finally:
                if self.after_each is not None:
                    try:
                        self.after_each()
                    except Exception:
                        log.exception("cleaning up after a look at %s failed", self.path)

    def stop(self) -> None:
        self.stopped.set()
