"""LocalAI's backend gallery index: where it lives, what it says, which entry fits this machine.

A pure module (no ORM): it turns a gallery URL into text (`resolve_url`, `fetch`), the text into
validated `GalleryEntry` objects (`parse`), a meta entry into the concrete entry for a capability
(`resolve_meta`), and the machine into a capability (`detect_capability`). Every failure is a
`GalleryError` whose message says what failed and where. See docs/galleries.md.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import platform
import re
import shlex
import socket
import stat
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection
import yaml
from yaml.events import (
    AliasEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import ScalarNode

from backends_app.http_retry import retry_after_seconds

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_NODES",
    "NAME_MAX_BYTES",
    "FetchResult",
    "GalleryEntry",
    "GalleryError",
    "check_web_url",
    "detect_capability",
    "duplicates",
    "fetch",
    "first_by_name",
    "parse",
    "public_url",
    "resolve_meta",
    "resolve_url",
]

#: Largest gallery document `fetch` accepts. LocalAI's real index is about 250 KiB.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
#: Most entries an index may have (LocalAI's real index: 1033).
DEFAULT_MAX_ENTRIES = 50_000
#: Most YAML nodes (values, keys, lists, mappings) a document may expand to, each alias counted as
#: the nodes it repeats (LocalAI's real index: about 49,000, or 47 an entry). This bounds the time
#: and memory parsing takes; aliases make "billion laughs" documents tiny on the wire and huge in
#: memory.
DEFAULT_MAX_NODES = 2_500_000
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
    `entry_index` and `entry_name` (the offending entry when parsing), `bound` (which limit the
    document hit: "bytes", "entries", "nodes" or "depth"; its message quotes nothing from it).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        entry_index: int | None = None,
        entry_name: str = "",
        bound: str = "",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.entry_index = entry_index
        self.entry_name = entry_name
        self.bound = bound


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


def public_url(url: str) -> str:
    """The URL without its credentials: no user or password, query values masked as `***`.

    What the portal shows and writes (API answers, the admin, metadata.json); the URL with its
    credentials is kept apart and only used to fetch. Query values count as credentials because
    private raw files are commonly fetched with `?token=...`. URLs without credentials come back
    unchanged, so `public_url(url) != url.strip()` says whether a URL carries any.
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
    except ValueError:
        # Malformed (an unclosed IPv6 bracket...): still never show what looks like a password.
        text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1", text)
        return re.sub(r"\?[^#]*", "?***", text, count=1)
    if parts.scheme.lower() not in ("http", "https"):
        return text  # file:, github: and the rest carry no credentials
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        query = urlencode([(key, "***") for key, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_web_url(url: str, file_roots: Sequence[str | os.PathLike[str]]) -> str:
    """Refuse a gallery URL that someone signed in to the web may not set; return `resolve_url(url)`.

    The command line and PORTAL_GALLERIES may name any file or host; the API and the admin may
    not use the gallery fetch to look around the server: `file://` must name a path under one of
    `file_roots` (after following symlinks; an empty list allows none), and http(s) must not name
    a loopback, link-local, unspecified or multicast address. The messages depend only on the URL
    and the roots, never on whether a file exists. `fetch(..., confined_to=roots)` checks again
    when it reads, for a file swapped for a symlink or a host name that resolves to this machine.
    """
    resolved = resolve_url(url)
    if resolved.lower().startswith("file:"):
        _confined_path(_file_path(resolved), file_roots, resolved)
    else:
        _check_host_name(urlsplit(resolved).hostname or "", resolved)
    return resolved


def _confined_path(path: Path, roots: Sequence[str | os.PathLike[str]], url: str) -> Path:
    # Both the path as written and the path with symlinks followed must be under the same root:
    # the first makes the answer for any path elsewhere independent of what exists there, the
    # second refuses a link under the root that leads out of it.
    written, real = Path(os.path.abspath(path)), Path(os.path.realpath(path))
    for root in roots:
        if _within(written, Path(os.path.abspath(root))) and _within(real, Path(os.path.realpath(root))):
            return real
    if not roots:
        raise GalleryError(f"gallery URL {url!r}: file:// galleries cannot be set through the web here")
    allowed = ", ".join(str(root) for root in roots)
    raise GalleryError(f"gallery URL {url!r}: file:// galleries set through the web must be under {allowed}")


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _forbidden_address(address: str) -> bool:
    """Addresses that reach this machine or its link: loopback, link-local (cloud metadata services
    live on 169.254/16), unspecified (0.0.0.0 reaches this machine), multicast, and any address of
    this machine's own interfaces (a service bound to 0.0.0.0 answers on those too)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return True
    # The kernel lets a socket bind only to an address of this machine: a cheap, exact test.
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _local_refusal(url: str) -> GalleryError:
    return GalleryError(
        f"gallery URL {_redact(url)!r} reaches this machine or its local link, which galleries set "
        "through the web may not; add a local mirror with the command line or PORTAL_GALLERIES"
    )


def _check_host_name(host: str, url: str) -> None:
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost") or _forbidden_address(name):
        raise _local_refusal(url)


# --------------------------------------------------------------------------- fetching


def fetch(
    url: str,
    etag: str = "",
    timeout: float = 30,
    session: requests.Session | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    confined_to: Sequence[str | os.PathLike[str]] | None = None,
) -> FetchResult:
    """Download a gallery document, or learn that it did not change since `etag`.

    http(s): sends `If-None-Match: <etag>`; 304 means not modified. A server that sends no ETag
    gets one made from the body's SHA-256, so an unchanged body still reports not_modified.
    file://: the ETag is the content's SHA-256 (size and mtime can miss a same-size rewrite); only
    regular files are read (a FIFO or a device would block or never end).
    `timeout` bounds connecting and the whole download; bodies over `max_bytes` are refused.
    `confined_to` (for URLs set through the web; see `check_web_url`): a file must resolve under
    one of these directories, and no connection may reach a loopback or link-local address,
    whatever the host name resolves to (checked on each connection, redirects included).
    """
    resolved = resolve_url(url)
    if resolved.lower().startswith("file:"):
        path = _file_path(resolved)
        if confined_to is not None:
            path = _confined_path(path, confined_to, resolved)
        return _fetch_file(resolved, path, etag, max_bytes, confined=confined_to is not None)
    if confined_to is not None:
        _check_host_name(urlsplit(resolved).hostname or "", resolved)
        own = requests.Session()
        own.mount("http://", _RemoteOnlyAdapter())
        own.mount("https://", _RemoteOnlyAdapter())
        try:
            return _fetch_http(url, resolved, etag, timeout, own, max_bytes)
        finally:
            own.close()
    return _fetch_http(url, resolved, etag, timeout, session, max_bytes)


class _LocalAddressRefused(OSError):
    """A confined fetch connected to a loopback or link-local address; the connection is closed."""


class _RemoteOnlyHTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _refuse_local_peer(sock)
        return sock


class _RemoteOnlyHTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _refuse_local_peer(sock)
        return sock


def _refuse_local_peer(sock: socket.socket) -> None:
    # Checked on the connected socket, so DNS tricks (a name that resolves to 127.0.0.1, or to a
    # public address first and a local one next time) and spellings like http://2130706433/ or
    # http://127.1/ are caught before a byte is sent.
    if _forbidden_address(sock.getpeername()[0]):
        sock.close()
        raise _LocalAddressRefused("the address is on this machine or its local link; refused")


class _RemoteOnlyHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _RemoteOnlyHTTPConnection


class _RemoteOnlyHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _RemoteOnlyHTTPSConnection


class _RemoteOnlyAdapter(requests.adapters.HTTPAdapter):
    """Direct connections only to remote addresses. Through a proxy, the proxy connects: the host
    name was checked before the request, and the proxy's own policy does the rest."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _RemoteOnlyHTTPPool, "https": _RemoteOnlyHTTPSPool}


def _content_etag(data: bytes) -> str:
    return f'"sha256-{hashlib.sha256(data).hexdigest()}"'


def _fetch_file(resolved: str, path: Path, etag: str, max_bytes: int, *, confined: bool) -> FetchResult:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW when confined: the path was
    # resolved under an allowed root, and a symlink put there since must not lead elsewhere.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_NOFOLLOW if confined else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise GalleryError(f"gallery file {path} does not exist") from None
    except OSError as exc:
        raise GalleryError(f"cannot read gallery file {path}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise GalleryError(f"gallery file {path} is a directory, not an index file")
        raise GalleryError(f"gallery file {path} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > max_bytes:
            raise GalleryError(
                f"gallery file {path} is {info.st_size} bytes, over the {max_bytes}-byte limit",
                bound="bytes",
            )
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise GalleryError(f"cannot read gallery file {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew between stat and read
        raise GalleryError(f"gallery file {path} is over the {max_bytes}-byte limit", bound="bytes")
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
                    retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                )
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise GalleryError(
                    f"gallery {shown} is {declared} bytes, over the {max_bytes}-byte limit",
                    status=response.status_code,
                    bound="bytes",
                )
            body = bytearray()
            for chunk in response.iter_content(chunk_size=64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise GalleryError(
                        f"gallery {shown} is over the {max_bytes}-byte limit",
                        status=response.status_code,
                        bound="bytes",
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


def _decode(data: bytes, where: str) -> str:
    # YAML allows UTF-16/32 with a BOM; real galleries are UTF-8.
    encoding = "utf-16" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise GalleryError(f"gallery {where} is not valid {exc.encoding} text (byte {exc.start})") from None


# --------------------------------------------------------------------------- parsing

_STR_TAG = "tag:yaml.org,2002:str"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"
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
# The scalar types a gallery may use; collections are plain mappings and lists.
_SCALAR_TAGS = frozenset(
    {
        _STR_TAG,
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
        "tag:yaml.org,2002:binary",
    }
)
# Entry names become directory names under the backends path, and the portal derives its own file
# names from them (backends_app/disk/): the journal's `<name>.json`, `<name>.lock` and its
# temporary `.<name>.json.XXXXXXXX.tmp` (19 bytes more than the name, the longest today), the trash
# slot `<name>.<12 hex digits>`. Filesystems allow 255 bytes per name: 200 leaves room for all of
# them and for suffixes added later.
NAME_MAX_BYTES = 200
# Characters a name may not hold: path separators, and anything invisible or that changes how text
# around it is shown (C0/C1 controls, DEL, bidi overrides, zero-width and other format characters,
# line and paragraph separators, surrogates). Whitespace other than a plain space is refused too.
_FORBIDDEN_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# The C parser (libyaml) is ~7x faster than the pure-Python one; the same safe constructors.
_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _GalleryLoader(_BaseLoader):  # type: ignore[valid-type,misc]
    """yaml.SafeLoader whose dates and binaries stay text, so every value is JSON-serialisable."""


_as_scalar_text = yaml.constructor.SafeConstructor.construct_scalar
_GalleryLoader.add_constructor("tag:yaml.org,2002:timestamp", _as_scalar_text)
_GalleryLoader.add_constructor("tag:yaml.org,2002:binary", _as_scalar_text)


def parse(
    text: str,
    source: str = "",
    *,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> list[GalleryEntry]:
    """Parse and validate a whole gallery index; all entries or GalleryError.

    The document must be one YAML list of mappings, each with a non-empty string `name` and
    either a `uri` or `capabilities`. Anchors and merge keys (`<<: *x`, `!!merge <<: *x`) are
    applied. Entries keep file order in `position` (0-based, as in error messages), duplicated
    names included: see `first_by_name` and `duplicates`. `source` (a URL or path) only
    decorates messages; credentials in it are masked.

    Bounded while reading, before anything large is built: more than `max_entries` entries, more
    than `max_nodes` values once each alias is counted as the values it repeats, or nesting
    deeper than MAX_DEPTH levels each raise a GalleryError naming that bound. Time and memory
    are therefore proportional to `max_nodes` at most, whatever the document holds.
    """
    where = f"gallery {_redact(source)}: " if source else "gallery: "
    reader = _IndexReader(text, where, max_entries=max_entries, max_nodes=max_nodes)
    try:
        return [_entry(item, index, line, where) for index, item, line in reader.items()]
    except (yaml.YAMLError, RecursionError, TypeError, ValueError) as exc:
        problem = _yaml_problem(exc)
        bound = "depth" if problem.startswith("nested deeper") else ""
        raise GalleryError(f"{where}invalid YAML: {problem}", bound=bound) from None
    finally:
        reader.close()


def _yaml_problem(exc: BaseException) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        if "maximum nesting depth" in problem:
            # libyaml's own limit (1000) trips first when it reads ahead through "[[[[...".
            problem = f"nested deeper than {MAX_DEPTH} levels"
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(exc, RecursionError):
        return f"nested deeper than {MAX_DEPTH} levels"
    return str(exc) or type(exc).__name__


class _Anchor:
    """A value an alias may repeat: the value, how many nodes it stands for, how deep it goes."""

    __slots__ = ("depth", "done", "size", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.size = 0
        self.depth = 0
        self.done = False


def _line(event: Any) -> int:
    """The 1-based line an event starts on (0 when the parser gave no position)."""
    mark = event.start_mark
    return int(mark.line) + 1 if mark is not None else 0


class _IndexReader:
    """Builds a gallery document's entries straight from the parser's events, one at a time.

    Composing the whole document into YAML nodes first (what yaml.safe_load does) costs several
    hundred bytes a node before any limit can be checked: a 32 MiB list of numbers took 2.5 GB.
    Here every scalar becomes its value at once, the budgets are checked as each event arrives,
    and only anchored values outlive the entry that holds them. Semantics follow SafeLoader:
    implicit types, merge keys (own keys win, then earlier merged mappings), anchors shared by
    reference. Fields LocalAI reads as strings (`_TEXT_FIELDS`...) keep their text.
    """

    def __init__(self, text: str, where: str, *, max_entries: int, max_nodes: int) -> None:
        self.loader = _GalleryLoader(text)
        self.where = where
        self.max_entries = max_entries
        self.max_nodes = max_nodes
        self.nodes = 0  # values built so far, each alias counted as the values it repeats
        self.aliases = 0
        self.anchors: dict[str, _Anchor] = {}
        self.constructors = _GalleryLoader.yaml_constructors

    def close(self) -> None:
        self.loader.dispose()

    def items(self) -> Iterator[tuple[int, Any, int]]:
        """(index, value, line) for each top-level item, after checking the document's shape."""
        next_event = self.loader.get_event
        next_event()  # stream start
        event = next_event()
        if isinstance(event, StreamEndEvent):
            raise GalleryError(f"{self.where}the document is empty; expected a list of backend entries")
        event = next_event()  # the document's root, after its start
        if not isinstance(event, SequenceStartEvent):
            if isinstance(event, ScalarEvent) and event.value == "" and event.tag is None:
                raise GalleryError(f"{self.where}the document is empty; expected a list of backend entries")
            kind = "a mapping" if isinstance(event, MappingStartEvent) else "a single value"
            raise GalleryError(
                f"{self.where}the top level is {kind}; a gallery index is a YAML list of backend entries"
            )
        if event.tag not in (None, "!", _SEQ_TAG):
            raise self._unsupported(event.tag, event)
        self._count(event)
        index = 0
        while not isinstance(event := next_event(), SequenceEndEvent):
            if index >= self.max_entries:
                raise GalleryError(
                    f"{self.where}the index has more than {self.max_entries} entries "
                    f"(entry {index} at line {_line(event)}); refusing it",
                    bound="entries",
                )
            value, _ = self._value(event, 1, None)
            yield index, value, _line(event)
            index += 1
        next_event()  # document end
        event = next_event()
        if not isinstance(event, StreamEndEvent):
            raise GalleryError(
                f"{self.where}expected a single document, but another starts at line {_line(event)}"
            )

    def _count(self, event: Event, amount: int = 1) -> None:
        self.nodes += amount
        if self.nodes > self.max_nodes:
            why = " (aliases repeat what they refer to)" if self.aliases else ""
            raise GalleryError(
                f"{self.where}the index expands to more than {self.max_nodes} YAML nodes{why}, "
                f"at line {_line(event)}; refusing it",
                bound="nodes",
            )

    def _value(self, event: Any, depth: int, field: Any = None, text: bool = False) -> tuple[Any, int]:
        """Build the value starting at `event`; returns it and how many levels of lists and
        mappings it holds. `field` is the mapping key it is the value of; `text` keeps a scalar text.
        """
        line = _line(event)
        if isinstance(event, AliasEvent):
            anchor = self.anchors.get(event.anchor or "")
            if anchor is None:
                raise GalleryError(f"{self.where}the alias *{event.anchor} at line {line} names no anchor")
            if not anchor.done:
                raise GalleryError(
                    f"{self.where}the alias *{event.anchor} at line {line} refers to a structure "
                    "containing itself"
                )
            self.aliases += 1
            self._count(event, anchor.size)
            if depth + anchor.depth > MAX_DEPTH:
                raise self._too_deep(line)
            return anchor.value, anchor.depth
        if depth > MAX_DEPTH:
            raise self._too_deep(line)
        anchor = None
        if event.anchor is not None:
            if event.anchor in self.anchors:
                raise GalleryError(f"{self.where}the anchor &{event.anchor} at line {line} is defined twice")
            anchor = self.anchors[event.anchor] = _Anchor()
        start = self.nodes
        self._count(event)
        if isinstance(event, ScalarEvent):
            value, levels = self._scalar(event, text or field in _TEXT_FIELDS), 0
        elif isinstance(event, SequenceStartEvent):
            value, levels = self._sequence(event, depth, field in _TEXT_LIST_FIELDS)
        else:
            value, levels = self._mapping(event, depth, field in _TEXT_MAP_FIELDS)
        if anchor is not None:
            anchor.value, anchor.size, anchor.depth, anchor.done = value, self.nodes - start, levels, True
        return value, levels

    def _too_deep(self, line: int) -> GalleryError:
        message = f"{self.where}nested deeper than {MAX_DEPTH} levels at line {line}"
        return GalleryError(message, bound="depth")

    def _scalar(self, event: ScalarEvent, text: bool) -> Any:
        tag = self._tag(event)
        if text and tag in _NON_TEXT_TAGS:
            tag = _STR_TAG
        if tag not in _SCALAR_TAGS:
            raise self._unsupported(tag, event)
        start: Any = event.start_mark  # libyaml's C marks stand in for PyYAML's
        end: Any = event.end_mark
        node = ScalarNode(tag, event.value, start, end, style=event.style)
        return self.constructors[tag](self.loader, node)

    def _tag(self, event: ScalarEvent) -> str:
        if event.tag is None or event.tag == "!":
            return str(self.loader.resolve(ScalarNode, event.value, event.implicit))
        return str(event.tag)

    def _unsupported(self, tag: str | None, event: Event) -> GalleryError:
        return GalleryError(
            f"{self.where}unsupported tag {tag!r} at line {_line(event)}; a gallery "
            "holds text, numbers, booleans, dates, lists and mappings"
        )

    def _sequence(self, event: SequenceStartEvent, depth: int, text_items: bool) -> tuple[list[Any], int]:
        if event.tag not in (None, "!", _SEQ_TAG):
            raise self._unsupported(event.tag, event)
        items: list[Any] = []
        levels = 0
        next_event = self.loader.get_event
        while not isinstance(child := next_event(), SequenceEndEvent):
            value, child_levels = self._value(child, depth + 1, text=text_items)
            items.append(value)
            levels = max(levels, child_levels)
        return items, levels + 1

    def _mapping(self, event: MappingStartEvent, depth: int, text_pairs: bool) -> tuple[dict[Any, Any], int]:
        if event.tag not in (None, "!", _MAP_TAG):
            raise self._unsupported(event.tag, event)
        own: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        merged: list[dict[Any, Any]] = []
        levels = 0
        next_event = self.loader.get_event
        while not isinstance(key_event := next_event(), MappingEndEvent):
            key_line = _line(key_event)
            if isinstance(key_event, ScalarEvent) and self._tag(key_event) == _MERGE_TAG:
                self._count(key_event)
                value_event = next_event()
                value, value_levels = self._value(value_event, depth + 1)
                merged.extend(self._merge_sources(value, value_event))
                levels = max(levels, value_levels)
                continue
            key, key_levels = self._value(key_event, depth + 1, text=text_pairs)
            if isinstance(key, list | dict):
                raise GalleryError(
                    f"{self.where}a mapping key at line {key_line} is a list or a mapping, not a value"
                )
            if key in own:
                # LocalAI's YAML decoder refuses these too; PyYAML would silently keep the last one.
                raise GalleryError(
                    f"{self.where}key {key!r} appears twice in the mapping at line "
                    f"{_line(event)} (lines {lines[key]} and {key_line})"
                )
            lines[key] = key_line
            own[key], value_levels = self._value(next_event(), depth + 1, key, text_pairs)
            levels = max(levels, key_levels, value_levels)
        if not merged:
            return own, levels + 1
        # Merged keys come first, the earlier mapping winning; the mapping's own keys override them.
        combined: dict[Any, Any] = {}
        for source in merged:
            for key, value in source.items():
                combined.setdefault(key, value)
        combined.update(own)
        return combined, levels + 1

    def _merge_sources(self, value: Any, event: Event) -> list[dict[Any, Any]]:
        line = _line(event)
        if isinstance(value, dict):
            return [value]
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            return list(value)
        raise GalleryError(
            f"{self.where}a merge key (<<) at line {line} must name a mapping or a list of mappings"
        )


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


def _entry(item: Any, index: int, line: int, where: str) -> GalleryEntry:
    at = f"line {line}"
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
    # The name becomes <backends>/<name>: refuse anything that is not one plain, visible path segment.
    if name.strip() != name or not name.strip():
        raise fail("'name' must not be blank or start or end with whitespace")
    if name in (".", "..") or "/" in name or "\\" in name:
        raise fail("'name' must be usable as a directory name (no '/', '\\', '.' or '..')")
    for char in name:
        if unicodedata.category(char) in _FORBIDDEN_NAME_CATEGORIES or (char.isspace() and char != " "):
            raise fail(
                f"'name' holds U+{ord(char):04X} ({unicodedata.name(char, 'a control character')}): "
                "control, format, bidirectional and invisible characters, and whitespace other "
                "than a space, are refused"
            )
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        raise fail(f"'name' is longer than {NAME_MAX_BYTES} bytes in UTF-8")


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
