"""One writer at a time per artifact, and no litter from writers that died.

`writer_lock(target)` takes an exclusive lock on the path a writer creates or changes (export,
calibrate, build, a VILA-HD export): the lock file `.<name>.ps3edge-lock` beside it, held with
flock and holding the owner's pid. A second writer is refused in one line naming that pid. The
kernel drops a flock when its process dies, however it dies (SIGKILL included), so a lock that
can be taken means that no live writer owns the target: the temporaries a dead writer left
(io.TEMP_MARK names, beside the target and inside it) are removed before the new writer starts.
The lock file is removed when the lock is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from ..errors import Ps3EdgeError
from .io import TEMP_MARK, is_temporary


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}{TEMP_MARK}lock"


def _stale_temporaries(target: Path) -> list[Path]:
    """The temporaries of earlier writers of `target`: staging directories beside it and
    temporary files or scratch directories inside it (never the lock file itself)."""
    prefix = f".{target.name}{TEMP_MARK}"
    found = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p != lock_path(target)]
    if target.is_dir() and not target.is_symlink():
        found += [p for p in target.iterdir() if is_temporary(p.name)]
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _owner(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def writer_lock(target, what: str = "writing"):
    """Hold the writer lock of `target` for the `with` block; refuse in one line when another
    live process holds it; first remove what dead writers left. `what` names the work in the
    refusal ("exporting", "calibrating", ...)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Ps3EdgeError(f"cannot create {target.parent}: {e.strerror or e}") from None
    path = lock_path(target)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise Ps3EdgeError(f"cannot lock {target} for writing: {e.strerror or e} ({path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise Ps3EdgeError(f"{target} is being written by another ps3edge ({owner}); wait for it to finish "
                               f"and run this again") from None
        # the file may have been released and unlinked between our open and our flock
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for stale in _stale_temporaries(target):
            _remove(stale)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
