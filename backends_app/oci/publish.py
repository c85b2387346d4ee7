"""Publishing a backend directory as a real OCI image (what ``manage.py backends publish`` runs).

An image is: one layer (a gzip tar of the directory, modes kept, owners zeroed), an OCI image
config (platform, ``rootfs.diff_ids``, the version in ``config.Labels``) and a manifest carrying the
version in the ``org.opencontainers.image.version`` annotation. With several platforms, one manifest
per platform is pushed by digest and an OCI index under the tag. Blobs (layers and configs) go up
through oras-py's upload protocol on the client's own transport (``upload.py``: ``HEAD`` to skip
existing ones, then ``POST`` + ``PUT ?digest=``, or ``POST``, ``PATCH`` per 16 MiB chunk and ``PUT``
for large blobs); manifests and indexes are pushed here with our exact bytes (why not oras: see
``upload.py``).

Layers are reproducible: entries sorted, owners zeroed, gzip header without a timestamp, so the same
tree publishes to the same digest. The compressed layer is staged in a temporary file (the registry
needs its digest before the final ``PUT``).

Also here, for tests and benchmarks: :func:`publish_files` and :func:`publish_per_platform` build
images from ``{path: content}`` dicts, and the ``layer_from_*`` helpers build single layers (gzip,
zstd or plain tar) that :func:`push_image` assembles into OCI or Docker v2 images.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from .client import RegistryClient, RegistryConfig
from .errors import OCIError
from .manifest import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    VERSION_ANNOTATION,
    Platform,
    host_platform,
)
from .reference import Reference, parse_reference

# A fixed timestamp for entries built from dicts, so test images are reproducible.
FIXED_MTIME = 1_700_000_000
_COMPRESSIONS = ("gzip", "zstd", "none")


@dataclass(frozen=True)
class Symlink:
    """A symlink entry in a ``{path: content}`` dict."""

    target: str


@dataclass(frozen=True)
class Directory:
    """An (empty) directory entry in a ``{path: content}`` dict."""

    mode: int = 0o755


# bytes/str: a 0644 file; (content, mode): a file with that mode (0o755 for executables).
FileSpec = bytes | str | tuple[bytes | str, int] | Symlink | Directory


@dataclass(frozen=True)
class LayerBlob:
    """A built layer: its compressed bytes (in memory or in a file) and their digests."""

    digest: str
    size: int
    diff_id: str
    media_type: str
    data: bytes | None = None
    path: Path | None = None

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        assert self.path is not None
        return open(self.path, "rb")


class _HashingWriter(io.RawIOBase):
    """Passes writes through to ``target`` while hashing and counting them."""

    def __init__(self, target: IO[bytes] | None) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += len(view)
        if self.target is not None:
            self.target.write(view)
        return len(view)

    @property
    def digest(self) -> str:
        return f"sha256:{self.hash.hexdigest()}"


def _media_type(compression: str, docker: bool = False) -> str:
    if compression not in _COMPRESSIONS:
        raise OCIError(f"unknown compression {compression!r} (use one of {', '.join(_COMPRESSIONS)})")
    if docker:
        if compression != "gzip":
            raise OCIError("Docker v2 images only carry gzip layers")
        return DOCKER_LAYER_GZIP
    return {"gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD, "none": OCI_LAYER_TAR}[compression]


class _LayerWriter:
    """tar -> (hash diff_id) -> compressor -> (hash digest) -> output, in one stream."""

    def __init__(self, out: IO[bytes], compression: str, level: int) -> None:
        self.compression = compression
        self.blob = _HashingWriter(out)
        self._compressor: Any
        if compression == "gzip":
            self._compressor = gzip.GzipFile(fileobj=self.blob, mode="wb", compresslevel=level, mtime=0)
        elif compression == "zstd":
            self._compressor = zstandard.ZstdCompressor(level=3).stream_writer(
                cast("IO[bytes]", self.blob), closefd=False
            )
        else:
            self._compressor = self.blob
        self.plain = _HashingWriter(self._compressor)
        # Closed by close(), not a context manager: the writer outlives this constructor.
        self.tar = tarfile.open(  # noqa: SIM115
            fileobj=self.plain,
            mode="w|",
            format=tarfile.PAX_FORMAT,
        )

    def add(self, info: tarfile.TarInfo, content: IO[bytes] | None = None) -> None:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, content)

    def close(self, docker: bool = False) -> tuple[str, int, str, str]:
        self.tar.close()
        if self._compressor is not self.blob:
            self._compressor.close() if self.compression == "gzip" else self._compressor.flush(
                zstandard.FLUSH_FRAME
            )
        return self.blob.digest, self.blob.size, self.plain.digest, _media_type(self.compression, docker)


def write_layer(
    entries: Iterable[tuple[tarfile.TarInfo, IO[bytes] | bytes | None]],
    out: IO[bytes],
    *,
    compression: str = "gzip",
    level: int = 6,
    docker: bool = False,
) -> tuple[str, int, str, str]:
    """Write a layer from ``(TarInfo, content)`` pairs to ``out``; return (digest, size, diff_id, type).

    Owners are zeroed; everything else in each TarInfo is written as given.
    """
    writer = _LayerWriter(out, compression, level)
    for info, content in entries:
        writer.add(info, io.BytesIO(content) if isinstance(content, bytes) else content)
    return writer.close(docker)


def layer_from_directory(
    directory: str | os.PathLike[str],
    out: IO[bytes],
    *,
    compression: str = "gzip",
    level: int = 6,
) -> tuple[str, int, str, str]:
    """Write a layer of ``directory``'s tree to ``out``; return (digest, size, diff_id, media type).

    Paths are relative to ``directory`` (no leading ``./``), sorted; modes, mtimes, symlinks and
    hard links are kept, owners zeroed; sockets are skipped.
    """
    root = Path(directory)
    if not root.is_dir():
        raise OCIError(f"{root} is not a directory")
    writer = _LayerWriter(out, compression, level)
    for current, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            full = os.path.join(current, name)
            arcname = os.path.relpath(full, root)
            info = writer.tar.gettarinfo(full, arcname=arcname)
            if info is None:
                continue  # a socket
            if info.isreg():
                with open(full, "rb") as handle:
                    writer.add(info, handle)
            else:
                writer.add(info)
    return writer.close()


def _entries_from_files(files: Mapping[str, FileSpec]) -> Iterable[tuple[tarfile.TarInfo, bytes | None]]:
    """TarInfos for a ``{path: content}`` dict, parents first, with implicit parent directories."""
    seen: set[str] = set()
    for path in sorted(files):
        spec = files[path]
        name = path.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in seen and parent not in files:
                seen.add(parent)
                info = tarfile.TarInfo(parent)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
                yield info, None
        seen.add(name)
        info = tarfile.TarInfo(name)
        info.mtime = FIXED_MTIME
        if isinstance(spec, Symlink):
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, spec.target, 0o777
            yield info, None
        elif isinstance(spec, Directory):
            info.type, info.mode = tarfile.DIRTYPE, spec.mode
            yield info, None
        else:
            content, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
            data = content.encode() if isinstance(content, str) else content
            info.size, info.mode = len(data), mode
            yield info, data


def layer_from_files(
    files: Mapping[str, FileSpec], *, compression: str = "gzip", docker: bool = False, level: int = 6
) -> LayerBlob:
    """An in-memory layer from a ``{path: content}`` dict (see :data:`FileSpec`)."""
    out = io.BytesIO()
    digest, size, diff_id, media_type = write_layer(
        _entries_from_files(files), out, compression=compression, level=level, docker=docker
    )
    return LayerBlob(digest, size, diff_id, media_type, data=out.getvalue())


def layer_from_tar(tar_bytes: bytes, *, compression: str = "gzip", docker: bool = False) -> LayerBlob:
    """A layer from an already built (possibly hostile) uncompressed tar archive."""
    diff_id = f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}"
    if compression == "gzip":
        data = gzip.compress(tar_bytes, mtime=0)
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(tar_bytes)
    else:
        data = tar_bytes
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    return LayerBlob(digest, len(data), diff_id, _media_type(compression, docker), data=data)


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _push_manifest(
    client: RegistryClient, ref: Reference, identifier: str, media_type: str, body: bytes
) -> str:
    """``PUT`` a manifest or index, exactly ``body`` under ``media_type``; return its digest.

    Ours, not oras-py's ``upload_manifest``: that one re-serialises the JSON (an index would name
    digests of bytes never stored), always sends the OCI manifest Content-Type (Docker v2 manifests
    and indexes would be mislabelled) and refuses an index (it validates against a manifest schema).
    """
    digest = _digest(body)
    response = client._request(
        "PUT",
        ref,
        f"manifests/{identifier}",
        what="manifest upload",
        actions="pull,push",
        headers={"Content-Type": media_type},
        body=lambda: body,
        ok=(201,),
    )
    response.close()
    returned = response.headers.get("Docker-Content-Digest")
    if returned and returned != digest:
        raise OCIError(f"{ref.name}: registry stored the manifest as {returned}, expected {digest}")
    return digest


def push_image(
    client: RegistryClient,
    ref: str | Reference,
    images: Mapping[str, Sequence[LayerBlob]],
    *,
    version: str | None = None,
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    docker: bool = False,
    force_index: bool = False,
) -> str:
    """Push one image per platform (``{"linux/amd64": [layers...]}``) and return the tag's digest.

    One platform gives a plain manifest under the tag (unless ``force_index``); several give
    per-platform manifests pushed by digest and an index (OCI, or a Docker manifest list when
    ``docker``) under the tag.
    """
    # Imported here: oras and jsonschema load only in processes that publish (see upload.py).
    from .upload import OrasUploader

    reference = parse_reference(ref)
    if not images:
        raise OCIError("nothing to push: no platforms")
    uploader = OrasUploader(client, reference)
    all_annotations = dict(annotations or {})
    all_labels = dict(labels or {})
    if version:
        all_annotations[VERSION_ANNOTATION] = version
        all_labels[VERSION_ANNOTATION] = version
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config_type = DOCKER_CONFIG if docker else OCI_CONFIG
    entries: list[dict[str, Any]] = []
    for platform_text, layers in images.items():
        platform = Platform.parse(platform_text)
        for layer in layers:
            if layer.path is not None:
                uploader.upload(layer.digest, layer.size, layer.path)
            else:
                assert layer.data is not None
                uploader.upload_bytes(layer.digest, layer.data)
        config: dict[str, Any] = {
            **platform.as_descriptor(),
            "config": {"Labels": all_labels} if all_labels else {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created_by": "backend-portal publish"} for _ in layers],
        }
        config_bytes = _json_bytes(config)
        config_digest = _digest(config_bytes)
        uploader.upload_bytes(config_digest, config_bytes)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_bytes)},
            "layers": [
                {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                for layer in layers
            ],
        }
        if all_annotations and not docker:
            manifest["annotations"] = all_annotations
        manifest_bytes = _json_bytes(manifest)
        entries.append(
            {
                "mediaType": manifest_type,
                "digest": _digest(manifest_bytes),
                "size": len(manifest_bytes),
                "platform": platform.as_descriptor(),
                "_body": manifest_bytes,
            }
        )
    tag = reference.tag or reference.digest or "latest"
    if len(entries) == 1 and not force_index:
        entry = entries[0]
        return _push_manifest(client, reference, tag, manifest_type, entry["_body"])
    for entry in entries:
        _push_manifest(client, reference, entry["digest"], manifest_type, entry["_body"])
    index: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST_LIST if docker else OCI_INDEX,
        "manifests": [{k: v for k, v in entry.items() if k != "_body"} for entry in entries],
    }
    if all_annotations and not docker:
        index["annotations"] = all_annotations
    return _push_manifest(client, reference, tag, index["mediaType"], _json_bytes(index))


def _client_for(client: RegistryClient | None, config: RegistryConfig | None) -> tuple[RegistryClient, bool]:
    if client is not None:
        return client, False
    return RegistryClient(config), True


def publish(
    directory: str | os.PathLike[str],
    ref: str | Reference,
    *,
    version: str | None = None,
    platforms: Sequence[str] | None = None,
    config: RegistryConfig | None = None,
    client: RegistryClient | None = None,
    compression: str = "gzip",
) -> str:
    """Push ``directory`` as an OCI image under ``ref``; return the digest the tag now points to.

    ``platforms`` (``["linux/amd64", "linux/arm64"]``) publishes the same tree for each, under an
    index; by default a single manifest for this machine's platform.
    """
    reference = parse_reference(ref)
    if not Path(directory).is_dir():
        raise OCIError(f"{directory} is not a directory")
    chosen = list(platforms) if platforms else [str(host_platform())]
    registry, owned = _client_for(client, config)
    try:
        with tempfile.TemporaryDirectory(prefix="oci-publish-") as scratch:
            layer_path = Path(scratch) / "layer"
            with open(layer_path, "wb") as out:
                digest, size, diff_id, media_type = layer_from_directory(
                    directory, out, compression=compression
                )
            layer = LayerBlob(digest, size, diff_id, media_type, path=layer_path)
            return push_image(
                registry,
                reference,
                {platform: [layer] for platform in chosen},
                version=version,
                force_index=len(chosen) > 1,
            )
    finally:
        if owned:
            registry.close()


def _as_layers(
    files: Mapping[str, FileSpec] | Sequence[Mapping[str, FileSpec]],
) -> list[Mapping[str, FileSpec]]:
    return [files] if isinstance(files, Mapping) else list(files)


def publish_files(
    files: Mapping[str, FileSpec] | Sequence[Mapping[str, FileSpec]],
    ref: str | Reference,
    *,
    version: str | None = None,
    platforms: Sequence[str] | None = None,
    compression: str = "gzip",
    docker: bool = False,
    config: RegistryConfig | None = None,
    client: RegistryClient | None = None,
) -> str:
    """Build an image from ``{path: content}`` (one dict per layer) and push it; return its digest.

    For tests and benchmarks. Contents: bytes/str (mode 0644), ``(content, mode)``, :class:`Symlink`,
    :class:`Directory`; a path starting ``.wh.`` in its last component is a whiteout.
    """
    layers = [layer_from_files(layer, compression=compression, docker=docker) for layer in _as_layers(files)]
    chosen = list(platforms) if platforms else [str(host_platform())]
    registry, owned = _client_for(client, config)
    try:
        return push_image(
            registry,
            ref,
            {platform: layers for platform in chosen},
            version=version,
            docker=docker,
            force_index=len(chosen) > 1,
        )
    finally:
        if owned:
            registry.close()


def publish_per_platform(
    images: Mapping[str, Mapping[str, FileSpec] | Sequence[Mapping[str, FileSpec]]],
    ref: str | Reference,
    *,
    version: str | None = None,
    compression: str = "gzip",
    docker: bool = False,
    config: RegistryConfig | None = None,
    client: RegistryClient | None = None,
) -> str:
    """Like :func:`publish_files` with different files per platform, always under an index."""
    built = {
        platform: [
            layer_from_files(layer, compression=compression, docker=docker) for layer in _as_layers(files)
        ]
        for platform, files in images.items()
    }
    registry, owned = _client_for(client, config)
    try:
        return push_image(registry, ref, built, version=version, docker=docker, force_index=True)
    finally:
        if owned:
            registry.close()
