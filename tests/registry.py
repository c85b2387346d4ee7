"""Pytest plugin: a real CNCF registry (``docker-registry``) on loopback, and fault injectors.

Load with ``pytest_plugins = ["tests.registry"]`` (tests/conftest.py) or ``-p tests.registry``.

Fixtures:

* ``registry`` (session): an anonymous registry; ``.host``, ``.url``, ``.storage_dir``,
  ``.client()``, ``.unique_repo()``, ``.push_image(files, ...)``, ``.blob_path(digest)``.
* ``auth_registry_factory`` (session): ``factory(user, password)`` -> a Basic-auth (htpasswd,
  bcrypt) registry, started once per credential pair.
* ``token_registry`` (session): a registry using bearer tokens from a :class:`TokenServer`, as
  quay.io and Docker Hub do: anonymous pull, ``.credentials`` may push.
* ``fault_proxy_factory``: ``factory(upstream)`` -> a :class:`FaultProxy` in front of a registry,
  answering chosen requests with e.g. 429 + Retry-After or cutting a body short, or every request
  beyond a rate with 429 (:class:`RateLimit`), as Docker Hub and quay.io do.
* ``silent_port`` (accepts connections, never answers) and ``closed_port`` (refuses them).

Without ``/usr/bin/docker-registry`` the registry fixtures skip, or fail when ``CI`` or
``PORTAL_REQUIRE_SERVICES`` is set (in CI nothing skips for a missing service).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import http.server
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends_app.oci import RegistryClient, RegistryConfig
from backends_app.oci.publish import FileSpec, publish_files, publish_per_platform
from tests.helpers.processes import die_with_parent, free_port

REGISTRY_BINARY = os.environ.get("PORTAL_REGISTRY_BINARY", "/usr/bin/docker-registry")
STARTUP_DEADLINE = 60.0
_repo_counter = itertools.count(1)

_CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
{auth}"""

_AUTH_TEMPLATE = """\
auth:
  htpasswd:
    realm: portal-test
    path: {htpasswd}
"""

_TOKEN_AUTH_TEMPLATE = """\
auth:
  token:
    realm: {realm}
    service: {service}
    issuer: {issuer}
    rootcertbundle: {bundle}
"""


def require_registry_binary() -> None:
    """Skip (or fail in CI) when the registry binary is not installed."""
    if os.path.exists(REGISTRY_BINARY):
        return
    reason = f"{REGISTRY_BINARY} is missing (apt-get install docker-registry)"
    if os.environ.get("CI") or os.environ.get("PORTAL_REQUIRE_SERVICES"):
        pytest.fail(reason + "; CI/PORTAL_REQUIRE_SERVICES forbids skipping", pytrace=False)
    pytest.skip(reason)


class RegistryServer:
    """One ``docker-registry serve`` process on 127.0.0.1 with its own storage directory."""

    def __init__(
        self,
        workdir: Path,
        credentials: tuple[str, str] | None = None,
        token_server: TokenServer | None = None,
    ) -> None:
        """``credentials``: Basic auth (htpasswd). ``token_server``: bearer tokens from it instead,
        ``credentials`` then being the user allowed to push."""
        self.workdir = Path(workdir)
        self.storage_dir = self.workdir / "storage"
        self.credentials = credentials
        self.token_server = token_server
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _write_config(self) -> Path:
        auth = ""
        if self.token_server is not None:
            auth = _TOKEN_AUTH_TEMPLATE.format(
                realm=self.token_server.realm,
                service=TokenServer.SERVICE,
                issuer=TokenServer.ISSUER,
                bundle=self.token_server.bundle_path,
            )
        elif self.credentials:
            import bcrypt  # only the auth registry needs it

            user, password = self.credentials
            # Cost 4: the registry checks the hash on every request; a high cost slows tests only.
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{user}:{hashed}\n")
            auth = _AUTH_TEMPLATE.format(htpasswd=htpasswd)
        config = self.workdir / "config.yml"
        config.write_text(
            _CONFIG_TEMPLATE.format(
                storage=self.storage_dir, port=self.port, secret=secrets.token_hex(16), auth=auth
            )
        )
        return config

    def start(self) -> RegistryServer:
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(3):  # another process may grab the free port before the registry binds it
            self.port = free_port()
            config = self._write_config()
            with open(self.log_path, "ab") as log:
                self._process = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            try:
                self._wait_ready()
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
        raise RuntimeError(f"docker-registry did not start: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_DEADLINE
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"exited with {self._process.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=10):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:  # an auth registry is up and asking for credentials
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)  # poll interval, bounded by the deadline above
        raise RuntimeError(f"no answer on {self.url}/v2/ within {STARTUP_DEADLINE}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)

    # -- helpers for tests --------------------------------------------------------------------

    def config(self, **overrides: Any) -> RegistryConfig:
        """A client config for this registry: few retries, its credentials if any. The timeouts
        are generous: a registry on a loaded machine may take seconds to answer."""
        values: dict[str, Any] = {
            "timeout": (10.0, 60.0),
            "retries": 1,
            "backoff": 0.05,
            "max_retry_wait": 5.0,
        }
        if self.credentials:
            values["credentials"] = {self.host: self.credentials}
        values.update(overrides)
        return RegistryConfig(**values)

    def client(self, **overrides: Any) -> RegistryClient:
        return RegistryClient(self.config(**overrides))

    def unique_repo(self, prefix: str = "test") -> str:
        return f"{prefix}/r{next(_repo_counter)}-{secrets.token_hex(3)}"

    def ref(self, repo: str, tag: str = "v1") -> str:
        return f"{self.host}/{repo}:{tag}"

    def push_image(
        self,
        files: Mapping[str, FileSpec] | Sequence[Mapping[str, FileSpec]],
        *,
        repo: str | None = None,
        tag: str = "v1",
        **kwargs: Any,
    ) -> str:
        """Publish ``files`` (one dict per layer) under a fresh repository; return the reference."""
        ref = self.ref(repo or self.unique_repo(), tag)
        with self.client() as client:
            publish_files(files, ref, client=client, **kwargs)
        return ref

    def push_platforms(
        self, images: Mapping[str, Any], *, repo: str | None = None, tag: str = "v1", **kwargs: Any
    ) -> str:
        ref = self.ref(repo or self.unique_repo(), tag)
        with self.client() as client:
            publish_per_platform(images, ref, client=client, **kwargs)
        return ref

    def blob_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes."""
        hexpart = digest.split(":", 1)[1]
        return self.storage_dir / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    require_registry_binary()
    server = RegistryServer(tmp_path_factory.mktemp("registry")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def auth_registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[str, str], RegistryServer]]:
    """``factory(user, password)``: a registry requiring those Basic credentials (one per pair)."""
    servers: dict[tuple[str, str], RegistryServer] = {}

    def factory(user: str, password: str) -> RegistryServer:
        require_registry_binary()
        key = (user, password)
        if key not in servers:
            servers[key] = RegistryServer(tmp_path_factory.mktemp("auth-registry"), credentials=key).start()
        return servers[key]

    try:
        yield factory
    finally:
        for server in servers.values():
            server.stop()


class TokenServer:
    """A bearer-token service like quay.io's or Docker Hub's, for a registry with ``auth: token``.

    ``GET /token?service=...&scope=repository:NAME:ACTIONS`` answers ``{"token", "access_token",
    "expires_in"}``: a JWT signed (RS256) by a self-signed certificate the registry trusts. Anonymous
    callers get ``pull`` (when ``anonymous_pull``); callers with a known Basic user get everything
    they ask for; a wrong password gets 401. ``requests`` counts the token requests served.
    """

    SERVICE = "portal-test-registry"
    ISSUER = "portal-test-issuer"

    def __init__(self, workdir: Path, users: Mapping[str, str], anonymous_pull: bool = True) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.requests = 0
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portal-test-token-issuer")])
        now = time.time()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(now - 3600, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.UTC))
            .sign(self._key, hashes.SHA256())
        )
        self.bundle_path = Path(workdir) / "token-root.pem"
        self.bundle_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._answer(self)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        self.requests += 1
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        user = None
        header = handler.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) != password:
                handler.send_response(401)
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                return
            user = name
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
            wanted = actions.split(",")
            granted = wanted if user else (["pull"] if self.anonymous_pull and "pull" in wanted else [])
            access.append({"type": kind, "name": name, "actions": granted})
        body = json.dumps({"token": self._jwt(user or "", access), "expires_in": 300}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _jwt(self, subject: str, access: list[dict[str, Any]]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.ISSUER,
            "sub": subject,
            "aud": self.SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64(signature)}"


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with quay.io/Docker Hub-style bearer tokens: anonymous pull, ``pusher`` may push."""
    require_registry_binary()
    pytest.importorskip("cryptography", reason="the token service signs its JWTs with cryptography")
    workdir = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(workdir, {"pusher": "push-secret-42"}).start()
    server = RegistryServer(workdir, credentials=("pusher", "push-secret-42"), token_server=tokens)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        tokens.stop()


# -- fault injection ---------------------------------------------------------------------------


@dataclass
class Fault:
    """What the proxy does to a matching request instead of (or while) forwarding it.

    ``status``: answer with it (and ``headers`` and ``body``) without forwarding. ``truncate_after``:
    forward, but cut the response body after that many bytes and drop the connection. ``trickle_after``:
    forward that many bytes of the body at once, then ``trickle_bytes`` every ``trickle_every``
    seconds (never silent long enough for a read timeout). ``hang``: never answer. ``times``: how
    many matching requests it applies to.
    """

    match: Callable[[str, str], bool]
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    truncate_after: int | None = None
    trickle_after: int | None = None
    trickle_bytes: int = 1
    trickle_every: float = 2.0
    hang: bool = False
    times: int = 1


@dataclass
class RateLimit:
    """Answer 429 to every request beyond ``per_second`` (a token bucket holding ``burst``), with
    ``Retry-After`` when given. ``per_second=0, burst=0`` refuses everything, forever."""

    per_second: float
    burst: int
    retry_after: str | None = None
    _tokens: float = -1.0
    _at: float = 0.0

    def take(self) -> bool:
        now = time.monotonic()
        if self._tokens < 0:
            self._tokens, self._at = float(self.burst), now
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.per_second)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class FaultProxy:
    """A small HTTP proxy on loopback in front of a real registry, injecting :class:`Fault` s.

    ``rate_limit`` (a :class:`RateLimit`) answers 429 beyond a rate; ``most_in_flight`` is the most
    requests it has had in hand at once.
    """

    def __init__(self, upstream: str, bind: str = "127.0.0.1") -> None:
        self.upstream = upstream  # host:port
        self.bind = bind
        self.faults: list[Fault] = []
        self.log: list[tuple[float, str, str, int]] = []  # (time, method, path, status)
        self.rate_limit: RateLimit | None = None
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer((bind, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def host(self) -> str:
        return f"{self.bind}:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.match(method, path):
                    fault.times -= 1
                    return fault
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.log.append((time.monotonic(), method, path, status))

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self._serve_one(handler)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _serve_one(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        fault = self._take_fault(method, path)
        with self._lock:
            limited = self.rate_limit is not None and not self.rate_limit.take()
        if fault is None and limited:
            assert self.rate_limit is not None
            retry_after = self.rate_limit.retry_after
            fault = Fault(
                match=lambda method, path: True,
                status=429,
                headers={"Retry-After": retry_after} if retry_after is not None else {},
                body=b'{"errors":[{"code":"TOOMANYREQUESTS","message":"rate limit exceeded"}]}',
            )
        if fault is not None and fault.hang:
            self._record(method, path, 0)
            self._stop.wait(60)
            handler.close_connection = True
            return
        if fault is not None and fault.status is not None:
            self._record(method, path, fault.status)
            handler.send_response(fault.status)
            for name, value in fault.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(fault.body)))
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(fault.body)
            return
        connection = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {
                k: v for k, v in handler.headers.items() if k.lower() not in ("connection", "keep-alive")
            }
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            self._record(method, path, response.status)
            handler.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "keep-alive"):
                    handler.send_header(name, value)
            data = response.read()
            if response.getheader("Content-Length") is None:
                handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if method == "HEAD":
                return
            if fault is not None and fault.trickle_after is not None:
                self._trickle(handler, data, fault)
                return
            if fault is not None and fault.truncate_after is not None:
                handler.wfile.write(data[: fault.truncate_after])
                handler.wfile.flush()
                handler.close_connection = True
                with contextlib.suppress(OSError):
                    handler.connection.shutdown(socket.SHUT_RDWR)
                return
            handler.wfile.write(data)
        finally:
            connection.close()

    def _trickle(self, handler: http.server.BaseHTTPRequestHandler, data: bytes, fault: Fault) -> None:
        """Send ``data`` slowly, until it is all sent, the client hangs up or the proxy stops."""
        handler.close_connection = True
        sent = fault.trickle_after or 0
        try:
            handler.wfile.write(data[:sent])
            handler.wfile.flush()
            while sent < len(data) and not self._stop.wait(fault.trickle_every):
                handler.wfile.write(data[sent : sent + fault.trickle_bytes])
                handler.wfile.flush()
                sent += fault.trickle_bytes
        except OSError:
            return  # the client gave up on us: what the tests want to see


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[..., FaultProxy]]:
    """``factory(upstream, bind="127.0.0.1")`` -> a started :class:`FaultProxy`, stopped after the test."""
    proxies: list[FaultProxy] = []

    def factory(upstream: str, bind: str = "127.0.0.1") -> FaultProxy:
        proxy = FaultProxy(upstream, bind).start()
        proxies.append(proxy)
        return proxy

    yield factory
    for proxy in proxies:
        proxy.stop()


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("198.51.100.1", 9))  # TEST-NET-2: only picks the route, sends nothing
            address = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose connections are accepted (by the kernel) and never answered."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


def tool_or_skip(name: str) -> str:
    """Path of a command-line tool; skip (or fail in CI) without it."""
    path = shutil.which(name)
    if path:
        return path
    reason = f"{name} is not installed"
    if os.environ.get("CI") or os.environ.get("PORTAL_REQUIRE_SERVICES"):
        pytest.fail(reason + "; CI/PORTAL_REQUIRE_SERVICES forbids skipping", pytrace=False)
    pytest.skip(reason)
