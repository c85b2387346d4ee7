"""Image references as LocalAI galleries write them.

Accepted forms (the grammar of github.com/distribution/reference, plus LocalAI's ``oci://`` prefix)::

    quay.io/org/repo:tag            docker.io/org/repo:tag       org/repo:tag  (Docker Hub)
    localhost:5000/repo:tag         127.0.0.1:5000/repo@sha256:<64 hex>
    repo:tag  -> docker.io/library/repo:tag                      oci://quay.io/org/repo:tag

A reference without tag nor digest means ``:latest`` (as Docker does). Docker Hub is kept under its
canonical name ``docker.io`` (so ``ubuntu`` and ``docker.io/library/ubuntu`` compare equal); the host
actually spoken to is :attr:`Reference.api_host` (``registry-1.docker.io``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# Names people use for Docker Hub; all of them mean DOCKER_HUB.
_DOCKER_HUB_ALIASES = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
_PREFIXES = ("oci://", "docker://")

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}")
# Lengths of the hex part for the algorithms we can verify; other algorithms are refused.
DIGEST_HEX_LENGTHS = {"sha256": 64, "sha512": 128}


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>`` (or sha512), else raise InvalidReference."""
    if not _DIGEST_RE.fullmatch(digest):
        raise InvalidReference(f"invalid digest {digest!r}: expected 'sha256:<64 hex digits>'")
    algorithm, _, hexpart = digest.partition(":")
    expected = DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is None:
        raise InvalidReference(f"unsupported digest algorithm {algorithm!r} in {digest!r}")
    if len(hexpart) != expected or hexpart != hexpart.lower():
        raise InvalidReference(
            f"invalid digest {digest!r}: expected {algorithm}:<{expected} lowercase hex digits>"
        )
    return digest


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. ``str()`` gives the canonical form, which parses back to an equal value."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The ``host[:port]`` to send HTTP requests to (Docker Hub's API lives on another host)."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one (it wins over the tag)."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        """The same image pinned to ``digest``; the tag is kept for display (``repo:tag@sha256:...``)."""
        return dataclasses.replace(self, digest=validate_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        """The same repository at ``tag``, without a digest."""
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return dataclasses.replace(self, tag=tag, digest=None)


def parse_reference(text: str | Reference) -> Reference:
    """Parse an image reference (see the module docstring); raise InvalidReference with the reason."""
    if isinstance(text, Reference):
        return text
    if not isinstance(text, str):
        raise InvalidReference(f"image reference must be a string, not {type(text).__name__}")
    original = text
    text = text.strip()
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    if not text:
        raise InvalidReference(f"empty image reference {original!r}")
    if "://" in text:
        raise InvalidReference(f"invalid image reference {original!r}: unsupported URL scheme")

    digest: str | None = None
    userinfo, at, rest = text.partition("@")
    if at and "/" not in userinfo and "/" in rest:
        # "user:password@host/repo": never echo it back, it may hold a password.
        raise InvalidReference("image references cannot carry credentials; configure them per registry host")
    if "@" in text:
        text, _, digest = text.partition("@")
        validate_digest(digest)

    # The tag is after the last ':' of the last path component (a ':' before a '/' is a port).
    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(f"invalid image reference {original!r}: bad tag {tag!r}")

    # Docker's rule: the first component is a registry host when it has a '.' or a ':', is
    # 'localhost', or has upper-case letters (repository paths are lower-case only).
    first, sep, rest = text.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first != first.lower()):
        registry, path = first, rest
        if not _HOST_RE.fullmatch(registry):
            raise InvalidReference(f"invalid image reference {original!r}: bad registry host {registry!r}")
        if registry.lower() in _DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
    else:
        registry, path = DOCKER_HUB, text
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or not _PATH_RE.fullmatch(path):
        raise InvalidReference(
            f"invalid image reference {original!r}: repository {path!r} must be lower-case "
            "letters, digits and separators (. _ __ -) in '/'-separated components"
        )
    if len(registry) + 1 + len(path) > 255:
        raise InvalidReference(f"invalid image reference {original!r}: name longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
