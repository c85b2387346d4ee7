"""Blob uploads with oras-py, carried by the client's connections, auth, retries and errors.

oras-py's ``Registry.upload_blob`` runs the upload protocol for blobs up to :data:`CHUNK_SIZE` (the
image config, and every layer that small): a ``HEAD`` to skip a blob the repository already has,
then ``POST`` and one ``PUT ?digest=`` carrying the whole blob. A larger layer goes up in one
``PUT`` streamed from its file by the client (:meth:`OrasUploader.stream`): oras reads a one-``PUT``
blob into memory whole, and its chunked path (one ``PATCH`` per chunk, each waiting for the answer
before the next chunk is read) measured 11% slower than a streamed ``PUT`` on loopback and through a
40 ms link (docs/benchmarks.md), for the same protocol.

oras-py 0.2 as it comes is not safe to point at a registry (no timeouts, minutes of retries, a
login that writes credentials to disk; listed below), so
:class:`OrasUploader` keeps its protocol and replaces its one door to the network, ``do_request``,
with :meth:`RegistryClient._request`:

* **Timeouts.** oras sets none: a registry that accepts a connection and never answers hangs it
  for ever. Every exchange here has the client's (connect, read) timeout.
* **Retries.** oras retries any exception five times, sleeping 3, 5, 11, 29 and 83 s, and turns a
  500 into a retried ``ValueError``. Here: the client's ``retries`` with exponential backoff on
  connection errors, timeouts and 5xx, ``Retry-After`` on 429/503, then ``RegistryUnavailable``.
* **Auth.** oras's backends answer every 401 afresh (its ``basic`` backend never sends credentials
  first, so each body goes up twice), and its ``login()`` accepts a wrong password and writes
  ``~/.docker/config.json``. Here the client's configured :class:`~.auth.Credentials` and per-host
  auth state serve oras's requests too: one challenge per host, tokens cached per scope and shared
  with the manifest pushes. oras's ``login()``, ``push()``, ``pull()`` and ``load_configs()`` are
  never called, so it reads no docker config and writes no file; any ``Authorization`` header it
  would add is dropped.
* **Errors.** oras raises ``ValueError`` quoting request URLs; here every failure is an
  :class:`~.errors.OCIError` naming the registry, repository, digest and HTTP status, never a header.
* oras's own ``requests`` session is fenced with an adapter that refuses to send: should a later
  oras reach the network some other way, publishing fails at once instead of going out untimed.

What stays with ``publish.py``: manifests and indexes. oras 0.2's ``upload_manifest`` re-serialises
the JSON (the digest an index names would not be the digest of the bytes stored), always sends the
OCI manifest ``Content-Type`` (a Docker v2 manifest or an index would be mislabelled) and validates
against a manifest-only schema (an index is refused).

oras is imported here only, and ``publish.py`` imports this module when it pushes, so processes that
never publish do not load oras and jsonschema (40-130 ms here).
"""

from __future__ import annotations

import json as jsonlib
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import oras.container
import oras.provider
import oras.version
import requests

from .client import RegistryClient, _registry_error
from .errors import NotFound, OCIError, RegistryUnavailable
from .reference import Reference

CHUNK_SIZE = 16 * 1024 * 1024
"""Blobs up to this size go up through oras-py (read into memory whole, one ``PUT``); larger ones
are streamed from their file in one ``PUT`` by the client, so memory stays bounded whatever the
layer's size."""

# Every answer goes back to oras, which knows what success is at each step (200 for a HEAD, 202 for
# POST and PATCH, 201 for the closing PUT), except what the client settles itself: 401/403 (auth,
# then AuthError) and 429/5xx (retried, then RegistryUnavailable), which it checks first.
_ANSWERS = frozenset(range(100, 600)) - {401, 403}
_STORED = (201, 204)


class _NoNetwork(requests.adapters.BaseAdapter):
    """Mounted on oras's own session: every request must go through :meth:`OrasUploader.do_request`."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        raise OCIError(f"oras-py tried to send {request.method} outside the registry client")

    def close(self) -> None:
        pass


def _container(ref: Reference) -> Any:
    """oras's view of ``ref``'s repository, built from our parse (oras's own regex is looser)."""
    try:
        container = oras.container.Container(f"{ref.api_host}/{ref.repository}", registry=ref.api_host)
    except ValueError:
        raise OCIError(f"{ref.name}: oras-py cannot address this repository") from None
    namespace, _, name = ref.repository.rpartition("/")
    container.registry, container.namespace, container.repository = ref.api_host, namespace or None, name
    return container


def _what(method: str, path: str) -> str:
    """What an exchange of the upload protocol is, for messages."""
    route = urllib.parse.urlsplit(path).path
    if "/blobs/uploads/" in route:
        return {"POST": "upload", "PATCH": "blob chunk upload", "PUT": "blob upload"}.get(method, "upload")
    if "/blobs/" in route:
        return "blob"
    return f"{method} request"


class OrasUploader(oras.provider.Registry):
    """oras-py's upload protocol for one repository, over ``client``'s transport (module docstring)."""

    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        # "token" builds oras's TokenAuth, which reads nothing at start (its "basic" backend reads
        # ORAS_USER/ORAS_PASS from the environment). It is never consulted: do_request is ours.
        super().__init__(hostname=ref.api_host, insecure=False, tls_verify=True, auth_backend="token")
        self.session.close()
        self.session.trust_env = False
        for prefix in ("https://", "http://"):
            self.session.mount(prefix, _NoNetwork())
        self._client = client
        self._ref = ref
        self._target = f"{ref.api_host}/{ref.repository}"
        self._oras_container = _container(ref)
        # Says which requests oras made, for registry logs (and the tests' recording proxy).
        self._user_agent = f"{client.config.user_agent} oras-py/{oras.version.__version__}"
        self._last_what = ""
        self._found = False  # the HEAD found the blob: oras uploaded nothing
        self._failure: tuple[str, int, str] | None = None  # (what, status, registry's text)

    # -- what publish.py calls ------------------------------------------------------------------

    def upload(self, digest: str, size: int, path: str | Path) -> None:
        """Upload the blob in ``path`` unless the repository has it; OCIError on any failure."""
        if size > CHUNK_SIZE:
            self.stream(digest, path)
            return
        self._failure, self._found = None, False
        layer = {"digest": digest, "size": size, "mediaType": "application/octet-stream"}
        try:
            response = self.upload_blob(str(path), self._oras_container, layer, do_chunked=False)
            self._check_stored(response, digest)
        except (RegistryUnavailable, NotFound):
            # A closing PUT retried after its first answer was lost finds the upload already
            # completed (404, or the 5xx that ended the retries): fine if the blob is there now.
            if self._last_what == "blob upload" and self._has_blob(digest):
                return
            raise
        except OCIError:
            raise
        except Exception as exc:
            # What oras raises on an answer it did not expect (ValueError, often quoting a URL),
            # or a local file error: ours instead, with the status the registry gave.
            raise self._failed(exc, digest) from None

    def stream(self, digest: str, path: str | Path) -> None:
        """Upload a large blob unless the repository has it: ``HEAD``, ``POST``, then one ``PUT ?digest=``
        whose body is read from ``path`` as it is sent (a retry opens the file again)."""
        if self._has_blob(digest):
            return
        response = self._client._request(
            "POST", self._ref, "blobs/uploads/", what="upload", actions="pull,push", ok=(202,)
        )
        response.close()
        location = response.headers.get("Location")
        if not location:
            raise OCIError(f"{self._target}: registry gave no upload location")
        parts = urllib.parse.urlsplit(location)
        query = [*urllib.parse.parse_qsl(parts.query, keep_blank_values=True), ("digest", digest)]
        location = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
        opened: list[IO[bytes]] = []

        def body() -> IO[bytes]:
            opened.append(Path(path).open("rb"))  # noqa: SIM115  (closed below, after the request)
            return opened[-1]

        try:
            self._client._request(
                "PUT",
                self._ref,
                self._path(location),
                what="blob upload",
                actions="pull,push",
                headers={"Content-Type": "application/octet-stream"},
                body=body,
                ok=_STORED,
            ).close()
        except (RegistryUnavailable, NotFound):
            # A retried PUT finds its upload already completed (the first answer was lost).
            if self._has_blob(digest):
                return
            raise
        finally:
            for handle in opened:
                handle.close()

    def upload_bytes(self, digest: str, data: bytes) -> None:
        """Upload an in-memory blob (oras reads blobs from files: staged in a temporary one)."""
        with tempfile.TemporaryDirectory(prefix="oci-blob-") as scratch:
            path = Path(scratch) / "blob"
            path.write_bytes(data)
            self.upload(digest, len(data), path)

    # -- oras's door to the network, re-routed ----------------------------------------------------

    def do_request(
        self,
        url: str,
        method: str = "GET",
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """One exchange oras asks for, sent by the client: its auth, timeouts, retries and errors.

        Every answer but the ones the client settles (see ``_ANSWERS``) goes back to oras.
        """
        sent = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        if json is not None:
            data = jsonlib.dumps(json).encode()
            sent.setdefault("Content-Type", "application/json")
        if data is not None and not isinstance(data, bytes | bytearray):
            raise OCIError(f"{self._target}: oras-py gave a request body of type {type(data).__name__}")
        sent["User-Agent"] = self._user_agent
        path = self._path(url)
        what = self._last_what = _what(method, path)
        body = data
        response = self._client._request(
            method,
            self._ref,
            path,
            what=what,
            actions="pull,push",
            headers=sent,
            stream=stream,
            body=None if body is None else (lambda: body),
            ok=_ANSWERS,
        )
        if method == "HEAD":
            self._found = response.status_code == 200
        elif response.status_code >= 300:
            self._failure = (what, response.status_code, _registry_error(response))
        return response

    # -- helpers --------------------------------------------------------------------------------

    def _path(self, url: str) -> str:
        """The registry's own URLs as paths, so the client picks the scheme (HTTPS, or HTTP for
        loopback and insecure hosts) and sends credentials; another host's URL stays whole, and the
        client sends it no credentials."""
        parts = urllib.parse.urlsplit(url)
        if parts.netloc.lower() != self._ref.api_host.lower():
            return url
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def _check_stored(self, response: requests.Response, digest: str) -> None:
        status = response.status_code
        if status in _STORED or (status == 200 and self._found):
            return
        if response.request is None:
            # oras's stand-in answer: it passes a refused upload of the empty blob off as a 200.
            raise self._failed(None, digest)
        detail = _registry_error(response)
        suffix = f" ({detail})" if detail else ""
        if status == 404:
            raise NotFound(f"blob upload not found: {self._target} {digest}{suffix}")
        raise OCIError(f"PUT {self._target} blob upload of {digest}: HTTP {status}{suffix}")

    def _failed(self, exc: Exception | None, digest: str) -> OCIError:
        if self._failure is None:
            cause = f" ({type(exc).__name__})" if exc is not None else ""
            return OCIError(f"{self._target}: uploading {digest} failed{cause}")
        what, status, detail = self._failure
        suffix = f" ({detail})" if detail else ""
        kind = NotFound if status == 404 else OCIError
        return kind(f"{self._target}: {what} of {digest} failed: HTTP {status}{suffix}")

    def _has_blob(self, digest: str) -> bool:
        try:
            self._client._request(
                "HEAD", self._ref, f"blobs/{digest}", what="blob", actions="pull,push"
            ).close()
        except OCIError:
            return False
        return True
