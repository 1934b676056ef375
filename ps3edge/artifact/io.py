"""Writing artifact files safely: sha256, atomic file writes, staging directories published by
rename (never over a directory that someone else made or filled meanwhile: `publish_dir`), and the
names ps3edge gives its temporaries. Which directory a writer may take or replace: outdir.py.

Every temporary that ps3edge creates is named `.<target>.ps3edge-<what>-<random>` (a directory
or a `.tmp` file) beside or inside the thing it becomes, so that a writer that finds one whose
owner is gone (see lock.py) can remove exactly those and never a file of the user's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import Ps3EdgeError

TEMP_MARK = ".ps3edge-"              # in the name of every temporary file or directory ps3edge makes


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def temp_prefix(target_name: str, what: str) -> str:
    """The prefix of a temporary that becomes (or works for) `target_name`."""
    return f".{target_name}{TEMP_MARK}{what}-"


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of ps3edge's temporaries."""
    return name.startswith(".") and TEMP_MARK in name


def apply_default_mode(path) -> None:
    """Give a file from mkstemp (0600) or a directory from mkdtemp (0700) the permissions that a
    plain open() / mkdir() would, so artifacts and outputs are readable as the umask allows."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def temp_file(directory: Path, final_name: str) -> Path:
    """An empty temporary file in `directory` that will be renamed to `final_name`."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(final_name, "tmp"), suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def temp_dir(directory: Path, final_name: str, what: str) -> Path:
    """A temporary directory in `directory` working for `final_name` (staging, scratch)."""
    try:
        return Path(tempfile.mkdtemp(dir=directory, prefix=temp_prefix(final_name, what)))
    except OSError as e:
        raise Ps3EdgeError(f"cannot write in {directory}: {e.strerror or e}") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename; the
    file gets the permissions a plain open() would give."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name, "tmp"), suffix=".tmp")
    except OSError as e:
        raise Ps3EdgeError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        apply_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` through a temporary file beside `dst` and a rename."""
    dst = Path(dst)
    tmp = temp_file(dst.parent, dst.name)
    try:
        shutil.copyfile(src, tmp)
        apply_default_mode(tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Found:
    """What a writer found at its target when it started: nothing (`ident` None) or the directory
    with this (st_dev, st_ino), so that the rename publishing its work can tell a directory made,
    swapped or filled by someone else meanwhile."""
    ident: tuple[int, int] | None


def found_at(target) -> Found:
    """The directory at `target` now (a final symlink not followed), or nothing."""
    ident = _ident(Path(target))
    return Found(ident)


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@functools.cache
def _renameat2():
    """glibc's renameat2 (Linux 3.15+), or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src, dst) -> None:
    """rename(2) that fails (FileExistsError) when anything is at `dst`, an empty directory included:
    one system call where the kernel and filesystem have RENAME_NOREPLACE, else a check just before."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):   # EINVAL: a filesystem without the flag
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _changed(target: Path) -> Ps3EdgeError:
    return Ps3EdgeError(f"{target} was created or filled while ps3edge was writing it; nothing of it was "
                        f"replaced (remove it, or choose another --out)")


def _make_readable(staging: Path) -> None:
    for root, _, names in os.walk(staging):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)


def publish_dir(staging: Path, target: Path, replace: bool = False, start: Found | None = None,
                may_replace: Callable[[Path], None] | None = None) -> None:
    """Make a finished staging directory the target: its tree made readable (mkdtemp / mkstemp
    create private entries), then renamed into place.

    `start` is what the writer found at the target when it began (found_at). Absent then, the
    target must be absent now: one that appeared meanwhile is someone else's and is kept. An empty
    directory then (the user's chosen --out) is taken only if it is that same directory and still
    empty. `replace` (the caller's --overwrite, its target checked when it began): the directory
    found is moved aside, `may_replace(moved)` checks it once more where nobody can add to it by its
    path (raising Ps3EdgeError puts it back), the new one is renamed in, and the old one deleted.
    Every refusal leaves the target as it was. With `start` None the rename takes an empty
    directory, whenever it was made. The caller holds the target's writer lock (lock.py)."""
    target = Path(target)
    _make_readable(staging)
    if replace:
        _swap(staging, target, start, may_replace)
        return
    now = _ident(target)
    try:
        if start is None and now is not None:
            os.rename(staging, target)       # POSIX: replaces an empty directory, fails on anything else
        elif now is None:
            rename_noreplace(staging, target)
        elif now == start.ident:
            os.rename(staging, target)       # the empty directory found at the start; fails if it was filled
        else:
            raise _changed(target)
    except OSError:
        if os.path.lexists(target):
            raise _changed(target) from None
        raise


def _swap(staging: Path, target: Path, start: Found | None, may_replace) -> None:
    """Replace the directory found at the start: the old one stays whole until the new one is in place."""
    if start is None or start.ident is None or may_replace is None:
        raise Ps3EdgeError(f"{target} was not checked as a ps3edge artifact that may be replaced; nothing of it "
                           f"was replaced")
    if _ident(target) is None:                  # removed meanwhile: nothing left to replace
        publish_dir(staging, target, start=Found(None))
        return
    old = temp_dir(target.parent, target.name, "old")
    aside = old / target.name
    try:
        os.rename(target, aside)
    except OSError as e:
        old.rmdir()
        raise Ps3EdgeError(f"cannot replace {target}: {e.strerror or e}") from None
    try:
        if _ident(aside) != start.ident:
            raise _changed(target)
        may_replace(aside)
        rename_noreplace(staging, target)
    except BaseException as e:
        _put_back(aside, target, old)
        if isinstance(e, OSError):
            raise _changed(target) from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def _put_back(aside: Path, target: Path, old: Path) -> None:
    """Return a directory moved aside to its place; where something took that place meanwhile, keep
    it beside the target under a name that is not a temporary's (a later writer would delete it)."""
    try:
        rename_noreplace(aside, target)
    except OSError:
        kept = target.parent / f"{target.name}.kept-{os.getpid()}"
        os.rename(aside, kept)
        old.rmdir()
        raise Ps3EdgeError(f"{target} was created while ps3edge was replacing it; the directory that was there "
                           f"is kept as {kept}") from None
    old.rmdir()
