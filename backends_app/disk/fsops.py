"""Crash-safe file primitives: atomic writes, atomic renames and exchanges, syncing, removal, space.

Plain functions over paths; no ORM, no Django, no network. They raise ``OSError`` subclasses like
``os.rename`` does, so callers keep the errno; ``LayoutError`` where a path is not as it must be.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from backends_app.disk.errors import LayoutError, RenameUnsupported

StrPath = str | os.PathLike[str]
MiB = 1024 * 1024


def fsync_dir(path: StrPath) -> None:
    """Make the entries of directory ``path`` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: StrPath, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that a reader or a crash sees the old or the new file, whole.

    The temp file (``.<name>.<random>.tmp`` beside ``path``) is removed on failure; after a crash it
    may stay behind, which is harmless to LocalAI (it lists directories, not files).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _renameat2() -> Any:
    """glibc's ``renameat2`` (2.28+), or None when this C library lacks it."""
    func = getattr(_libc(), "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# What the kernel answers when it or the filesystem lacks a flag. EINVAL is also the answer to
# "a directory into its own subtree", which _check_not_nested rules out before the call.
_UNSUPPORTED_ERRNOS = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


def _rename2(src: Path, dst: Path, flags: int) -> None:
    func = _renameat2()
    if func is None:
        raise RenameUnsupported("the C library has no renameat2")
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    code = ctypes.get_errno()
    if code in _UNSUPPORTED_ERRNOS:
        raise RenameUnsupported(
            f"renameat2 flag {flags} is not supported for {src} -> {dst}: {os.strerror(code)}"
        )
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _real(path: Path) -> Path:
    # Resolve the parent only: the last component may itself be a symlink we must not follow.
    return Path(os.path.realpath(path.parent)) / path.name


def _check_not_nested(a: Path, b: Path) -> None:
    ra, rb = _real(a), _real(b)
    if ra == rb or ra in rb.parents or rb in ra.parents:
        raise LayoutError(f"cannot rename between {a} and {b}: one contains the other")


def _fsync_parents(*paths: Path) -> None:
    for parent in dict.fromkeys(path.parent for path in paths):
        fsync_dir(parent)


def exchange(a: StrPath, b: StrPath) -> None:
    """Swap paths ``a`` and ``b`` in one atomic step (``renameat2(RENAME_EXCHANGE)``).

    Both must exist, on one filesystem. At every instant each path holds a complete tree, so
    LocalAI never sees a missing backend. Raises ``RenameUnsupported`` when the kernel or
    filesystem cannot do it (the caller then uses the journaled two-rename path), an ``OSError``
    subclass for anything else (``FileNotFoundError``, ``EXDEV``...).
    """
    pa, pb = Path(a), Path(b)
    _check_not_nested(pa, pb)
    _rename2(pa, pb, _RENAME_EXCHANGE)
    _fsync_parents(pa, pb)


def rename_noreplace(src: StrPath, dst: StrPath) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists.

    Uses ``renameat2(RENAME_NOREPLACE)``, which is atomic. Where that is unsupported it falls back
    to check-then-rename, whose small window is closed by the per-backend journal lock (only the
    operation holding it moves that backend's directories).
    """
    ps, pd = Path(src), Path(dst)
    _check_not_nested(ps, pd)
    try:
        _rename2(ps, pd, _RENAME_NOREPLACE)
    except RenameUnsupported:
        _rename_noreplace_portable(ps, pd)
    _fsync_parents(ps, pd)


def _rename_noreplace_portable(src: Path, dst: Path) -> None:
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


def sync_tree(path: StrPath) -> None:
    """Flush everything written under ``path`` to disk, before it is renamed into place.

    Uses ``syncfs`` on the filesystem holding ``path``: one call instead of an fsync for each of
    the tens of thousands of files a Python backend carries. Without it, a power cut after the
    rename could leave the live backend with empty files.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        func = getattr(_libc(), "syncfs", None)
        if func is None:
            os.sync()
        elif func(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def remove_tree(path: StrPath) -> None:
    """Delete ``path`` and everything under it; no-op if it does not exist.

    Never follows a symlink: a symlink (at the top or inside) is removed, its target left alone.
    Read-only or unlistable directories (backend images ship them) are made writable first.
    """
    top = Path(path)
    try:
        info = top.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        top.unlink()
        return
    _make_tree_writable(top, info)
    shutil.rmtree(top)


def _make_tree_writable(top: Path, info: os.stat_result) -> None:
    def allow(path: str | Path, mode: int) -> None:
        if mode & 0o700 != 0o700:
            os.chmod(path, stat.S_IMODE(mode) | 0o700)

    allow(top, info.st_mode)
    # Top-down: each subdirectory is made listable here, before os.walk descends into it.
    for root, dirs, _files in os.walk(top):
        for name in dirs:
            child = os.path.join(root, name)
            child_info = os.lstat(child)
            if stat.S_ISDIR(child_info.st_mode):  # symlinks to directories are listed in dirs too
                allow(child, child_info.st_mode)


def tree_size(path: StrPath) -> int:
    """Apparent size in bytes of the regular files under ``path``, hard links counted once.

    Symlinks are not followed. This is the space a copy of the tree would need.
    """
    top = Path(path)
    info = top.lstat()
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size if stat.S_ISREG(info.st_mode) else 0
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, _dirs, files in os.walk(top):
        for name in files:
            file_info = os.lstat(os.path.join(root, name))
            if not stat.S_ISREG(file_info.st_mode):
                continue
            if file_info.st_nlink > 1:
                key = (file_info.st_dev, file_info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
            total += file_info.st_size
    return total


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: StrPath) -> int:
    """Bytes available to this process on the filesystem of ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(Path(path))).free


def _mib(size: int) -> str:
    return f"{size / MiB:.1f}"


def ensure_free_space(
    path: StrPath, needed: int, margin: int = 0, parts: Sequence[tuple[str, int]] = ()
) -> None:
    """Raise ``LayoutError`` unless ``needed + margin`` bytes are free on the filesystem of ``path``.

    ``parts`` names what ``needed`` is made of, for the message (``("layers to download", n)``).
    """
    free = free_bytes(path)
    total = needed + margin
    if total > free:
        shown = [f"{_mib(size)} MiB {what}" for what, size in parts] or (
            [f"{_mib(needed)} MiB"] if margin else []
        )
        if margin:
            shown.append(f"a {_mib(margin)} MiB margin")
        detail = f" ({', '.join(shown[:-1])} plus {shown[-1]})" if len(shown) > 1 else ""
        raise LayoutError(f"need {_mib(total)} MiB{detail}, {_mib(free)} MiB free on {path}")


def same_filesystem(a: StrPath, b: StrPath) -> bool:
    """Whether ``a`` and ``b`` (or their nearest existing parents) are on one filesystem (st_dev)."""
    return nearest_existing(Path(a)).stat().st_dev == nearest_existing(Path(b)).stat().st_dev
