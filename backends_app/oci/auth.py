"""Registry authentication: where credentials come from, the 401 challenges, and the tokens they earn.

Three schemes, as registries use them: anonymous bearer tokens (``WWW-Authenticate: Bearer
realm=...,service=...,scope=...``, the quay.io / Docker Hub flow), bearer tokens obtained with Basic
credentials, and plain Basic auth. Credentials come from ``RegistryConfig.credentials``
(``{host: (user, password)}``) or the ``auths`` of a docker ``config.json`` (credential helpers are
not supported). Credentials never appear in log lines or exception messages, and are never sent
over plain HTTP to a host that is not loopback or marked insecure.

This module holds the state and the rules; the client (``client.py``) carries the HTTP exchanges.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuthError, OCIError
from .reference import DOCKER_HUB, Reference

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
# A token is renewed this many seconds before it expires, so a request does not race the expiry.
_TOKEN_EARLY_RENEWAL = 10.0
_TOKEN_MIN_LIFETIME = 5.0


def normalise_auth_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``https://quay.io`` -> ``quay.io``."""
    if "://" in key:
        key = urllib.parse.urlsplit(key).netloc or key
    key = key.split("/", 1)[0].lower()
    if key in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"):
        return DOCKER_HUB
    return key


def load_auth_file(path: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """The credentials of a docker ``config.json`` (its ``auths``), keyed by normalised host."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise OCIError(f"registry auth file {os.fspath(path)} does not exist") from None
    except (OSError, ValueError) as exc:
        raise OCIError(f"registry auth file {os.fspath(path)} is unreadable ({type(exc).__name__})") from None
    found: dict[str, tuple[str, str]] = {}
    auths = data.get("auths") if isinstance(data, dict) else None
    for key, entry in (auths or {}).items():
        if not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                # Say which entry, never its content.
                raise OCIError(f"registry auth file: entry {key!r} has a malformed 'auth' field") from None
            if sep:
                found[normalise_auth_key(key)] = (user, password)
        elif entry.get("username") and entry.get("password"):
            found[normalise_auth_key(key)] = (str(entry["username"]), str(entry["password"]))
    return found


class Credentials:
    """The configured credentials, looked up by a reference's registry."""

    def __init__(
        self, explicit: Mapping[str, tuple[str, str]], auth_file: str | os.PathLike[str] | None = None
    ) -> None:
        self._by_host = {normalise_auth_key(key): value for key, value in explicit.items()}
        if auth_file is not None:
            for key, value in load_auth_file(auth_file).items():
                self._by_host.setdefault(key, value)

    def for_reference(self, ref: Reference) -> tuple[str, str] | None:
        return self._by_host.get(ref.registry.lower()) or self._by_host.get(ref.api_host.lower())


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A ``WWW-Authenticate`` header as (lower-case scheme, {parameter: value})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def basic(credentials: tuple[str, str]) -> str:
    """The ``Authorization`` value for Basic auth."""
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class HostAuth:
    """What one registry host told us about auth: its scheme, and the bearer tokens earned per scope."""

    scheme: str | None = None  # "basic" or "bearer" once a 401 told us
    bearer: dict[str, str] = field(default_factory=dict)  # realm, service from the challenge
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # scope -> (token, expiry)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def header(self, scope: str, credentials: tuple[str, str] | None) -> dict[str, str]:
        """The ``Authorization`` header for a request in ``scope``, or none yet."""
        with self.lock:
            scheme = self.scheme
            token = self.tokens.get(scope)
        if scheme == "basic" and credentials:
            return {"Authorization": basic(credentials)}
        if scheme == "bearer" and token and token[1] > time.monotonic():
            return {"Authorization": f"Bearer {token[0]}"}
        return {}

    def use_basic(self) -> None:
        with self.lock:
            self.scheme = "basic"

    def store_token(self, scope: str, token: str, lifetime: float, realm: str, service: str) -> None:
        with self.lock:
            self.scheme = "bearer"
            self.bearer = {"realm": realm, "service": service}
            expiry = time.monotonic() + max(lifetime - _TOKEN_EARLY_RENEWAL, _TOKEN_MIN_LIFETIME)
            self.tokens[scope] = (token, expiry)


@dataclass(frozen=True)
class TokenRequest:
    """The GET that earns a bearer token: the realm, its query and (with credentials) Basic auth."""

    realm: str
    query: dict[str, str]
    headers: dict[str, str]
    service: str

    @property
    def realm_host(self) -> str:
        return urllib.parse.urlsplit(self.realm).netloc


def token_request(
    ref: Reference, scope: str, params: Mapping[str, str], credentials: tuple[str, str] | None
) -> TokenRequest:
    """What to ask the token service a bearer challenge (``params``) names."""
    if "realm" not in params:
        raise AuthError(f"{ref.api_host} answered 401 with a bearer challenge that names no realm")
    query = {"scope": params.get("scope") or scope}
    if params.get("service"):
        query["service"] = params["service"]
    headers = {"Authorization": basic(credentials)} if credentials else {}
    return TokenRequest(params["realm"], query, headers, params.get("service", ""))


def read_token(
    status: int, body: Any, ref: Reference, credentials: tuple[str, str] | None
) -> tuple[str, float]:
    """The token and its lifetime in seconds from the token service's answer; AuthError otherwise."""
    if status in (401, 403):
        if credentials:
            raise AuthError(
                f"{ref.api_host} rejected the configured credentials (token service HTTP {status})"
            )
        raise AuthError(f"{ref.api_host} token service denied anonymous access to {ref.repository}")
    if status != 200:
        raise AuthError(f"{ref.api_host} token service answered HTTP {status}")
    try:
        token = body.get("token") or body.get("access_token")
        lifetime = float(body.get("expires_in") or 60)
    except (ValueError, AttributeError, TypeError):
        token, lifetime = None, 0.0
    if not token:
        raise AuthError(f"{ref.api_host} token service returned no token")
    return str(token), lifetime
