"""The OCI engine: everything that touches a container registry. Pure Python, no ORM.

Public API (see docs/oci.md)::

    ref = parse_reference("quay.io/org/repo:tag")          # Reference
    client = RegistryClient(RegistryConfig(...))
    client.head_digest(ref)                                 # cheap periodic check: one HEAD
    resolved = client.resolve(ref, platform="linux/amd64")  # Resolved
    result = client.pull(resolved, dest, progress=callback) # PullResult
    client.pull_first([primary, *mirrors], dest)            # result.source says which one served
    publish(directory, ref, version="1.2.3", platforms=["linux/amd64", "linux/arm64"])

Every failure is an :class:`OCIError` (subclasses below).
"""

from __future__ import annotations

from .blobs import BlobStore
from .client import PullResult, RegistryClient, RegistryConfig, Resolved, default_platform, is_loopback_host
from .errors import (
    AllSourcesFailed,
    AuthError,
    DigestMismatch,
    InvalidReference,
    NotFound,
    OCIError,
    PlatformNotFound,
    RegistryUnavailable,
    UnsafeArchive,
)
from .host_limit import RateLimitStats
from .manifest import Descriptor, Platform
from .publish import Directory, Symlink, publish, publish_files, publish_per_platform
from .reference import Reference, parse_reference
from .unpack import PullProgress, UnpackStats, unpack_layers

__all__ = [
    "AllSourcesFailed",
    "AuthError",
    "BlobStore",
    "Descriptor",
    "DigestMismatch",
    "Directory",
    "InvalidReference",
    "NotFound",
    "OCIError",
    "Platform",
    "PlatformNotFound",
    "PullProgress",
    "PullResult",
    "RateLimitStats",
    "Reference",
    "RegistryClient",
    "RegistryConfig",
    "RegistryUnavailable",
    "Resolved",
    "Symlink",
    "UnpackStats",
    "UnsafeArchive",
    "default_platform",
    "is_loopback_host",
    "parse_reference",
    "publish",
    "publish_files",
    "publish_per_platform",
    "unpack_layers",
]
