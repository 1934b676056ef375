"""Where a command may put a directory it makes (export's --out, a VILA-HD export), and which
directory --overwrite may replace: the one rule every writer of an artifact directory follows.

An --out is taken when it is absent or an empty directory. With --overwrite it may also be a ps3edge
artifact, which is what ps3edge wrote and can verify: its manifest.json (a VILA-HD artifact: vila.json
and the PS3 artifact ps3/) parses, is ps3edge's, passes its integrity record and every file's sha256,
and the directory holds nothing that the manifest does not list. Anything else is refused in one line
saying what is there, and nothing is changed: ps3edge deletes only what it wrote, and a user's file
kept inside an artifact is never carried into (or lost with) the one that replaces it.

A symlinked --out is followed: the directory it points to is written, the link stays. An --out inside
an artifact (the ps3/ of a VILA-HD artifact, say) or holding the current directory is refused. What
was found is recorded, so that the rename publishing the new directory (io.publish_dir) refuses a
directory made, swapped or filled by someone else while ps3edge was writing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .. import defaults
from ..errors import Ps3EdgeError
from .io import Found, found_at, is_temporary, publish_dir
from .manifest import load_manifest
from .vila import VILA_KIND, VILA_MANIFEST, load_vila_manifest

SHOWN = 5                       # unlisted entries named in a refusal before "and N more"


@dataclass(frozen=True)
class OutDir:
    """An --out checked for a writer: where to write and what was found there."""
    given: Path                 # as the user named it (messages)
    path: Path                  # where the directory is written: `given`, or the directory its symlink names
    start: Found                # what was at `path` when checked
    replace: bool               # a ps3edge artifact is there and --overwrite replaces it

    def publish(self, staging: Path) -> None:
        """Rename the finished `staging` into place (io.publish_dir); an artifact being replaced is
        checked once more, moved aside, before it is deleted."""
        publish_dir(staging, self.path, replace=self.replace, start=self.start,
                    may_replace=lambda moved: _still_replaceable(moved, self.given))


def prepare_out_dir(out, overwrite: bool) -> OutDir:
    """Check `out` before a writer starts (and again under its writer lock): absent, an empty
    directory, or with `overwrite` (--overwrite) a ps3edge artifact holding nothing else; refuse
    anything else in one line naming what is there."""
    given = Path(out)
    path = _followed(given)
    if path.exists() and not path.is_dir():
        raise Ps3EdgeError(f"{given} exists and is not a directory")
    _check_outside_artifacts(given, path)
    _check_parents(given, path)
    if not path.exists():
        return OutDir(given, path, found_at(path), False)
    _check_not_cwd(given, path)
    entries = [e for e in _listdir(given, path) if not is_temporary(e)]   # a dead writer's temporaries go at lock time
    if not entries:
        return OutDir(given, path, found_at(path), False)
    kind = _claimed_kind(path)
    if kind is None:
        if not overwrite:
            raise Ps3EdgeError(f"{given} is not empty ({_names(sorted(entries))})")
        manifests = [m for m in (VILA_MANIFEST, defaults.MANIFEST_NAME) if m in entries]
        what = (f"{manifests[0]} is not a ps3edge manifest" if manifests else
                f"no {defaults.MANIFEST_NAME} or {VILA_MANIFEST}")
        raise Ps3EdgeError(f"{given} is not empty and is not a ps3edge artifact ({what}; it holds "
                           f"{_names(sorted(entries))}); --overwrite replaces only an artifact ps3edge wrote, "
                           f"so nothing was changed")
    if not overwrite:
        raise Ps3EdgeError(f"{given} is not empty: it holds a ps3edge artifact (use --overwrite to replace it)")
    owned = _verified_files(path, given, kind, verify=True)
    unlisted = _unlisted(path, owned)
    if unlisted:
        raise Ps3EdgeError(f"{given} is a ps3edge artifact but also holds what its manifest does not list "
                           f"({_names(unlisted)}); --overwrite deletes only what ps3edge wrote, so nothing was changed "
                           f"- move those out of it, or choose another --out")
    return OutDir(given, path, found_at(path), True)


def _followed(given: Path) -> Path:
    """Where `given` is written: a symlink's directory, and `.` or `x/..` as the directory they name
    (the rename that publishes needs a parent and a name)."""
    if not given.is_symlink() and given.name not in ("", ".", ".."):
        return given
    try:
        real = given.resolve(strict=False)
    except (OSError, RuntimeError) as e:                 # a symlink loop
        raise Ps3EdgeError(f"cannot follow --out {given}: {getattr(e, 'strerror', None) or e}") from None
    if given.is_symlink() and not real.exists():
        raise Ps3EdgeError(f"{given} is a symlink to {real}, which does not exist; create that directory "
                           f"or give --out a directory")
    return real


def _check_parents(given: Path, path: Path) -> None:
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise Ps3EdgeError(f"cannot create {given}: {existing} is not a directory")


def _check_outside_artifacts(given: Path, path: Path) -> None:
    """A directory made inside an artifact would change it behind its manifest (and a VILA-HD
    artifact's ps3/ is part of it, not an artifact of its own to replace)."""
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError):
        return
    for parent in real.parents:
        kind = _claimed_kind(parent)
        if kind is not None:
            raise Ps3EdgeError(f"{given} is inside the ps3edge {kind} artifact {parent}; writing there would change "
                               f"that artifact behind its manifest - choose a directory outside it")


def _check_not_cwd(given: Path, path: Path) -> None:
    try:
        cwd, real = Path.cwd().resolve(), path.resolve()
    except (OSError, RuntimeError):
        return
    if real == cwd or real in cwd.parents:
        raise Ps3EdgeError(f"{given} is the current directory or holds it; the finished directory is renamed into its "
                           f"place, which would leave this shell in a removed directory - run this from outside it")


def _listdir(given: Path, path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise Ps3EdgeError(f"cannot read {given}: {e.strerror or e}") from None


def _claimed_kind(directory: Path) -> str | None:
    """"PS3" or "VILA-HD" when `directory` holds a manifest that says ps3edge wrote it (checked
    or not), else None."""
    if _read_claim(directory / VILA_MANIFEST, lambda d: d.get("kind") == VILA_KIND):
        return "VILA-HD"
    if _read_claim(directory / defaults.MANIFEST_NAME,
                   lambda d: isinstance(d.get("producer"), dict) and d["producer"].get("name") == "ps3edge"):
        return "PS3"
    return None


def _read_claim(path: Path, claims) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and bool(claims(data))


def _verified_files(path: Path, given: Path, kind: str, verify: bool) -> set[str]:
    """Every path (relative, with /) the artifact's manifests name, themselves included; refused
    in one line when they do not verify."""
    try:
        if kind == "VILA-HD":
            vila = load_vila_manifest(path, verify=verify)
            ps3 = load_manifest(path / "ps3", verify=verify)
            return ({VILA_MANIFEST, *vila.files}
                    | {f"ps3/{name}" for name in (defaults.MANIFEST_NAME, *ps3.files)})
        manifest = load_manifest(path, verify=verify)
        return {defaults.MANIFEST_NAME, *manifest.files}
    except Ps3EdgeError as e:
        raise Ps3EdgeError(f"{given} cannot be verified as a ps3edge artifact ({e}); --overwrite replaces only "
                           f"an artifact ps3edge can verify, so nothing was changed - remove it yourself, or choose "
                           f"another --out") from None


def _unlisted(root: Path, owned: set[str]) -> list[str]:
    """What under `root` the manifests do not name, outermost first (a folder of the user's as
    `name/`); ps3edge's temporaries aside."""
    folders = {"/".join(Path(f).parts[:i]) for f in owned for i in range(1, len(Path(f).parts))}
    found: list[str] = []

    def walk(directory: Path, prefix: str) -> None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as e:
            raise Ps3EdgeError(f"cannot read {directory}: {e.strerror or e}; --overwrite deletes only what it "
                               f"can see is ps3edge's, so nothing was changed") from None
        for name in names:
            rel, entry = prefix + name, directory / name
            if is_temporary(name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                if rel in folders:
                    walk(entry, rel + "/")
                else:
                    found.append(rel + "/")
            elif rel not in owned:
                found.append(rel)
    walk(root, "")
    return found


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _still_replaceable(moved: Path, given: Path) -> None:
    """The artifact found at the start, moved aside just before it is deleted: still ps3edge's and
    still holding nothing unlisted (a file added while the export ran is the user's)."""
    kind = _claimed_kind(moved)
    if kind is None:
        raise Ps3EdgeError(f"{given} was changed while ps3edge was writing it and no longer holds a ps3edge "
                           f"manifest; nothing of it was replaced")
    unlisted = _unlisted(moved, _verified_files(moved, given, kind, verify=False))
    if unlisted:
        raise Ps3EdgeError(f"{given} was given files while ps3edge was writing it ({_names(unlisted)}); they are "
                           f"not ps3edge's, so nothing of it was replaced")
