"""A small streaming tar reader for layer application.

Why not ``tarfile``: in stream mode its generic machinery (``_Stream`` re-buffering, ``TarInfo``
parsing of every field, the member list it keeps) cost about 70 µs per entry, three times what
creating the file costs; layers of Python packages have tens of thousands of small files. This
reader parses only what unpacking needs (name, type, mode, size, mtime, link target), reads each
byte of the stream once, and hands file data out as slices of the decompressor's own buffers.

Formats: v7, POSIX ustar (with ``prefix``), GNU (``L``/``K`` long names, base-256 numbers) and
PAX (``x`` records ``path``, ``linkpath``, ``size``, ``mtime``; ``g`` global headers are ignored).
Sparse files and multi-volume archives are refused. Header checksums are verified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple, Protocol

from .errors import OCIError

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
READ_SIZE = 1024 * 1024

REGULAR = "0"
HARDLINK = "1"
SYMLINK = "2"
CHARDEV = "3"
BLOCKDEV = "4"
DIRECTORY = "5"
FIFO = "6"
CONTIGUOUS = "7"
_PAX = b"x"
_PAX_GLOBAL = b"g"
_GNU_LONGNAME = b"L"
_GNU_LONGLINK = b"K"
# Things tar can hold that a layer has no business holding.
_UNSUPPORTED = {b"S": "GNU sparse file", b"V": "volume header", b"M": "multi-volume continuation"}
# Extended headers bigger than this are refused (a PAX record holds a path, not data).
MAX_EXTENDED_HEADER = 1024 * 1024


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class TarEntry(NamedTuple):
    """One archive entry (a NamedTuple: built tens of thousands of times per layer)."""

    name: str
    type: str  # one of REGULAR, HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO (CONTIGUOUS -> REGULAR)
    mode: int
    size: int
    mtime: float
    linkname: str


def _decode(raw: bytes) -> str:
    # Same as tarfile's default: UTF-8, with undecodable bytes kept as surrogates.
    return raw.decode("utf-8", "surrogateescape")


def _cstring(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def parse_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80 or 0xff)."""
    if field and field[0] in (0x80, 0xFF):
        value = 0
        for byte in field[1:]:
            value = (value << 8) | byte
        if field[0] == 0xFF:  # negative, two's complement
            value -= 1 << (8 * (len(field) - 1))
        return value
    text = _cstring(field).strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise OCIError(f"invalid number {field!r} in tar header") from None


def _checksum_ok(block: bytes) -> bool:
    stored_field = _cstring(block[148:156]).strip(b" ")
    try:
        stored = int(stored_field, 8)
    except ValueError:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    signed = (
        sum(b - 256 if b > 127 else b for b in block)
        - sum(b - 256 if b > 127 else b for b in block[148:156])
        + 8 * 32
    )
    return stored == signed


def _parse_pax(data: bytes, label: str) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise OCIError(f"{label}: malformed PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise OCIError(f"{label}: malformed PAX header") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise OCIError(f"{label}: malformed PAX header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value
        pos += length
    return records


class TarReader:
    """Iterate the entries of an uncompressed tar stream; read each file's data as it comes."""

    def __init__(self, source: Readable, label: str) -> None:
        self._source = source
        self._label = label
        self._buf = b""
        self._pos = 0
        self._pending = 0  # bytes of the current entry's data and padding not consumed yet
        self._done = False

    # -- buffer -------------------------------------------------------------------------------

    def _fill(self) -> bool:
        chunk = self._source.read(READ_SIZE)
        if not chunk:
            return False
        rest = len(self._buf) - self._pos
        self._buf = self._buf[self._pos :] + chunk if rest else chunk
        self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n:
            if not self._fill():
                raise OCIError(f"{self._label}: tar stream ends in the middle of an entry")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _skip(self, n: int) -> None:
        while n:
            available = len(self._buf) - self._pos
            if not available:
                if not self._fill():
                    raise OCIError(f"{self._label}: tar stream ends in the middle of an entry")
                continue
            step = min(available, n)
            self._pos += step
            n -= step

    def _at_clean_end(self) -> bool:
        return len(self._buf) == self._pos and not self._fill()

    # -- entries ------------------------------------------------------------------------------

    def read_data(self, size: int) -> Iterator[memoryview]:
        """The current entry's data, as views valid until the next iteration step."""
        if size > self._pending:
            raise OCIError(f"{self._label}: read past the end of a tar entry")
        remaining = size
        while remaining:
            available = len(self._buf) - self._pos
            if not available:
                if not self._fill():
                    raise OCIError(f"{self._label}: tar stream ends in the middle of an entry")
                continue
            step = min(available, remaining)
            view = memoryview(self._buf)[self._pos : self._pos + step]
            self._pos += step
            remaining -= step
            self._pending -= step
            yield view

    def __iter__(self) -> Iterator[TarEntry]:
        while True:
            entry = self.next()
            if entry is None:
                return
            yield entry

    def next(self) -> TarEntry | None:
        """The next entry, or None at the end of the archive."""
        if self._done:
            return None
        if self._pending:
            self._skip(self._pending)
            self._pending = 0
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: dict[str, bytes] = {}
        while True:
            if self._at_clean_end():
                self._done = True  # no end-of-archive blocks: accepted, as Go's archive/tar does
                return None
            block = self._take(BLOCK)
            if block == _ZERO_BLOCK:
                self._done = True
                return None
            if not _checksum_ok(block):
                raise OCIError(f"{self._label}: corrupt tar header (bad checksum)")
            typeflag = block[156:157]
            size = parse_number(block[124:136])
            if size < 0:
                raise OCIError(f"{self._label}: negative size in tar header")
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if typeflag in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                if size > MAX_EXTENDED_HEADER:
                    raise OCIError(f"{self._label}: extended tar header of {size} bytes")
                data = self._take(padded)[:size]
                if typeflag == _PAX:
                    pax.update(_parse_pax(data, self._label))
                elif typeflag == _GNU_LONGNAME:
                    long_name = _cstring(data)
                elif typeflag == _GNU_LONGLINK:
                    long_link = _cstring(data)
                continue  # global headers carry nothing a layer needs
            if typeflag in _UNSUPPORTED:
                name = _decode(long_name or _cstring(block[0:100]))
                raise OCIError(f"{self._label}: entry {name!r}: {_UNSUPPORTED[typeflag]} not supported")
            return self._entry(block, typeflag, size, padded, long_name, long_link, pax)

    def _entry(
        self,
        block: bytes,
        typeflag: bytes,
        size: int,
        padded: int,
        long_name: bytes | None,
        long_link: bytes | None,
        pax: dict[str, bytes],
    ) -> TarEntry:
        name_raw = _cstring(block[0:100])
        if block[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field extends the name
            prefix = _cstring(block[345:500])
            if prefix:
                name_raw = prefix + b"/" + name_raw
        if long_name is not None:
            name_raw = long_name
        link_raw = long_link
        if link_raw is None:
            link_raw = _cstring(block[157:257]) if typeflag in (b"1", b"2") else b""
        mtime: float = parse_number(block[136:148])
        if "path" in pax:
            name_raw = pax["path"]
        if "linkpath" in pax:
            link_raw = pax["linkpath"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise OCIError(f"{self._label}: malformed PAX size") from None
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if "mtime" in pax:
            with contextlib.suppress(ValueError):
                mtime = float(pax["mtime"])
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise OCIError(f"{self._label}: entry {_decode(name_raw)!r}: GNU sparse file not supported")
        kind = typeflag.decode("latin-1") if typeflag not in (b"\0", b"") else REGULAR
        if kind == CONTIGUOUS:
            kind = REGULAR
        if kind == REGULAR and name_raw.endswith(b"/"):
            kind = DIRECTORY  # v7 archives mark directories with a trailing slash only
        # Links, devices and directories carry no data; whatever their size says is skipped.
        data_size = 0 if kind in (HARDLINK, SYMLINK, CHARDEV, BLOCKDEV, DIRECTORY, FIFO) else size
        self._pending = padded
        return TarEntry(
            name=_decode(name_raw),
            type=kind,
            mode=parse_number(block[100:108]) & 0o7777,
            size=data_size,
            mtime=mtime,
            linkname=_decode(link_raw),
        )
