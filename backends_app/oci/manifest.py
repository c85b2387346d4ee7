"""Manifest media types, descriptors, platforms and the choice of a platform in an index."""

from __future__ import annotations

import json
import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import OCIError, PlatformNotFound
from .reference import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# Debian's docker-registry answers 404 to a manifest request unless Accept lists all four.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
VERSION_ANNOTATION = "org.opencontainers.image.version"

# Manifests are small; anything bigger is refused rather than held in memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armv8": "arm64",
    "armv7l": "arm",
    "armv7": "arm",
    "armv6l": "arm",
    "armhf": "arm",
    "i386": "386",
    "i686": "386",
}
# The variant an architecture has when none is written (arm64 images rarely say "v8").
_DEFAULT_VARIANTS = {"arm64": "v8"}


@dataclass(frozen=True)
class Platform:
    """``os/architecture[/variant]``, normalised (``x86_64`` -> ``amd64``, ``aarch64`` -> ``arm64``)."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str | Platform) -> Platform:
        if isinstance(text, Platform):
            return text
        parts = [p.strip().lower() for p in str(text).split("/")]
        if len(parts) not in (2, 3) or not all(parts):
            raise OCIError(f"invalid platform {text!r}: expected 'os/arch' or 'os/arch/variant'")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 else None
        if parts[1] in ("armv7l", "armv7", "armhf") and variant is None:
            variant = "v7"
        elif parts[1] == "armv6l" and variant is None:
            variant = "v6"
        return cls(parts[0], arch, variant)

    @classmethod
    def from_descriptor(cls, data: Mapping[str, Any]) -> Platform:
        return cls(
            str(data.get("os", "")).lower(),
            _ARCH_ALIASES.get(str(data.get("architecture", "")).lower(), str(data.get("architecture", ""))),
            (str(data["variant"]).lower() if data.get("variant") else None),
        )

    def as_descriptor(self) -> dict[str, str]:
        data = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            data["variant"] = self.variant
        return data

    def matches(self, candidate: Platform) -> bool:
        """True when ``candidate`` (from an index) runs here. A variant we do not ask for is tolerated."""
        if (self.os, self.architecture) != (candidate.os, candidate.architecture):
            return False
        if self.variant is None:
            return True
        default = _DEFAULT_VARIANTS.get(self.architecture)
        return (candidate.variant or default) == self.variant or (
            candidate.variant is None and default is None
        )


def host_platform() -> Platform:
    """The platform of this machine, e.g. ``linux/amd64``."""
    system = _platform.system().lower() or "linux"
    return Platform.parse(f"{system}/{_platform.machine() or 'amd64'}")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob (layer or config)."""

    digest: str
    size: int
    media_type: str
    annotations: Mapping[str, str] | None = None

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        if not isinstance(data, Mapping):
            raise OCIError(f"{where}: descriptor is not an object")
        try:
            digest = validate_digest(str(data["digest"]))
            size = int(data["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise OCIError(f"{where}: malformed descriptor ({exc})") from None
        if size < 0:
            raise OCIError(f"{where}: negative size in descriptor {digest}")
        annotations = data.get("annotations")
        return cls(
            digest,
            size,
            str(data.get("mediaType", "")),
            dict(annotations) if isinstance(annotations, Mapping) else None,
        )


def load_json(body: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise OCIError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OCIError(f"{where}: expected a JSON object")
    return data


def media_type_of(data: Mapping[str, Any], header_type: str | None) -> str:
    """The manifest's media type: its own ``mediaType`` field, else the Content-Type, else by shape."""
    media_type = data.get("mediaType") or (header_type or "").split(";")[0].strip()
    if media_type in INDEX_TYPES | IMAGE_MANIFEST_TYPES:
        return str(media_type)
    if data.get("schemaVersion") == 1:
        raise OCIError("Docker schema 1 manifests are not supported")
    # OCI allows omitting mediaType; tell an index from a manifest by its fields.
    if "manifests" in data:
        return OCI_INDEX
    if "layers" in data:
        return OCI_MANIFEST
    raise OCIError(f"unsupported manifest media type {media_type!r}")


def select_platform(index: Mapping[str, Any], wanted: Platform, where: str) -> tuple[Descriptor, Platform]:
    """Pick the manifest for ``wanted`` from an index; prefer an exact variant over a tolerated one."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise OCIError(f"{where}: index has no 'manifests' list")
    candidates: list[tuple[Descriptor, Platform]] = []
    available: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("platform"), Mapping):
            continue
        found = Platform.from_descriptor(entry["platform"])
        # buildx attestation manifests say unknown/unknown; they are not images.
        if found.os == "unknown":
            continue
        available.append(str(found))
        if wanted.matches(found):
            candidates.append((Descriptor.from_json(entry, f"{where} manifests[{i}]"), found))
    if not candidates:
        raise PlatformNotFound(
            f"{where}: no manifest for platform {wanted} (index offers: {', '.join(available) or 'none'})"
        )
    for descriptor, found in candidates:
        if found.variant == wanted.variant:
            return descriptor, found
    return candidates[0]
