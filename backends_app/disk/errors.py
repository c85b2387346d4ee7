"""The one exception family of the disk package."""

from __future__ import annotations


class LayoutError(Exception):
    """A backends or state directory is not as it must be; the message says what and where."""


class RenameUnsupported(LayoutError):
    """The kernel or filesystem does not support this ``renameat2`` flag.

    Raised by ``exchange`` so the caller can fall back to the journaled two-rename path.
    """
