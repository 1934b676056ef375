"""Writing artifact files safely: sha256, atomic file writes, staging directories published by
rename, and the names ps3edge gives its temporaries.

Every temporary that ps3edge creates is named `.<target>.ps3edge-<what>-<random>` (a directory
or a `.tmp` file) beside or inside the thing it becomes, so that a writer that finds one whose
owner is gone (see lock.py) can remove exactly those and never a file of the user's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

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


ARTIFACT_MARKERS = ("manifest.json", "vila.json")    # a directory holding one is a ps3edge artifact


def publish_dir(staging: Path, target: Path, replace: bool = False) -> None:
    """Make a finished staging directory the target: its tree made readable (mkdtemp / mkstemp
    create private entries), then renamed into place.

    The rename takes the place of an empty directory (the user's chosen --out) and of nothing
    else: a target that is not empty by then appeared while the writer ran and is the user's,
    so it is refused, unless `replace` (the caller's --overwrite for this target) and it is
    still a ps3edge artifact, which is swapped out and deleted once the new one is in place.
    The caller holds the target's writer lock (lock.py)."""
    for root, _, names in os.walk(staging):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
    if replace and target.is_dir() and not target.is_symlink() \
            and any((target / m).is_file() for m in ARTIFACT_MARKERS):
        # swap, then delete: the old artifact is whole until the new one is in place
        old = temp_dir(target.parent, target.name, "old")
        target.rename(old / target.name)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        staging.rename(target)         # POSIX: replaces an empty directory, fails on anything else
    except OSError as e:
        if target.exists() or target.is_symlink():
            raise Ps3EdgeError(f"{target} was created or filled while ps3edge was writing it; nothing of it "
                               f"was replaced (remove it, or choose another --out)") from None
        raise
