"""Backend trees, their archives, and a real HTTP server that serves them (with Range and faults)."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard


def write_tree(root: Path, files: dict[str, Any]) -> Path:
    """Files under `root`: `{"run.sh": ("text", 0o755), "lib/x": "text", "link": Symlink("target")}`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, spec in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, Symlink):
            path.symlink_to(spec.target)
            continue
        text, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        path.chmod(mode)
    return root


@dataclass(frozen=True)
class Symlink:
    target: str


def backend_files(version: str) -> dict[str, Any]:
    return {"run.sh": (f"#!/bin/sh\necho {version}\n", 0o755), "lib/version.txt": version}


def tar_bytes(files: dict[str, Any], compression: str = "gz") -> bytes:
    """A tar archive (``gz``, ``xz``, ``bz2``, ``zst`` or ``""``) of entries given as for `write_tree`;
    a `Symlink` becomes a symlink entry, names are taken as they are (``../x`` too)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, spec in files.items():
            info = tarfile.TarInfo(name)
            if isinstance(spec, Symlink):
                info.type, info.linkname = tarfile.SYMTYPE, spec.target
                archive.addfile(info)
                continue
            text, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
            data = text.encode() if isinstance(text, str) else text
            info.size, info.mode = len(data), mode
            archive.addfile(info, io.BytesIO(data))
    data = raw.getvalue()
    if compression == "gz":
        import gzip

        return gzip.compress(data)
    if compression == "xz":
        import lzma

        return lzma.compress(data)
    if compression == "bz2":
        import bz2

        return bz2.compress(data)
    if compression == "zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def zip_bytes(files: dict[str, Any]) -> bytes:
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, spec in files.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            if isinstance(spec, Symlink):
                info.external_attr = (0o120777) << 16
                archive.writestr(info, spec.target)
                continue
            text, mode = spec if isinstance(spec, tuple) else (spec, 0o644)
            info.external_attr = (0o100000 | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text)
    return raw.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Cut:
    """Close the connection after `after` bytes of the body of the next `times` GETs of `path`."""

    path: str
    after: int
    times: int = 1


@dataclass
class FilesServer:
    """A threaded HTTP/1.1 server on loopback serving `files` (path -> bytes) from memory.

    Honours ``Range: bytes=N-`` with 206 when `ranges` is on (and says ``Accept-Ranges: bytes``);
    `cuts` end bodies early; `log` records (method, path, Range header, status).
    """

    files: dict[str, bytes] = field(default_factory=dict)
    ranges: bool = True
    cuts: list[Cut] = field(default_factory=list)
    log: list[tuple[str, str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = server.files.get(self.path)
                wanted = self.headers.get("Range", "")
                if data is None:
                    server.log.append(("GET", self.path, wanted, 404))
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                status = 200
                if server.ranges and wanted.startswith("bytes=") and wanted.endswith("-"):
                    start, status = int(wanted[len("bytes=") : -1]), 206
                body = data[start:]
                server.log.append(("GET", self.path, wanted, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = next((c for c in server.cuts if c.path == self.path and c.times > 0), None)
                if cut is not None:
                    cut.times -= 1
                    self.wfile.write(body[: cut.after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}{path}"

    def gets(self, path: str) -> list[tuple[str, str, str, int]]:
        return [entry for entry in self.log if entry[1] == path]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
