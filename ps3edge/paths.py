"""What a path the user named turns out to be, said truly: a missing path, a directory where a file
was expected (or the reverse) and a device or pipe each get their own message, so `p.npy` that is a
folder is never reported as "not found"."""

from __future__ import annotations

from pathlib import Path

from .errors import Ps3EdgeError


def expect_file(path, what: str) -> Path:
    """`path` as a Path if it is a regular file (links followed); one Ps3EdgeError naming `what` otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        raise Ps3EdgeError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        broken = " (a link to a missing file)" if path.is_symlink() else ""
        raise Ps3EdgeError(f"{what} not found: {path}{broken}")
    raise Ps3EdgeError(f"{what} {path} is not a regular file (a device, socket or pipe?)")


def expect_dir(path, what: str) -> Path:
    """`path` as a Path if it is a directory (links followed); one Ps3EdgeError naming `what` otherwise."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.exists():
        broken = " (a link to a missing directory)" if path.is_symlink() else ""
        raise Ps3EdgeError(f"{what} not found: {path}{broken}")
    raise Ps3EdgeError(f"{what} {path} is a file, not a directory")
