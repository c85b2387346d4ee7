"""Talking to OCI registries: connections, retries, resolving tags and pulling images.

Connections. One ``requests.Session`` (one connection pool of ``max_in_flight`` connections) per
registry host, created on first use. Every request has a (connect, read) timeout; connection errors,
timeouts and 5xx answers are retried ``retries`` times with exponential backoff; 503 honours
``Retry-After`` (seconds or an HTTP date) unless it asks for more than ``max_retry_wait``, which fails
at once. A dead host therefore fails after at most ``(retries + 1) * (connect + read timeout)`` plus
the backoff sleeps.

Rate limits. HTTP 429 slows the whole host down rather than failing requests (``host_limit.py``):
the requests allowed in flight to that host are halved, every thread waits out ``Retry-After`` (or a
backoff), and the limit grows back slowly as answers come. A request answered 429 is sent again
without counting a retry, until the host has answered nothing but 429 for ``rate_limit_patience``
seconds; then it fails with :class:`RegistryUnavailable`. A ``Retry-After`` beyond
``max_retry_wait`` still fails at once. :meth:`RegistryClient.rate_limits` says what happened.

Bodies. The read timeout only bounds each silence, so a registry sending a byte every few seconds
would never trip it. Bodies are therefore read one socket read at a time and watched: a body slower
than ``speed_limit`` bytes/s over ``speed_time`` seconds is cut off (a layer then resumes with a
Range request, within ``retries``), and no blob may take longer than ``blob_deadline`` in all. The
error says which limit was hit. A check runs whenever a read returns, so it fires at most one read
timeout late.

Schemes. HTTPS with certificate verification, except for hosts in ``insecure_hosts`` and loopback
hosts (``localhost``, 127.0.0.0/8, ``::1``; no configuration needed, as with Docker): for those
HTTPS is tried first without certificate verification and, if the server does not speak TLS, plain
HTTP is used and remembered for the life of the client.

Auth. The schemes, credentials and tokens are ``auth.py``'s; this module sends the requests a
401 challenge calls for (with the same retries as any request).

Threads. A :class:`RegistryClient` may be shared by the threads of a pool: the host table, the
token cache and the request counters are guarded by locks, and ``requests`` sessions are safe for
concurrent requests that do not change session state (we never do; each call has its own
response). At most ``max_in_flight`` requests are in flight to one host (fewer after a 429); more
threads wait their turn, so the pool never opens connections it would then throw away.

Pulls. Layers download concurrently into part files (``blobs.py``): up to ``pull_layers`` layers
at once over up to ``pull_connections`` connections, each blob cut into ranged parts of
``pull_part_size`` bytes, the earliest layer's parts first. A layer is applied (inflated and safely
unpacked by ``unpack.RootfsWriter``) only once its whole blob's size and digest are verified, in
manifest order, while later layers still download. A part cut off mid-way resumes from its first
missing byte; with ``blob_dir`` the part files outlive the call and a later pull of the same layers
continues from them (after a SIGKILL too). Temporary disk: the compressed size of the image at most
(each blob's files go once its layer is applied, unless ``blob_dir`` keeps them for a retry). A
registry that ignores Range is remembered for the client's life and served one stream per blob.

Request budget (see :attr:`RegistryClient.request_counts`): ``head_digest`` costs one HEAD once a
token is cached; ``resolve`` a HEAD and a GET (plus a GET for an index); ``pull`` one GET per part
(one per layer for layers up to ``pull_part_size``). A first contact with a bearer-token registry
adds the 401 and one token GET.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import ipaddress
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
import urllib3

from backends_app.disk.fsops import tree_size
from backends_app.http_retry import retry_after_seconds

from . import auth, blobs
from .errors import (
    AllSourcesFailed,
    AuthError,
    DigestMismatch,
    InvalidReference,
    NotFound,
    OCIError,
    RegistryUnavailable,
    UnsafeArchive,
)
from .host_limit import HostLimit, RateLimitStats
from .manifest import (
    INDEX_TYPES,
    MANIFEST_ACCEPT,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    VERSION_ANNOTATION,
    Descriptor,
    Platform,
    host_platform,
    load_json,
    media_type_of,
    select_platform,
)
from .reference import Reference, parse_reference, validate_digest
from .unpack import (
    COPY_CHUNK,
    PROGRESS_INTERVAL,
    ProgressCallback,
    PullProgress,
    RootfsWriter,
    create_destination,
    decompressing_reader,
    remove_tree,
)

# Only hosts the operator marked insecure (or loopback) are reached without verifying certificates;
# urllib3's warning about each such request says nothing new. Filtered once here: a
# warnings.catch_warnings() block per request costs CPU and is not thread-safe.
warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Requests in flight to one host at most, and the connections kept open to it (``max_in_flight``).
MAX_IN_FLIGHT = 32
_RETRY_STATUSES = frozenset({500, 502, 503, 504})


@dataclass
class RegistryConfig:
    """How to reach registries. Defaults suit a public registry over the internet."""

    insecure_hosts: Collection[str] = ()
    """``host`` or ``host:port`` entries allowed to use plain HTTP and unverified TLS."""
    timeout: float | tuple[float, float] = (5.0, 60.0)
    """Seconds: one number for both, or (connect, read). Read is the longest silence allowed."""
    retries: int = 3
    """Retries after the first attempt, on connection errors, timeouts and 5xx (429: see below)."""
    backoff: float = 0.5
    """First retry delay in seconds; doubles on every retry (with 10% jitter)."""
    max_retry_wait: float = 60.0
    """The longest single wait accepted (backoff or Retry-After); a longer Retry-After fails."""
    max_in_flight: int = MAX_IN_FLIGHT
    """Requests in flight to one host at most, and the connections kept open to it. Through a
    distant link a lookup mostly waits, so many in flight pay off; a 429 lowers it for that host."""
    rate_limit_patience: float = 120.0
    """Seconds a host may answer nothing but HTTP 429 before the requests waiting on it fail. Until
    then a 429 slows the host down (fewer in flight, ``Retry-After`` waited for) and is not a retry."""
    credentials: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """``{registry host: (username, password)}``; ``docker.io`` for Docker Hub."""
    auth_file: str | os.PathLike[str] | None = None
    """A docker ``config.json`` whose ``auths`` entries provide credentials."""
    platform: str | None = None
    """``os/arch[/variant]`` picked from multi-platform indexes; default: this machine's."""
    progress_interval: float = PROGRESS_INTERVAL
    """Minimum seconds between two progress callbacks during a pull."""
    speed_limit: int = 1024
    """Low-speed limit in bytes per second (0: none). A body arriving slower than this, on
    average over ``speed_time`` seconds, is cut off (and a layer resumed with a Range request,
    within ``retries``), as curl's ``--speed-limit`` does. Catches a registry that trickles bytes
    just often enough never to trip the read timeout."""
    speed_time: float = 60.0
    """Seconds over which ``speed_limit`` is measured."""
    blob_deadline: float = 3600.0
    """The longest one blob (a layer, a config, a manifest) may take to download, retries and
    resumes included (0: none)."""
    pull_connections: int = 8
    """Connections a pull may have open at once, over all its layers."""
    pull_layers: int = 4
    """Layers a pull downloads at once (the earliest first)."""
    pull_part_size: int = blobs.DEFAULT_PART_SIZE
    """Bytes of a blob fetched by one ranged request; a blob this size or smaller is one request."""
    user_agent: str = "backend-portal-oci/1"
    on_response: Callable[[str, str, int | None], None] | None = None
    """Called after every HTTP exchange as ``(host, method, status)``, ``status`` None when no
    answer came (connection error, timeout): how the portal counts requests and 429s without this
    module knowing about metrics. Errors it raises are logged, never passed on."""

    @property
    def connect_read_timeout(self) -> tuple[float, float]:
        if isinstance(self.timeout, tuple):
            return self.timeout
        return (float(self.timeout), float(self.timeout))


@dataclass(frozen=True)
class Resolved:
    """What a reference points to, for one platform."""

    reference: Reference
    """The reference as asked (with its tag); ``pinned`` has the digest."""
    digest: str
    """What the tag points to: the index digest for a multi-platform image, else the manifest's."""
    index_digest: str | None
    """The index digest, or None when the tag points directly at an image manifest."""
    manifest_digest: str
    """The image manifest for the platform: compare this one to tell an upgrade from a rebuild."""
    media_type: str
    """The image manifest's media type (OCI or Docker v2)."""
    platform: str | None
    """The platform chosen in the index (None for a single-platform manifest)."""
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    """The index's annotations overlaid with the manifest's."""
    source: str
    """The reference string actually used (differs from the primary when a mirror served it)."""

    @property
    def version(self) -> str | None:
        """``org.opencontainers.image.version`` from the manifest or index annotations."""
        return self.annotations.get(VERSION_ANNOTATION)

    @property
    def total_compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def pinned(self) -> Reference:
        """The reference pinned to the platform manifest digest (what a pull fetches)."""
        return self.reference.with_digest(self.manifest_digest)


@dataclass(frozen=True)
class PullResult:
    """The outcome of a pull: what was installed into ``dest`` and from where."""

    reference: Reference
    """Pinned to the manifest digest actually unpacked."""
    source: str
    digest: str
    index_digest: str | None
    manifest_digest: str
    version: str | None
    dest: Path
    bytes_downloaded: int
    size_on_disk: int
    """Apparent size of the regular files in ``dest`` (hard links counted once)."""
    files: int
    resolved: Resolved


@dataclass
class _Host:
    """Per registry host: its session, the scheme found to work, and auth state."""

    name: str
    session: requests.Session
    relaxed: bool  # loopback or insecure: HTTP fallback and no certificate verification
    scheme: str | None = None  # None until the first answer when relaxed, else "https"
    auth_state: auth.HostAuth = field(default_factory=auth.HostAuth)
    limit: HostLimit | None = None  # requests in flight, adapted to the host's 429s


def is_loopback_host(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ``::1``, with or without a port."""
    name = _strip_port(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.index("]")] if "]" in host else host
    if host.count(":") == 1:
        return host.rsplit(":", 1)[0]
    return host


def _registry_error(response: requests.Response) -> str:
    """The registry's own error text (``{"errors": [{"code", "message"}]}``), short."""
    try:
        errors = response.json().get("errors") or []
        parts = [
            f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)
        ]
        if parts:
            return "; ".join(parts)[:300]
    except ValueError:
        pass
    except AttributeError:
        pass
    return (response.reason or "")[:300]


class RegistryClient:
    """Registry operations for the rest of the portal. See the module docstring for behaviour."""

    def __init__(
        self, config: RegistryConfig | None = None, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.config = config or RegistryConfig()
        self._sleep = sleep
        self._hosts: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._credentials = auth.Credentials(self.config.credentials, self.config.auth_file)
        self._insecure = {h.lower() for h in self.config.insecure_hosts}
        self._no_ranges: set[str] = set()  # hosts that answer a ranged request with the whole blob

    # -- lifecycle and counters ---------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def request_counts(self) -> dict[str, int]:
        """HTTP exchanges so far by method (``HEAD``, ``GET``, ...), 401s and token GETs included."""
        with self._lock:
            return dict(self._counts)

    def reset_request_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    def rate_limits(self) -> dict[str, RateLimitStats]:
        """Per host that answered HTTP 429 at least once: how often, and how far it slowed us."""
        with self._lock:
            limits = [host.limit for host in self._hosts.values() if host.limit is not None]
        stats = (limit.stats() for limit in limits)
        return {s.host: s for s in stats if s.throttled}

    # -- public operations ----------------------------------------------------------------------

    def head_digest(self, ref: str | Reference) -> str:
        """The digest the tag points to now (an index digest for multi-platform images): one HEAD."""
        reference = parse_reference(ref)
        digest, _ = self._head_manifest(reference)
        return digest

    def resolve(self, ref: str | Reference, platform: str | None = None) -> Resolved:
        """Resolve ``ref`` to its manifest for ``platform``, verifying every manifest's digest.

        A tag costs one HEAD (the digest it points to) then GETs by digest: the index if it is one,
        and the platform's manifest. A reference with a digest skips the HEAD.
        """
        reference = parse_reference(ref)
        wanted = Platform.parse(platform or self.config.platform or host_platform())
        where = str(reference)
        if reference.digest:
            digest = reference.digest
        else:
            digest, _ = self._head_manifest(reference)
        top, media_type = self._get_manifest(reference, digest)
        index_digest: str | None = None
        chosen: str | None = None
        annotations: dict[str, str] = {}
        manifest, manifest_digest = top, digest
        if media_type in INDEX_TYPES:
            index_digest = digest
            annotations.update(_annotations(top))
            descriptor, found = select_platform(top, wanted, where)
            annotations.update(descriptor.annotations or {})
            chosen = str(found)
            manifest_digest = descriptor.digest
            manifest, media_type = self._get_manifest(reference, manifest_digest)
            if media_type in INDEX_TYPES:
                raise OCIError(f"{where}: nested index for {chosen} is not supported")
        annotations.update(_annotations(manifest))
        config = Descriptor.from_json(manifest.get("config"), f"{where} config")
        layers = tuple(
            Descriptor.from_json(layer, f"{where} layers[{i}]")
            for i, layer in enumerate(manifest.get("layers") or [])
        )
        return Resolved(
            reference=reference,
            digest=digest,
            index_digest=index_digest,
            manifest_digest=manifest_digest,
            media_type=media_type,
            platform=chosen,
            config=config,
            layers=layers,
            annotations=annotations,
            # As the caller wrote it, so it compares equal to the gallery's own strings.
            source=ref.strip() if isinstance(ref, str) else str(reference),
        )

    def fetch_config(self, resolved: Resolved) -> dict[str, Any]:
        """The image config JSON (labels, platform, ...), digest-verified. One GET."""
        body = self._get_blob_bytes(resolved.reference, resolved.config)
        return load_json(body, f"{resolved.reference} config")

    def referrers(self, ref: str | Reference, digest: str) -> dict[str, Any] | None:
        """The OCI 1.1 referrers API: the index of the manifests whose ``subject`` is ``digest``.

        None when the registry has no referrers API (it answers 404, 400, 405 or 501, as registries
        older than distribution-spec 1.1 do); then the referrers tag schema is where to look. One GET.
        """
        reference = parse_reference(ref)
        response = self._request(
            "GET",
            reference,
            f"referrers/{validate_digest(digest)}",
            headers={"Accept": OCI_INDEX},
            what="referrers",
            stream=True,
            ok=(200, 400, 404, 405, 501),
        )
        where = f"{reference.name} referrers of {digest}"
        if response.status_code != 200:
            response.close()
            return None
        body = _read_limited(response, MAX_MANIFEST_BYTES, where, self._watch(where))
        data = load_json(body, where)
        return data if media_type_of(data, response.headers.get("Content-Type")) == OCI_INDEX else None

    def fetch_manifest(self, ref: str | Reference, identifier: str) -> tuple[dict[str, Any], str]:
        """A manifest or index of ``ref``'s repository by tag or digest, and its media type.

        Fetched by digest, its bytes are verified against it. ``NotFound`` when it does not exist.
        """
        reference = parse_reference(ref)
        if identifier.partition(":")[1]:
            return self._get_manifest(reference, validate_digest(identifier))
        where = f"{reference.name}:{identifier}"
        body, content_type = self._manifest_bytes(reference, identifier, where)
        data = load_json(body, where)
        return data, media_type_of(data, content_type)

    def fetch_blob(self, ref: str | Reference, descriptor: Descriptor, max_bytes: int) -> bytes:
        """A small blob held in memory (at most ``max_bytes``), verified against its digest. One GET."""
        if descriptor.size > max_bytes:
            raise OCIError(
                f"{parse_reference(ref).name}@{descriptor.digest}: {descriptor.size} bytes is more than "
                f"the {max_bytes} allowed"
            )
        return self._get_blob_bytes(parse_reference(ref), descriptor)

    def pull(
        self,
        target: str | Reference | Resolved,
        dest: str | os.PathLike[str],
        platform: str | None = None,
        progress: ProgressCallback | None = None,
        blob_dir: str | os.PathLike[str] | None = None,
    ) -> PullResult:
        """Resolve (unless given a :class:`Resolved`), then download, verify and unpack every layer.

        ``platform`` only matters when resolving here (a :class:`Resolved` already chose one).
        ``dest`` must not exist; it is created and, on any failure, removed again with everything in
        it. Layers are downloaded concurrently into part files (see ``blobs.py``) and applied in
        manifest order, each once its whole blob is verified, while later ones still download.

        ``blob_dir``: where the part files live. Given, they survive this call (a later pull with
        the same layers continues from them; they are kept until the caller clears the directory,
        since a retry must re-apply every layer); a blob that fails its digest twice or holds a
        hostile archive is dropped from it. Without it, a private directory beside ``dest`` is used,
        each blob's files are deleted once its layer is applied, and the directory is removed at the
        end.
        """
        resolved = target if isinstance(target, Resolved) else self.resolve(target, platform)
        reference = resolved.reference
        layers = resolved.layers
        dest_path = create_destination(dest)
        private = blob_dir is None
        root = (
            Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.blobs-", dir=dest_path.parent))
            if blob_dir is None
            else Path(blob_dir)
        )
        downloaded = _Counter()
        bodies = _OpenBodies()
        started = time.monotonic()
        try:
            store = blobs.BlobStore(root)
            fetch = blobs.BlobPull(
                store,
                layers,
                functools.partial(self._download_parts, reference, downloaded, started, bodies),
                connections=self.config.pull_connections,
                layers_at_once=self.config.pull_layers,
                part_size=self.config.pull_part_size,
                ranged=reference.api_host not in self._no_ranges,
                on_ranges_ignored=functools.partial(self._note_no_ranges, reference.api_host),
                on_stop=bodies.cut_all,
            )
            report = _PullReport(progress, layers, fetch, self.config.progress_interval)
            writer = RootfsWriter(dest_path)
            if layers:
                report.layer(0)
            with fetch:
                for index, layer in enumerate(layers):
                    if index:
                        report.layer(index)
                    while not fetch.wait(index, report.interval):
                        report.waiting(index)
                    label = f"layer {index + 1}/{len(layers)} ({layer.digest[:19]})"
                    source = fetch.open(index, functools.partial(report.applying, index))
                    try:
                        writer.apply_layer(decompressing_reader(source, layer.media_type, label), label)
                    except UnsafeArchive:
                        store.discard(layer.digest)
                        raise
                    finally:
                        source.close()
                    if private:
                        fetch.release(index)
                    report.layer_done(index)
                try:
                    writer.finish()
                except UnsafeArchive:
                    for layer in layers:
                        store.discard(layer.digest)
                    raise
        except BaseException as exc:
            if isinstance(exc, DigestMismatch) and not private:
                for layer in layers:
                    if layer.digest in str(exc):
                        blobs.BlobStore(root).discard(layer.digest)
            remove_tree(dest_path)
            raise
        finally:
            if private:
                shutil.rmtree(root, ignore_errors=True)
        return PullResult(
            reference=resolved.pinned,
            source=resolved.source,
            digest=resolved.digest,
            index_digest=resolved.index_digest,
            manifest_digest=resolved.manifest_digest,
            version=resolved.version,
            dest=dest_path,
            bytes_downloaded=downloaded.value,
            size_on_disk=tree_size(dest_path),
            files=writer.stats.files,
            resolved=resolved,
        )

    def _note_no_ranges(self, host: str) -> None:
        """Remember for the client's life that ``host`` answers ranged requests with whole blobs."""
        with self._lock:
            self._no_ranges.add(host)

    def resolve_first(self, refs: Sequence[str | Reference], platform: str | None = None) -> Resolved:
        """:meth:`resolve` the first reference that works (primary, then mirrors, in order)."""
        return self._first(refs, lambda ref: self.resolve(ref, platform), "resolve")

    def pull_first(
        self,
        refs: Sequence[str | Reference],
        dest: str | os.PathLike[str],
        platform: str | None = None,
        progress: ProgressCallback | None = None,
        blob_dir: str | os.PathLike[str] | None = None,
    ) -> PullResult:
        """:meth:`pull` from the first reference that works; ``result.source`` says which.

        A source that fails for any reason but a hostile archive is skipped (``dest`` is cleaned
        between attempts); a hostile archive stops everything, as the image itself is refused.
        """
        return self._first(refs, lambda ref: self.pull(ref, dest, platform, progress, blob_dir), "pull")

    def _first(
        self, refs: Sequence[str | Reference], action: Callable[[str | Reference], _T], verb: str
    ) -> _T:
        if not refs:
            raise OCIError(f"nothing to {verb}: no references given")
        errors: list[tuple[str, OCIError]] = []
        for ref in refs:
            try:
                return action(ref)
            except UnsafeArchive:
                raise
            except OCIError as exc:
                log.warning("%s from %s failed: %s", verb, ref, exc)
                errors.append((str(ref), exc))
        summary = "; ".join(f"{source}: {exc}" for source, exc in errors)
        raise AllSourcesFailed(f"{verb} failed from every source ({summary})", errors)

    # -- manifests and blobs ------------------------------------------------------------------

    def _head_manifest(self, ref: Reference) -> tuple[str, str | None]:
        response = self._request(
            "HEAD", ref, f"manifests/{ref.identifier}", headers={"Accept": MANIFEST_ACCEPT}, what="manifest"
        )
        response.close()
        digest = response.headers.get("Docker-Content-Digest")
        media_type = response.headers.get("Content-Type")
        if digest:
            try:
                return validate_digest(digest), media_type
            except InvalidReference:
                raise OCIError(f"{ref}: registry sent a malformed digest header") from None
        # Some registries omit the header on HEAD: fall back to hashing the manifest itself.
        body, _ = self._manifest_bytes(ref, ref.identifier, str(ref))
        return f"sha256:{hashlib.sha256(body).hexdigest()}", media_type

    def _manifest_bytes(self, ref: Reference, identifier: str, where: str) -> tuple[bytes, str | None]:
        """A manifest's bytes by tag or digest (at most MAX_MANIFEST_BYTES) and its Content-Type."""
        response = self._request(
            "GET",
            ref,
            f"manifests/{identifier}",
            headers={"Accept": MANIFEST_ACCEPT},
            what="manifest",
            stream=True,
        )
        body = _read_limited(response, MAX_MANIFEST_BYTES, where, self._watch(where))
        return body, response.headers.get("Content-Type")

    def _get_manifest(self, ref: Reference, digest: str) -> tuple[dict[str, Any], str]:
        where = f"{ref.name}@{digest}"
        body, content_type = self._manifest_bytes(ref, digest, where)
        _verify_bytes(body, digest, where)
        data = load_json(body, where)
        return data, media_type_of(data, content_type)

    def _get_blob_bytes(self, ref: Reference, descriptor: Descriptor) -> bytes:
        response = self._request("GET", ref, f"blobs/{descriptor.digest}", what="blob", stream=True)
        where = f"{ref.name}@{descriptor.digest}"
        body = _read_limited(
            response, max(descriptor.size, 0) or MAX_MANIFEST_BYTES, where, self._watch(where)
        )
        _verify_bytes(body, descriptor.digest, where)
        return body

    def _download_parts(
        self,
        ref: Reference,
        downloaded: _Counter,
        started: float,
        bodies: _OpenBodies,
        descriptor: Descriptor,
        parts: list[blobs.Part],
        ranged: bool,
        should_stop: Callable[[], bool],
    ) -> None:
        """Fill ``parts`` of a layer blob from the registry (the ``download`` of :class:`blobs.BlobPull`).

        ``ranged``: ``parts`` is one part, fetched from its first missing byte with a Range request
        (none when that is the whole blob). Otherwise ``parts`` is the whole blob, fetched in one
        stream whose bytes already held are skipped. A connection lost or too slow mid-way is
        resumed, within ``retries``, unless the pull is stopping (its bodies are then cut, see
        :class:`_OpenBodies`).
        """
        path = f"blobs/{descriptor.digest}"
        where = f"{ref.api_host}: blob {descriptor.digest}"
        watch = self._watch(where)
        watch.started = started
        resumes = 0
        while True:
            missing = [part for part in parts if not part.complete]
            if not missing:
                return
            if should_stop():
                raise blobs.Stopped()
            headers: dict[str, str] = {}
            first = missing[0].start + missing[0].held
            whole = first == 0 and missing[0].end == descriptor.size
            if ranged and not whole:
                headers["Range"] = f"bytes={first}-{missing[0].end - 1}"
            response = self._request(
                "GET", ref, path, what="blob", stream=True, headers=headers, ok=(200, 206, 416)
            )
            before = sum(part.held for part in parts)
            bodies.add(response)
            try:
                if response.status_code == 416:
                    raise blobs.RangeRefused()
                if headers:
                    if response.status_code != 206:
                        raise blobs.RangeIgnored()
                    if _content_range_start(response.headers.get("Content-Range")) != first:
                        raise RegistryUnavailable(f"{where}: bad Content-Range answering bytes={first}-")
                    _fill_part(response, missing[0], watch, downloaded, should_stop)
                else:
                    _fill_in_order(response, parts, descriptor, watch, downloaded, should_stop)
                if any(not part.complete for part in parts):
                    raise _ShortBody(f"the body ended after {sum(p.held for p in parts) - before} bytes")
                return
            except (*TRANSFER_ERRORS, _ShortBody) as exc:
                if should_stop():
                    raise blobs.Stopped() from None  # cut by the pull's end, not by the network
                cause = str(exc) if isinstance(exc, _TooSlow | _ShortBody) else type(exc).__name__
                received = sum(part.held for part in parts)
                if resumes >= self.config.retries:
                    if isinstance(exc, _TooSlow):
                        raise RegistryUnavailable(
                            f"{ref.api_host}: downloading {descriptor.digest} {exc}, "
                            f"{resumes + 1} attempt(s), {received} of {descriptor.size} bytes received"
                        ) from None
                    raise RegistryUnavailable(
                        f"{ref.api_host}: connection lost downloading {descriptor.digest} "
                        f"after {received} bytes ({cause})"
                    ) from None
                resumes += 1
                log.info("resuming %s at byte %d after %s", descriptor.digest, received, cause)
                self._sleep(self._backoff(resumes - 1))
                watch.check_deadline(received, descriptor.size)
                watch.restart_window()
            finally:
                bodies.discard(response)
                response.close()

    def _watch(self, where: str) -> _TransferWatch:
        return _TransferWatch(
            where=where,
            speed_limit=max(0, int(self.config.speed_limit)),
            speed_time=max(0.001, float(self.config.speed_time)),
            deadline=max(0.0, float(self.config.blob_deadline)),
        )

    # -- HTTP core ------------------------------------------------------------------------------

    def _host(self, name: str) -> _Host:
        with self._lock:
            host = self._hosts.get(name)
            if host is None:
                session = requests.Session()
                ceiling = max(1, self.config.max_in_flight)
                adapter = requests.adapters.HTTPAdapter(
                    pool_connections=1, pool_maxsize=ceiling, max_retries=0
                )
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.headers["User-Agent"] = self.config.user_agent
                # Proxies from the environment are read once per host, not on every request (with
                # trust_env requests re-reads the environment and ~/.netrc each time: a quarter of a
                # HEAD's CPU). Credentials come from the config only, never from ~/.netrc.
                session.proxies.update(requests.utils.get_environ_proxies(f"https://{name}"))
                session.trust_env = False
                bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                if bundle:
                    session.verify = bundle
                relaxed = (
                    is_loopback_host(name)
                    or name.lower() in self._insecure
                    or _strip_port(name).lower() in self._insecure
                )
                limit = HostLimit(
                    name,
                    ceiling,
                    backoff=self.config.backoff,
                    max_wait=self.config.max_retry_wait,
                    patience=self.config.rate_limit_patience,
                )
                host = _Host(
                    name=name,
                    session=session,
                    relaxed=relaxed,
                    scheme=None if relaxed else "https",
                    limit=limit,
                )
                self._hosts[name] = host
            return host

    def _count(self, method: str) -> None:
        with self._lock:
            self._counts[method] += 1

    def _backoff(self, attempt: int) -> float:
        delay = float(self.config.backoff * 2.0**attempt * random.uniform(0.9, 1.1))  # noqa: S311 (jitter)
        return min(delay, self.config.max_retry_wait)

    def _send(self, host: _Host, method: str, url_path: str, **kwargs: Any) -> requests.Response:
        """One HTTP exchange with the host, choosing the scheme for relaxed hosts on first contact.

        It waits for a slot under the host's limit first; a 429 answer pauses the host (the caller
        decides whether to send again)."""
        timeout = self.config.connect_read_timeout
        limit = host.limit
        assert limit is not None
        while True:
            scheme = host.scheme or "https"
            url = url_path if "://" in url_path else f"{scheme}://{host.name}{url_path}"
            sent_at = limit.acquire()
            try:
                response = host.session.request(
                    method,
                    url,
                    timeout=timeout,
                    verify=host.session.verify if not host.relaxed else False,
                    allow_redirects=method != "HEAD",
                    **kwargs,
                )
            except requests.exceptions.SSLError:
                limit.failed()
                # The server does not speak TLS: plain HTTP from now on (loopback/insecure only). A
                # thread that started with https while another found this out retries too.
                if (
                    host.relaxed
                    and scheme == "https"
                    and host.scheme in (None, "http")
                    and "://" not in url_path
                ):
                    host.scheme = "http"
                    continue
                self._observe(host.name, method, None)
                raise
            except BaseException as exc:
                limit.failed()
                if isinstance(exc, requests.RequestException):
                    self._observe(host.name, method, None)
                raise
            if response.status_code == 429:
                limit.throttled(sent_at, retry_after_seconds(response.headers.get("Retry-After")))
            else:
                limit.answered()
            if host.scheme is None and "://" not in url_path:
                host.scheme = scheme
            self._count(method)
            self._observe(host.name, method, response.status_code)
            return response

    def _observe(self, host: str, method: str, status: int | None) -> None:
        if self.config.on_response is None:
            return
        try:
            self.config.on_response(host, method, status)
        except Exception:
            log.exception("the registry response observer failed")

    def _request(
        self,
        method: str,
        ref: Reference,
        path: str,
        *,
        what: str,
        actions: str = "pull",
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        body: Callable[[], Any] | None = None,
        ok: Collection[int] = (200, 201, 202, 204, 206),
    ) -> requests.Response:
        """A registry API request for ``ref``'s repository with auth, retries and clear errors.

        ``path`` is relative to ``/v2/<repository>/`` or an absolute URL (upload locations).
        ``body`` is a factory so a retried request can send its body again.
        """
        host = self._host(ref.api_host)
        url_path = path if "://" in path or path.startswith("/") else f"/v2/{ref.repository}/{path}"
        scope = f"repository:{ref.repository}:{actions}"
        attempt = 0
        authenticated_now = False
        target = f"{ref.api_host}/{ref.repository}"
        # Our credentials and tokens go to the registry only, not to a host an upload URL names.
        send_auth = "://" not in url_path or urllib.parse.urlsplit(url_path).netloc == host.name
        while True:
            request_headers = dict(headers or {})
            if send_auth:
                request_headers.update(host.auth_state.header(scope, self._credentials.for_reference(ref)))
            try:
                response = self._send(
                    host,
                    method,
                    url_path,
                    headers=request_headers,
                    stream=stream,
                    data=body() if body else None,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    # Retrying cannot help; say what would.
                    raise RegistryUnavailable(
                        f"{ref.api_host}: TLS certificate verification failed "
                        "(a private registry with its own CA must be listed as insecure)"
                    ) from None
                if attempt < self.config.retries:
                    delay = self._backoff(attempt)
                    log.info(
                        "%s %s: %s, retry %d in %.1fs", method, target, type(exc).__name__, attempt + 1, delay
                    )
                    attempt += 1
                    self._sleep(delay)
                    continue
                cause = _describe_network_error(exc)
                raise RegistryUnavailable(
                    f"{ref.api_host} unreachable after {attempt + 1} attempts ({cause})"
                ) from None
            status = response.status_code
            if status == 401 and not authenticated_now:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authenticate(host, ref, scope, challenge)
                authenticated_now = True
                continue
            if status == 429:
                self._rate_limited(host, response, method, target)
                continue
            if status in _RETRY_STATUSES:
                retry_after = self._retry_after(response, target)
                if attempt < self.config.retries:
                    delay = retry_after if retry_after is not None else self._backoff(attempt)
                    log.info("%s %s: HTTP %d, retry %d in %.1fs", method, target, status, attempt + 1, delay)
                    attempt += 1
                    self._sleep(delay)
                    continue
                raise RegistryUnavailable(f"{target}: HTTP {status} after {attempt + 1} attempts")
            if status in ok:
                return response
            detail = _registry_error(response) if method != "HEAD" else ""
            response.close()
            suffix = f" ({detail})" if detail else ""
            if status in (401, 403):
                if self._credentials.for_reference(ref):
                    raise AuthError(
                        f"{ref.api_host} rejected the configured credentials for {ref.repository} "
                        f"(HTTP {status}){suffix}"
                    )
                raise AuthError(
                    f"{ref.api_host} denied anonymous access to {ref.repository} (HTTP {status}){suffix}"
                )
            if status == 404:
                raise NotFound(f"{what} not found: {target} {path.rpartition('/')[2]}{suffix}")
            raise OCIError(f"{method} {target} {what}: HTTP {status}{suffix}")

    def _retry_after(self, response: requests.Response, target: str) -> float | None:
        """Close a 429 or 5xx answer and return its ``Retry-After`` in seconds (None: not given);
        one asking for more than ``max_retry_wait`` fails now."""
        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
        response.close()
        if retry_after is not None and retry_after > self.config.max_retry_wait:
            raise RegistryUnavailable(
                f"{target}: HTTP {response.status_code}, registry asks to retry after {retry_after:.0f}s, "
                f"more than the {self.config.max_retry_wait:.0f}s allowed"
            )
        return retry_after

    def _rate_limited(self, host: _Host, response: requests.Response, method: str, target: str) -> None:
        """A 429: the host is paused and slowed already (`_send`), and the next `_send` waits for it
        (or gives up, `HostLimit.acquire`); a ``Retry-After`` beyond ``max_retry_wait`` fails now."""
        self._retry_after(response, target)
        log.debug("%s %s: HTTP 429, sent again when %s allows", method, target, host.name)

    def _authenticate(self, host: _Host, ref: Reference, scope: str, challenge: str) -> None:
        """Answer a 401: note Basic auth, or earn a bearer token for ``scope`` from the token service."""
        scheme, params = auth.parse_challenge(challenge)
        credentials = self._credentials.for_reference(ref)
        if scheme == "basic":
            if not credentials:
                raise AuthError(f"{ref.api_host} requires credentials and none are configured for it")
            if host.scheme == "http" and not host.relaxed:
                raise AuthError(f"{ref.api_host}: refusing to send credentials over plain HTTP")
            host.auth_state.use_basic()
            return
        if scheme != "bearer":
            raise AuthError(f"{ref.api_host} answered 401 with an unsupported challenge ({scheme or 'none'})")
        request = auth.token_request(ref, scope, params, credentials)
        realm_host = self._host(request.realm_host)
        if credentials and request.realm.startswith("http://") and not realm_host.relaxed:
            raise AuthError(f"{ref.api_host}: refusing to send credentials to a plain-HTTP token service")
        attempt = 0
        while True:
            try:
                response = self._send(
                    realm_host, "GET", request.realm, params=request.query, headers=request.headers
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt < self.config.retries:
                    self._sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                raise RegistryUnavailable(
                    f"token service for {ref.api_host} unreachable ({_describe_network_error(exc)})"
                ) from None
            if response.status_code in _RETRY_STATUSES and attempt < self.config.retries:
                response.close()
                self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            break
        try:
            body = response.json() if response.status_code == 200 else None
        except ValueError:
            body = None
        finally:
            response.close()
        token, lifetime = auth.read_token(response.status_code, body, ref, credentials)
        host.auth_state.store_token(scope, token, lifetime, request.realm, request.service)


def _describe_network_error(exc: Exception) -> str:
    """A short cause without URLs' query strings (which never hold credentials, but stay terse)."""
    text = str(exc)
    for marker in (
        "timed out",
        "Connection refused",
        "Name or service not known",
        "Connection reset",
        "Read timed out",
    ):
        if marker.lower() in text.lower():
            return f"{type(exc).__name__}: {marker}"
    return type(exc).__name__


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", value or "")
    return int(match.group(1)) if match else None


def _annotations(document: Mapping[str, Any]) -> dict[str, str]:
    annotations = document.get("annotations")
    if isinstance(annotations, Mapping):
        return {str(k): str(v) for k, v in annotations.items()}
    return {}


def _read_limited(response: requests.Response, limit: int, where: str, watch: _TransferWatch) -> bytes:
    with contextlib.closing(response):
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise OCIError(f"{where}: {declared} bytes is more than the {limit} allowed")
        parts: list[bytes] = []
        size = 0
        try:
            for chunk in _watched_body(response, watch, limit + 1):
                parts.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise OCIError(f"{where}: more than {limit} bytes")
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryUnavailable(
                f"{where}: connection failed while reading ({type(exc).__name__})"
            ) from None
        except _TooSlow as exc:
            raise RegistryUnavailable(f"{where}: {exc}") from None
        return b"".join(parts)


class _PullReport:
    """Progress callbacks of a pull, from the calling thread only, at most one per ``interval``.

    ``done`` counts the bytes of the image on disk (resumed ones included); ``layer_done`` is the
    layer being waited for (bytes held) or applied (bytes read back), and equals ``layer_total``
    exactly once per layer, when it is applied.
    """

    def __init__(
        self,
        callback: ProgressCallback | None,
        layers: Sequence[Descriptor],
        fetch: blobs.BlobPull,
        interval: float,
    ) -> None:
        self._callback = callback
        self._layers = layers
        self._fetch = fetch
        self.interval = max(0.01, interval)
        self._total = sum(layer.size for layer in layers)
        self._last = 0.0
        self._read = 0

    def _emit(self, index: int, layer_done: int, *, force: bool) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        layer = self._layers[index]
        self._callback(
            PullProgress(
                layer_index=index,
                layer_count=len(self._layers),
                layer_digest=layer.digest,
                layer_done=layer_done,
                layer_total=layer.size,
                done=min(self._total, self._fetch.held),
                total=self._total,
            )
        )

    def layer(self, index: int) -> None:
        self._read = 0
        held = self._fetch.blobs[index].held
        self._emit(index, max(0, min(held, self._layers[index].size - 1)), force=True)

    def waiting(self, index: int) -> None:
        held = self._fetch.blobs[index].held
        if held < self._layers[index].size:
            self._emit(index, held, force=False)

    def applying(self, index: int, n: int) -> None:
        self._read += n
        if self._read < self._layers[index].size:
            self._emit(index, self._read, force=False)

    def layer_done(self, index: int) -> None:
        self._emit(index, self._layers[index].size, force=True)


class _ShortBody(Exception):
    """A body ended before the bytes asked for (resumed like a lost connection)."""


class _OpenBodies:
    """The blob bodies a pull's threads are reading. When the pull stops (cancelled, or failed
    elsewhere) :meth:`cut_all` shuts their connections down: a thread blocked on a registry that
    went silent mid-body then stops at once instead of after the read timeout. (A registry silent
    before it answers still holds its thread until then: there is no body to cut yet.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._responses: set[requests.Response] = set()
        self._cut = False

    def add(self, response: requests.Response) -> None:
        with self._lock:
            if not self._cut:
                self._responses.add(response)
                return
        _cut(response)

    def discard(self, response: requests.Response) -> None:
        with self._lock:
            self._responses.discard(response)

    def cut_all(self) -> None:
        with self._lock:
            self._cut = True
            for response in self._responses:
                _cut(response)


def _cut(response: requests.Response) -> None:
    """Shut down the connection ``response`` is read from (a blocked read returns at once)."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Counter:
    """Bytes received from the network by a pull's threads."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def _fill_part(
    response: requests.Response,
    part: blobs.Part,
    watch: _TransferWatch,
    downloaded: _Counter,
    should_stop: Callable[[], bool],
) -> None:
    """Append a 206 body (which starts at the part's first missing byte) to the part's file."""
    with blobs.PartWriter(part) as out:
        for chunk in _watched_body(response, watch, part.length - part.held, hold=0):
            if should_stop():
                raise blobs.Stopped()
            downloaded.add(len(chunk))
            out.write(chunk)


def _fill_in_order(
    response: requests.Response,
    parts: list[blobs.Part],
    descriptor: Descriptor,
    watch: _TransferWatch,
    downloaded: _Counter,
    should_stop: Callable[[], bool],
) -> None:
    """Spread a whole-blob body over ``parts`` (which tile the blob), skipping bytes already held."""
    declared = response.headers.get("Content-Length")
    if response.status_code == 200 and declared and declared.isdigit() and int(declared) != descriptor.size:
        raise DigestMismatch(
            f"blob {descriptor.digest}: registry serves {declared} bytes, "
            f"the manifest declares {descriptor.size}"
        )
    position, index = 0, 0
    writer: blobs.PartWriter | None = None
    try:
        for chunk in _watched_body(response, watch, hold=0):
            if should_stop():
                raise blobs.Stopped()
            downloaded.add(len(chunk))
            view = memoryview(chunk)
            while view:
                while index < len(parts) and position >= parts[index].end:
                    index += 1
                    if writer is not None:
                        writer.close()
                        writer = None
                if index == len(parts):
                    raise DigestMismatch(
                        f"blob {descriptor.digest}: registry sent more than the "
                        f"{descriptor.size} bytes the manifest declares"
                    )
                part = parts[index]
                held_to = part.start + part.held
                if position < held_to:
                    n = min(len(view), held_to - position)
                else:
                    n = min(len(view), part.end - position)
                    if writer is None:
                        writer = blobs.PartWriter(part)
                    writer.write(view[:n])
                position += n
                view = view[n:]
    finally:
        if writer is not None:
            writer.close()


class _TooSlow(Exception):
    """A body fell below the low-speed limit (a layer resumes on a fresh connection)."""


# What reading a body raises when its connection breaks, times out or crawls: a transfer resumes.
TRANSFER_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    _TooSlow,
)


@dataclass
class _TransferWatch:
    """The low-speed limit and the deadline of one blob's download, across its resumes.

    Speed is averaged over windows of ``speed_time`` seconds: a window that ends with fewer than
    ``speed_limit * speed_time`` bytes fails. The deadline runs from the first request.
    """

    where: str
    speed_limit: int
    speed_time: float
    deadline: float
    started: float = field(default_factory=time.monotonic)
    window_start: float = field(default_factory=time.monotonic)
    window_bytes: int = 0
    received: int = 0

    def restart_window(self) -> None:
        """A fresh connection gets a full window before its speed is judged."""
        self.window_start, self.window_bytes = time.monotonic(), 0

    def check_deadline(self, received: int, size: int | None = None) -> None:
        if self.deadline and time.monotonic() - self.started > self.deadline:
            of = f" of {size}" if size is not None else ""
            raise RegistryUnavailable(
                f"{self.where}: not downloaded within the per-blob deadline of {self.deadline:g} s "
                f"({received}{of} bytes received)"
            )

    def update(self, count: int) -> None:
        """Account for `count` bytes just read; raise if a limit is passed. The end of the body
        (`count` 0) passes: a blob that is complete is not failed for its last second."""
        if not count:
            return
        self.received += count
        self.check_deadline(self.received)
        self.window_bytes += count
        now = time.monotonic()
        elapsed = now - self.window_start
        if self.speed_limit and elapsed >= self.speed_time:
            if self.window_bytes < self.speed_limit * elapsed:
                raise _TooSlow(
                    f"stayed below the low-speed limit of {self.speed_limit} bytes/s over "
                    f"{self.speed_time:g} s ({self.window_bytes} bytes in {elapsed:.0f} s)"
                )
            self.window_start, self.window_bytes = now, 0


# Chunks handed on are joined up to this size, or sooner when data arrives slowly.
_YIELD_SECONDS = 0.2


def _watched_body(
    response: requests.Response, watch: _TransferWatch, limit: int | None = None, hold: float = _YIELD_SECONDS
) -> Iterator[bytes]:
    """The response body, one socket read at a time, each checked against `watch`.

    ``iter_content`` would block until a whole chunk has arrived, however slowly; a read of what
    is there (``read1``) returns within the read timeout, so the limits are checked that often.
    Reads are joined into chunks of up to ``COPY_CHUNK`` bytes for the consumer, held at most
    ``hold`` seconds (0: each read is passed on, as part files want: a kill loses nothing read).
    Network errors are urllib3's (the caller maps them). ``limit``: stop reading once that many bytes arrived.
    """
    raw = response.raw
    pieces: list[bytes] = []
    pending = 0
    total = 0
    last_yield = time.monotonic()
    while limit is None or total < limit:
        want = COPY_CHUNK - pending if limit is None else min(COPY_CHUNK - pending, limit - total)
        try:
            data = raw.read1(want, decode_content=True)
            watch.update(len(data))
        except BaseException:
            if pieces:  # what arrived before the error is kept (a resume starts after it)
                yield b"".join(pieces)
            raise
        if not data:
            break
        pieces.append(data)
        pending += len(data)
        total += len(data)
        if pending >= COPY_CHUNK or time.monotonic() - last_yield >= hold:
            yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pieces, pending, last_yield = [], 0, time.monotonic()
    if pieces:
        yield b"".join(pieces)


def _verify_bytes(body: bytes, digest: str, where: str) -> None:
    algorithm = digest.partition(":")[0]
    try:
        actual = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
    except ValueError:
        raise InvalidReference(f"unsupported digest algorithm in {digest!r}") from None
    if actual != digest:
        raise DigestMismatch(f"{where}: content hashes to {actual}")


def default_platform() -> str:
    """This machine's platform string, e.g. ``linux/amd64``."""
    return str(host_platform())
