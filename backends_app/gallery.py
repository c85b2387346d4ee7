"""LocalAI's backend gallery index: where it lives, what it says, which entry fits this machine.

A pure module (no ORM): it turns a gallery URL into text (`resolve_url`, `fetch`), the text into
validated `GalleryEntry` objects (`parse`), a meta entry into the concrete entry for a capability
(`resolve_meta`), and the machine into a capability (`detect_capability`). Every failure is a
`GalleryError` whose message says what failed and where. See docs/galleries.md.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import platform
import re
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import requests
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "DEFAULT_MAX_BYTES",
    "FetchResult",
    "GalleryEntry",
    "GalleryError",
    "detect_capability",
    "duplicates",
    "fetch",
    "first_by_name",
    "parse",
    "resolve_meta",
    "resolve_url",
]

#: Largest gallery document `fetch` accepts. LocalAI's real index is about 250 KiB.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: Most nodes a document may expand to once YAML aliases are followed (the real index: ~49,000).
#: Aliases make "billion laughs" documents tiny on the wire and huge in memory.
MAX_EXPANDED_NODES = 1_000_000
#: Deepest nesting accepted; a gallery entry is three or four levels deep.
MAX_DEPTH = 64
#: Default and largest health-check timeout, in seconds.
DEFAULT_HEALTHCHECK_TIMEOUT = 30.0
MAX_HEALTHCHECK_TIMEOUT = 3600.0
#: LocalAI's branch when a `github:` URL names none (pkg/downloader ResolveURL).
DEFAULT_GITHUB_BRANCH = "main"
DEFAULT_CAPABILITY = "default"
DEVELOPMENT_SUFFIX = "-development"


class GalleryError(Exception):
    """Anything that stops a gallery from being resolved, fetched, parsed or resolved to an entry.

    The message is meant for an operator. Optional attributes help callers react: `status` (HTTP
    status when the server answered), `retry_after` (seconds, from a 429/503 `Retry-After`),
    `entry_index` and `entry_name` (the offending entry when parsing).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        entry_index: int | None = None,
        entry_name: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.entry_index = entry_index
        self.entry_name = entry_name


@dataclass(frozen=True, kw_only=True)
class GalleryEntry:
    """One item of a gallery index, after YAML merge keys were applied.

    `raw` is the whole mapping as parsed (JSON-serialisable, the entry's own copy).
    `health_check` is our extension, normalised: `{"command": [argv...], "timeout": seconds}`,
    or None. The command is an argv (never run through a shell), meant to run in the installed
    backend's directory (so `./run.sh` is the backend's own script); exit 0 within `timeout`
    means healthy. `capabilities`, `health_check` and `raw` are plain dicts for easy storage:
    treat them as read-only.
    """

    name: str
    uri: str = ""
    mirrors: tuple[str, ...] = ()
    version: str = ""
    alias: str = ""
    capabilities: dict[str, str] = field(default_factory=dict, hash=False)
    description: str = ""
    tags: tuple[str, ...] = ()
    sha256: str = ""
    license: str = ""
    icon: str = ""
    urls: tuple[str, ...] = ()
    position: int = 0
    health_check: dict[str, Any] | None = field(default=None, hash=False)
    raw: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)

    @property
    def is_meta(self) -> bool:
        """LocalAI's rule (GalleryBackend.IsMeta): capabilities and no uri.

        Concrete entries often inherit `capabilities` through a merge key; their uri keeps
        them concrete.
        """
        return bool(self.capabilities) and not self.uri

    @property
    def is_development(self) -> bool:
        """`-development` entries track the moving `master-*` image tags."""
        return self.name.endswith(DEVELOPMENT_SUFFIX)


@dataclass(frozen=True)
class FetchResult:
    """What `fetch` got. `text` is None exactly when `not_modified` is true."""

    text: str | None
    etag: str
    not_modified: bool
    resolved_url: str


# --------------------------------------------------------------------------- URLs


def resolve_url(url: str) -> str:
    """Return the URL to download for a gallery URL as operators write it.

    `https://` and `http://` are returned unchanged, `file:///absolute/path` too;
    `github:owner/repo/path/to/index.yaml@branch` (or `github://...`, as LocalAI accepts)
    becomes `https://raw.githubusercontent.com/owner/repo/branch/path/to/index.yaml`, the
    branch defaulting to `main` like LocalAI. Anything else raises GalleryError.
    """
    text = url.strip()
    lowered = text.lower()
    if lowered.startswith(("https://", "http://")):
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018  (raises on a malformed port or address)
        except ValueError as exc:
            raise GalleryError(f"gallery URL {_redact(text)!r} is malformed: {exc}") from None
        if not parts.hostname:
            raise GalleryError(f"gallery URL {_redact(text)!r} has no host")
        return text
    if lowered.startswith("file:"):
        _file_path(text)  # validates
        return text
    if lowered.startswith("github:"):
        return _github_raw_url(text)
    raise GalleryError(
        f"unsupported gallery URL {_redact(text)!r}: use https://..., http://..., "
        "file:///absolute/path or github:owner/repo/path/to/index.yaml@branch"
    )


def _github_raw_url(url: str) -> str:
    # Same reading as LocalAI: the first "@" separates the branch, the first two path segments
    # are owner and repository, the rest is the file's path in the repository.
    body = url[len("github://") :] if url.lower().startswith("github://") else url[len("github:") :]
    location, at, branch = body.partition("@")
    if at and (not branch or "@" in branch):
        raise GalleryError(f"gallery URL {url!r}: after '@' must come exactly one branch name")
    segments = location.strip("/").split("/")
    if len(segments) < 3 or not all(segments):
        raise GalleryError(
            f"gallery URL {url!r} must look like github:owner/repo/path/to/index.yaml[@branch]"
        )
    if any(ch.isspace() for ch in url):
        raise GalleryError(f"gallery URL {url!r} contains whitespace")
    owner, repo, path = segments[0], segments[1], "/".join(segments[2:])
    return f"https://raw.githubusercontent.com/{owner}/{repo}/{branch or DEFAULT_GITHUB_BRANCH}/{path}"


def _file_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise GalleryError(
            f"gallery URL {url!r} must name an absolute path: file:///absolute/path/index.yaml"
        )
    return Path(unquote(parts.path))


def _redact(url: str) -> str:
    """The URL with any user:password and query values masked, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        # Private raw files are commonly fetched with ?token=...; keep the keys, hide values.
        query = urlencode([(key, "***") for key, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _scrub(text: str, url: str) -> str:
    """Remove the URL's secrets from text that came from elsewhere (exception messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return text
    secrets = [parts.username or "", parts.password or ""]
    secrets += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        # Whole tokens only: a user called "u" must not turn "refused" into "ref***sed".
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "***", text)
    return text


# --------------------------------------------------------------------------- fetching


def fetch(
    url: str,
    etag: str = "",
    timeout: float = 30,
    session: requests.Session | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> FetchResult:
    """Download a gallery document, or learn that it did not change since `etag`.

    http(s): sends `If-None-Match: <etag>`; 304 means not modified. A server that sends no ETag
    gets one made from the body's SHA-256, so an unchanged body still reports not_modified.
    file://: the ETag is the content's SHA-256 (size and mtime can miss a same-size rewrite).
    `timeout` bounds connecting and the whole download; bodies over `max_bytes` are refused.
    """
    resolved = resolve_url(url)
    if resolved.lower().startswith("file:"):
        return _fetch_file(resolved, etag, max_bytes)
    return _fetch_http(url, resolved, etag, timeout, session, max_bytes)


def _content_etag(data: bytes) -> str:
    return f'"sha256-{hashlib.sha256(data).hexdigest()}"'


def _fetch_file(resolved: str, etag: str, max_bytes: int) -> FetchResult:
    path = _file_path(resolved)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise GalleryError(f"gallery file {path} is {size} bytes, over the {max_bytes}-byte limit")
        data = path.read_bytes()
    except FileNotFoundError:
        raise GalleryError(f"gallery file {path} does not exist") from None
    except IsADirectoryError:
        raise GalleryError(f"gallery file {path} is a directory, not an index file") from None
    except OSError as exc:
        raise GalleryError(f"cannot read gallery file {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew between stat and read
        raise GalleryError(f"gallery file {path} is over the {max_bytes}-byte limit")
    new_etag = _content_etag(data)
    if etag and etag == new_etag:
        return FetchResult(text=None, etag=new_etag, not_modified=True, resolved_url=resolved)
    return FetchResult(
        text=_decode(data, str(path)), etag=new_etag, not_modified=False, resolved_url=resolved
    )


def _fetch_http(
    url: str,
    resolved: str,
    etag: str,
    timeout: float,
    session: requests.Session | None,
    max_bytes: int,
) -> FetchResult:
    shown = _redact(url) if url.strip() == resolved else f"{_redact(resolved)} (from {_redact(url)})"
    headers = {"If-None-Match": etag} if etag else {}
    own_session = session is None
    http = session if session is not None else requests.Session()
    deadline = time.monotonic() + timeout
    try:
        with http.get(resolved, headers=headers, timeout=(timeout, timeout), stream=True) as response:
            if response.status_code == 304:
                return FetchResult(
                    text=None,
                    etag=response.headers.get("ETag") or etag,
                    not_modified=True,
                    resolved_url=resolved,
                )
            if not 200 <= response.status_code < 300:
                raise GalleryError(
                    f"gallery {shown} answered HTTP {response.status_code} {response.reason or ''}".rstrip(),
                    status=response.status_code,
                    retry_after=_retry_after(response.headers.get("Retry-After", "")),
                )
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise GalleryError(
                    f"gallery {shown} is {declared} bytes, over the {max_bytes}-byte limit",
                    status=response.status_code,
                )
            body = bytearray()
            for chunk in response.iter_content(chunk_size=64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise GalleryError(
                        f"gallery {shown} is over the {max_bytes}-byte limit", status=response.status_code
                    )
                # requests' timeout is per socket read; a server dripping bytes never trips it.
                if time.monotonic() > deadline:
                    raise GalleryError(f"gallery {shown} took longer than {timeout:g} s to download")
            data = bytes(body)
            new_etag = response.headers.get("ETag") or _content_etag(data)
    except requests.Timeout as exc:
        raise GalleryError(
            f"gallery {shown} timed out after {timeout:g} s ({_scrub(_reason(exc), resolved)})"
        ) from None
    except requests.RequestException as exc:
        raise GalleryError(f"cannot fetch gallery {shown}: {_scrub(_reason(exc), resolved)}") from None
    finally:
        if own_session:
            http.close()
    if etag and etag == new_etag:
        return FetchResult(text=None, etag=new_etag, not_modified=True, resolved_url=resolved)
    return FetchResult(text=_decode(data, shown), etag=new_etag, not_modified=False, resolved_url=resolved)


def _reason(exc: BaseException) -> str:
    """The innermost useful words of a requests/urllib3 error ("[Errno 111] Connection refused")."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "reason", None)
        if isinstance(inner, BaseException):
            current = inner
            continue
        if current.args and isinstance(current.args[0], BaseException):
            current = current.args[0]
            continue
        break
    text = str(current) if current is not None else str(exc)
    # urllib3 prefixes "<urllib3.connection.HTTPConnection object at 0x...>: ".
    return re.sub(r"^<[^>]*object at 0x[0-9a-f]+>:\s*", "", text) or type(exc).__name__


def _retry_after(value: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _decode(data: bytes, where: str) -> str:
    # YAML allows UTF-16/32 with a BOM; real galleries are UTF-8.
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise GalleryError(f"gallery {where} is not valid {exc.encoding} text (byte {exc.start})") from None


# --------------------------------------------------------------------------- parsing

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# Scalars LocalAI reads into Go strings keep their text there ("1.10" stays "1.10"); PyYAML would
# make them floats, ints, booleans or dates. These fields are read as text, like LocalAI does.
_TEXT_FIELDS = frozenset({"name", "uri", "alias", "version", "description", "license", "icon", "sha256"})
_TEXT_LIST_FIELDS = frozenset({"mirrors", "tags", "urls"})
_TEXT_MAP_FIELDS = frozenset({"capabilities"})
_NON_TEXT_TAGS = frozenset(
    {
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:timestamp",
    }
)
# Entry names become directory names under the backends path.
_FORBIDDEN_NAME_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")
_NAME_MAX_BYTES = 255


# The C loader is ~7x faster on the real index (0.1 s against 0.8 s); same safe constructor.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _GalleryLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """yaml.SafeLoader whose dates and binaries stay text, so every value is JSON-serialisable."""


_as_scalar_text = yaml.constructor.SafeConstructor.construct_scalar
_GalleryLoader.add_constructor("tag:yaml.org,2002:timestamp", _as_scalar_text)
_GalleryLoader.add_constructor("tag:yaml.org,2002:binary", _as_scalar_text)


def parse(text: str, source: str = "") -> list[GalleryEntry]:
    """Parse and validate a whole gallery index; all entries or GalleryError.

    The document must be one YAML list of mappings, each with a non-empty string `name` and
    either a `uri` or `capabilities`. Anchors and merge keys (`<<: *x`, `!!merge <<: *x`) are
    applied. Entries keep file order in `position` (0-based, as in error messages), duplicated
    names included: see `first_by_name` and `duplicates`. `source` (a URL or path) only
    decorates messages; credentials in it are masked.
    """
    where = f"gallery {_redact(source)}: " if source else "gallery: "
    root = _compose(text, where)
    if root is None:
        raise GalleryError(f"{where}the document is empty; expected a list of backend entries")
    if not isinstance(root, SequenceNode):
        kind = "a mapping" if isinstance(root, MappingNode) else "a single value"
        raise GalleryError(
            f"{where}the top level is {kind}; a gallery index is a YAML list of backend entries"
        )
    _check_tree(root, where)
    loader = _GalleryLoader("")
    try:
        items = loader.construct_document(root)
    except (yaml.YAMLError, RecursionError, TypeError, ValueError) as exc:
        raise GalleryError(f"{where}invalid YAML: {_yaml_problem(exc)}") from None
    finally:
        loader.dispose()
    return [_entry(item, index, root.value[index], where) for index, item in enumerate(items)]


def _compose(text: str, where: str) -> Node | None:
    loader = _GalleryLoader(text)
    try:
        return loader.get_single_node()
    except (yaml.YAMLError, RecursionError) as exc:
        raise GalleryError(f"{where}invalid YAML: {_yaml_problem(exc)}") from None
    finally:
        loader.dispose()


def _yaml_problem(exc: BaseException) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(exc, RecursionError):
        return f"nested deeper than {MAX_DEPTH} levels"
    return str(exc) or type(exc).__name__


def _check_tree(root: Node, where: str) -> None:
    """Before anything is built: refuse duplicate keys, cycles, absurd depth or alias expansion,
    and retag text fields so their scalars stay text."""
    expanded: dict[int, int] = {}
    in_progress: set[int] = set()

    def line(node: Node) -> int:
        return node.start_mark.line + 1

    def visit(node: Node, depth: int) -> int:
        key = id(node)
        if key in expanded:
            return expanded[key]
        if key in in_progress:
            raise GalleryError(
                f"{where}an alias at line {line(node)} refers to a structure containing itself"
            )
        if depth > MAX_DEPTH:
            raise GalleryError(f"{where}nested deeper than {MAX_DEPTH} levels at line {line(node)}")
        in_progress.add(key)
        size = 1
        if isinstance(node, MappingNode):
            _check_mapping(node, where)
            for key_node, value_node in node.value:
                size += visit(key_node, depth + 1) + visit(value_node, depth + 1)
                if size > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, SequenceNode):
            for child in node.value:
                size += visit(child, depth + 1)
                if size > MAX_EXPANDED_NODES:
                    break
        in_progress.discard(key)
        if size > MAX_EXPANDED_NODES:
            raise GalleryError(
                f"{where}the document expands to more than {MAX_EXPANDED_NODES} values once aliases "
                f"are followed (at line {line(node)}); refusing it"
            )
        expanded[key] = size
        return size

    visit(root, 0)


def _check_mapping(node: MappingNode, where: str) -> None:
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        name = key_node.value
        if name in seen:
            # LocalAI's YAML decoder refuses these too; PyYAML would silently keep the last one.
            raise GalleryError(
                f"{where}key {name!r} appears twice in the mapping at line {node.start_mark.line + 1} "
                f"(lines {seen[name]} and {key_node.start_mark.line + 1})"
            )
        seen[name] = key_node.start_mark.line + 1
        if name in _TEXT_FIELDS:
            _as_text(value_node)
        elif name in _TEXT_LIST_FIELDS and isinstance(value_node, SequenceNode):
            for item in value_node.value:
                _as_text(item)
        elif name in _TEXT_MAP_FIELDS and isinstance(value_node, MappingNode):
            for pair in value_node.value:
                _as_text(pair[0])
                _as_text(pair[1])


def _as_text(node: Node) -> None:
    if isinstance(node, ScalarNode) and node.tag in _NON_TEXT_TAGS:
        node.tag = _STR_TAG


def _plain(value: Any) -> Any:
    """A JSON-serialisable deep copy (merge keys share objects between entries; copies don't)."""
    if isinstance(value, dict):
        return {
            (key if isinstance(key, str) else _json_key(key)): _plain(item) for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _json_key(key: Any) -> str:
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _entry(item: Any, index: int, node: Node, where: str) -> GalleryEntry:
    at = f"line {node.start_mark.line + 1}"
    if not isinstance(item, dict):
        raise GalleryError(
            f"{where}entry {index} ({at}) is {_kind(item)}, not a mapping of fields", entry_index=index
        )
    name = item.get("name")
    if name is None or name == "":
        raise GalleryError(f"{where}entry {index} ({at}) has no 'name'", entry_index=index)
    if not isinstance(name, str):
        raise GalleryError(
            f"{where}entry {index} ({at}): 'name' must be a string, got {_kind(name)}", entry_index=index
        )
    label = f"{where}entry {index} ({name!r}, {at})"

    def fail(problem: str) -> GalleryError:
        return GalleryError(f"{label}: {problem}", entry_index=index, entry_name=name)

    _check_name(name, fail)

    def text(key: str) -> str:
        value = item.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise fail(f"'{key}' must be a string, got {_kind(value)}")
        return value

    def text_list(key: str) -> tuple[str, ...]:
        value = item.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise fail(f"'{key}' must be a list of strings, got {_kind(value)}")
        for position, element in enumerate(value):
            if not isinstance(element, str):
                raise fail(f"'{key}' must be a list of strings, but item {position} is {_kind(element)}")
        return tuple(value)

    capabilities = item.get("capabilities")
    if capabilities is None:
        capabilities = {}
    if not isinstance(capabilities, dict):
        raise fail(f"'capabilities' must map capability names to backend names, got {_kind(capabilities)}")
    for capability, target in capabilities.items():
        if not isinstance(capability, str) or not isinstance(target, str):
            raise fail(
                f"'capabilities' must map capability names to backend names, but {capability!r} "
                f"maps to {_kind(target)}"
            )
    uri = text("uri")
    if not uri and not capabilities:
        raise fail("has neither a 'uri' (a concrete backend) nor 'capabilities' (a meta backend)")

    return GalleryEntry(
        name=name,
        uri=uri,
        mirrors=text_list("mirrors"),
        version=text("version"),
        alias=text("alias"),
        capabilities=dict(capabilities),
        description=text("description"),
        tags=text_list("tags"),
        sha256=text("sha256"),
        license=text("license"),
        icon=text("icon"),
        urls=text_list("urls"),
        position=index,
        health_check=_health_check(item.get("healthcheck"), fail),
        raw=_plain(item),
    )


def _check_name(name: str, fail: Any) -> None:
    # The name becomes <backends>/<name>: refuse anything that is not one plain path segment.
    if name.strip() != name or not name.strip():
        raise fail("'name' must not be blank or start or end with whitespace")
    if name in (".", "..") or _FORBIDDEN_NAME_CHARS.search(name):
        raise fail(
            "'name' must be usable as a directory name (no '/', '\\', control characters, '.' or '..')"
        )
    if len(name.encode()) > _NAME_MAX_BYTES:
        raise fail(f"'name' is longer than {_NAME_MAX_BYTES} bytes")


def _health_check(value: Any, fail: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise fail(
            f"'healthcheck' must be a mapping with 'command' and optional 'timeout', got {_kind(value)}"
        )
    command = value.get("command")
    if isinstance(command, str):
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise fail(f"'healthcheck.command' cannot be split into arguments: {exc}") from None
    elif isinstance(command, list) and all(isinstance(part, str) for part in command):
        argv = tuple(command)
    else:
        raise fail("'healthcheck.command' must be a string or a list of strings")
    if not argv or not argv[0]:
        raise fail("'healthcheck.command' is empty")
    timeout = value.get("timeout", DEFAULT_HEALTHCHECK_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_HEALTHCHECK_TIMEOUT
    ):
        raise fail(
            f"'healthcheck.timeout' must be a number of seconds above 0 and at most "
            f"{MAX_HEALTHCHECK_TIMEOUT:g}"
        )
    return {"command": list(argv), "timeout": float(timeout)}


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return type(value).__name__


# --------------------------------------------------------------------------- names and metas


def _fold(name: str) -> str:
    # LocalAI finds entries by name with strings.EqualFold: case does not make a new name.
    return name.casefold()


def first_by_name(entries: Iterable[GalleryEntry]) -> dict[str, GalleryEntry]:
    """Each name's first entry, keyed by its name as written: LocalAI's first-match lookup.

    Names are compared ignoring case, as LocalAI does, so "Foo" after "foo" is a duplicate.
    """
    seen: set[str] = set()
    result: dict[str, GalleryEntry] = {}
    for entry in entries:
        folded = _fold(entry.name)
        if folded not in seen:
            seen.add(folded)
            result[entry.name] = entry
    return result


def duplicates(entries: Iterable[GalleryEntry]) -> list[GalleryEntry]:
    """The entries shadowed by an earlier entry of the same name (ignoring case), in file order."""
    seen: set[str] = set()
    result: list[GalleryEntry] = []
    for entry in entries:
        folded = _fold(entry.name)
        if folded in seen:
            result.append(entry)
        else:
            seen.add(folded)
    return result


def resolve_meta(
    meta: GalleryEntry, capability: str, by_name: Mapping[str, GalleryEntry]
) -> GalleryEntry | None:
    """The concrete entry to install for `meta` on a machine with `capability`.

    LocalAI's rule: the capability's own key if the meta has it, otherwise `default`.
    Returns `meta` itself when it is not a meta entry, and None when the meta offers nothing
    for this machine (neither key, or an empty target: e.g. `vllm` has no CPU build).
    Raises GalleryError when the chosen target is not in `by_name` (use `first_by_name`,
    merged across galleries in priority order) or is itself a meta entry.
    """
    if not meta.is_meta:
        return meta
    key = capability if capability in meta.capabilities else DEFAULT_CAPABILITY
    target = meta.capabilities.get(key, "")
    if not target:
        return None
    entry = by_name.get(target)
    if entry is None:
        folded = _fold(target)
        entry = next((candidate for candidate in by_name.values() if _fold(candidate.name) == folded), None)
    if entry is None:
        raise GalleryError(
            f"meta backend {meta.name!r} maps capability {key!r} to {target!r}, which no gallery lists",
            entry_index=meta.position,
            entry_name=meta.name,
        )
    if entry.is_meta:
        raise GalleryError(
            f"meta backend {meta.name!r} maps capability {key!r} to {target!r}, "
            "which is itself a meta backend",
            entry_index=meta.position,
            entry_name=meta.name,
        )
    return entry


# --------------------------------------------------------------------------- compatibility

#: The capabilities LocalAI knows (pkg/system/capabilities.go), for lists people choose from.
KNOWN_CAPABILITIES = (
    "default",
    "nvidia",
    "nvidia-cuda-12",
    "nvidia-cuda-13",
    "nvidia-l4t",
    "nvidia-l4t-cuda-12",
    "nvidia-l4t-cuda-13",
    "amd",
    "intel",
    "metal",
    "darwin-x86",
    "vulkan",
)
# What a concrete image needs, from the words in its name and uri, in LocalAI's order
# (`SystemState.IsBackendCompatible`): darwin first, L4T before the other NVIDIA builds.
_HARDWARE_TOKENS = (
    ("metal", ("darwin", "mlx", "metal")),
    ("nvidia-l4t", ("l4t",)),
    ("nvidia", ("cuda", "nvidia")),
    ("amd", ("rocm", "hip", "amd")),
    ("intel", ("sycl", "intel")),
)


def hardware_of(name: str, uri: str) -> str:
    """What a concrete backend needs to run: `metal`, `nvidia-l4t`, `nvidia`, `amd`, `intel`, or
    "" (a CPU build, which runs anywhere). LocalAI reads it from the name and uri the same way."""
    combined = f"{name} {uri}".lower()
    for hardware, tokens in _HARDWARE_TOKENS:
        if any(token in combined for token in tokens):
            return hardware
    return ""


def hardware_for(capability: str) -> set[str]:
    """The `hardware_of` values a machine with `capability` runs (CPU builds run everywhere)."""
    capability = capability.strip().lower()
    runs = {""}
    if capability in ("metal", "darwin-x86"):
        runs.add("metal")
    if capability.startswith("nvidia-l4t"):
        runs.add("nvidia-l4t")
    if capability.startswith("nvidia"):
        runs.add("nvidia")
    if capability in ("amd", "intel"):
        runs.add(capability)
    return runs


def meta_keys_for(capability: str) -> tuple[str, ...]:
    """The keys of a meta entry's `capabilities` that give a machine with `capability` a build:
    its own, else LocalAI's fallbacks `default` and `cpu`."""
    return tuple(dict.fromkeys((capability.strip(), DEFAULT_CAPABILITY, "cpu")))


# --------------------------------------------------------------------------- capability

_NVIDIA_VENDOR = "0x10de"
_INTEL_VENDOR = "0x8086"


def detect_capability(
    override: str = "",
    *,
    root: str | Path = "/",
    system: str = "",
    machine: str = "",
) -> str:
    """This machine's capability, the key that picks a meta entry's concrete backend.

    In order: a non-empty `override` (settings pass PORTAL_CAPABILITY or
    LOCALAI_FORCE_META_BACKEND_CAPABILITY); LocalAI's run file `/run/localai/capability`;
    macOS: `metal` on arm64, `darwin-x86` otherwise; an NVIDIA driver (`/proc/driver/nvidia/version`,
    `/dev/nvidiactl`, a DRM device of vendor 0x10de, or Jetson's `/etc/nv_tegra_release`):
    `nvidia-l4t` on arm64, `nvidia` otherwise; ROCm's `/dev/kfd`: `amd`; an Intel DRM device
    (vendor 0x8086): `intel`; else `default`. `root`, `system` and `machine` exist so tests can
    describe another machine; callers leave them alone.
    """
    if override.strip():
        return override.strip()
    base = Path(root)
    try:
        forced = (base / "run/localai/capability").read_text().strip()
    except (OSError, UnicodeDecodeError):
        forced = ""
    if forced:
        return forced
    system = system or platform.system()
    arm = (machine or platform.machine()).lower() in ("arm64", "aarch64")
    if system == "Darwin":
        return "metal" if arm else "darwin-x86"
    vendors = _drm_vendors(base)
    nvidia = (
        (base / "proc/driver/nvidia/version").exists()
        or (base / "dev/nvidiactl").exists()
        or _NVIDIA_VENDOR in vendors
        or (arm and (base / "etc/nv_tegra_release").exists())
    )
    if nvidia:
        return "nvidia-l4t" if arm else "nvidia"
    if (base / "dev/kfd").exists():
        return "amd"
    if _INTEL_VENDOR in vendors:
        return "intel"
    return DEFAULT_CAPABILITY


def _drm_vendors(base: Path) -> set[str]:
    vendors: set[str] = set()
    for vendor_file in (base / "sys/class/drm").glob("*/device/vendor"):
        try:
            vendors.add(vendor_file.read_text().strip().lower())
        except OSError:
            continue
    return vendors
