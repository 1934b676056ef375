"""Checkpoints named by Hugging Face hub id, `owner/name[@revision]`: resolved to a snapshot directory
of the local Hugging Face cache, downloaded into it first when it is not there.

`locate(spec, files)` is what every command that takes a checkpoint calls after it has ruled out a
preset name: a local directory is used as it is; a hub id goes through huggingface_hub's
`snapshot_download`, limited to the files ps3edge reads (`files.patterns`). The cache is asked
first, with no network at all, so a snapshot that is there is used even online; only what is
missing is downloaded (with the library's progress bars), and never with `HF_HUB_OFFLINE` set.
The cache is the library's: `HF_HUB_CACHE` or `HF_HOME`/hub, read when huggingface_hub is imported.
Every failure (unknown or gated repo, unknown revision, offline and not cached, a snapshot without
a file ps3edge needs) is one Ps3EdgeError line naming the repo, the cache and what to do.

What a checkpoint's paths may point at (`Checkpoint.file`, `Checkpoint.named`, `check_revision`):
- a revision is a branch or tag name by git's rules for ref names, or a commit hash; a ref in the
  cache (refs/<revision>) holds a commit hash, so neither can lead out of the repo's cache folder;
- every file of a snapshot resolves, links followed, inside the repo's cache folder (its blobs/,
  where huggingface_hub keeps what the snapshot's links point at);
- a local directory is the user's own arrangement: its links are followed wherever they lead
  (checkpoints linked from shared storage, a config edited beside linked weights);
- a file named inside a checkpoint file (a shard in a safetensors index) is a relative path inside
  the checkpoint, never absolute and without '..', whatever kind of checkpoint it is.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

from huggingface_hub import constants, snapshot_download
from huggingface_hub.file_download import REGEX_COMMIT_HASH, repo_folder_name
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError,
                                    LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from ..errors import Ps3EdgeError

INDEX_SUFFIX = ".safetensors.index.json"
# What git refuses in a ref name (git check-ref-format): control characters, space, ~ ^ : ? * [ and \.
REF_NAME_REFUSED = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


@dataclass(frozen=True)
class CheckpointFiles:
    """What ps3edge reads of one checkpoint layout: `patterns` (what snapshot_download fetches) and
    `required` (each entry: one of these paths must be in the snapshot; fnmatch patterns)."""
    kind: str
    patterns: tuple[str, ...]
    required: tuple[tuple[str, ...], ...]

    def either(self, other: "CheckpointFiles") -> "CheckpointFiles":
        """A checkpoint of either layout: both sets of files, and only a config.json of either required."""
        return CheckpointFiles(f"{self.kind} or {other.kind}", tuple(dict.fromkeys(self.patterns + other.patterns)),
                               (self.required[0] + other.required[0],))

    def indexes(self, root: Path) -> list[Path]:
        """The safetensors indexes of the directory that ps3edge reads (those its patterns match)."""
        names = [p.relative_to(root).as_posix() for p in root.rglob("*" + INDEX_SUFFIX) if p.is_file()]
        return [root / n for n in sorted(filter_repo_objects(names, allow_patterns=list(self.patterns)))]

    def missing(self, root: Path) -> str | None:
        """The first required file the directory lacks (or a shard its safetensors index names)."""
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        for group in self.required:
            if not any(fnmatch.filter(present, pattern) for pattern in group):
                return " or ".join(group)
        for index in self.indexes(root):
            for shard in index_names(index):
                name = posixpath.join(posixpath.dirname(index.relative_to(root).as_posix()), shard)
                if name not in present:
                    return name
        return None


def index_names(index: Path) -> list[str]:
    """The files a safetensors index names (none when it cannot be read: its loader says why)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
        return sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, AttributeError):
        return []


def check_revision(revision: str, what: str) -> str:
    """`revision` if it is a commit hash or a branch or tag name by git's rules for ref names (which
    keep refs/<revision> inside the cache's refs/: no '..', no part starting with '.', no leading,
    trailing or doubled '/', no space, control character or ~ ^ : ? * [ \\); else one line naming `what`."""
    refused = (not revision or ".." in revision or "@{" in revision or revision == "@" or revision.endswith(".")
               or REF_NAME_REFUSED.search(revision)
               or any(not part or part.startswith(".") or part.endswith(".lock") for part in revision.split("/")))
    if REGEX_COMMIT_HASH.fullmatch(revision) or not refused:
        return revision
    raise Ps3EdgeError(f"{what} {revision!r} is no branch, tag or commit hash: a revision is a git ref name "
                       "(no '..', no part starting with '.', no leading or trailing '/', no spaces or ~^:?*[\\) "
                       "or a 40-character commit hash")


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None = None          # None: the repo's default branch

    def __post_init__(self):
        if self.revision is not None:
            check_revision(self.revision, f"{self.repo_id}: revision")

    @property
    def ref(self) -> str:
        return self.revision or constants.DEFAULT_REVISION

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def _resolved(path: Path) -> Path:
    """`path` with every link followed (a loop is one line)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):        # RuntimeError: Python < 3.13 on a symlink loop
        raise Ps3EdgeError(f"{path} is a symlink loop") from None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory, and for a hub checkpoint the repo, the revision asked for and the
    commit it resolved to (the snapshot directory is that commit's). `links_within`: for a snapshot,
    the repo's cache folder, inside which its files must resolve (its links lead to the blobs beside
    it); None for a local directory, whose links are followed wherever they lead."""
    path: Path
    hub: HubId | None = None
    commit: str | None = None
    links_within: Path | None = None

    def sub(self, folder: str) -> "Checkpoint":
        """The part of the checkpoint in `folder` (VILA-HD's vision_tower/), from the same commit."""
        return Checkpoint(self.path / folder, self.hub, self.commit, self.links_within)

    def source_fields(self) -> dict:
        """What the manifest's `source` records beside the path and the files' sha256."""
        if self.hub is None:
            return {}
        return {"repo_id": self.hub.repo_id, "revision": self.hub.ref, "commit": self.commit}

    def file(self, path: Path) -> Path:
        """`path` (a file of the checkpoint) as ps3edge may read it: for a snapshot, refused unless it
        resolves, links followed, inside the repo's cache folder."""
        if self.links_within is None:
            return path
        folder = _resolved(self.links_within)
        target = _resolved(path)
        if target != folder and folder not in target.parents:
            repo = f"{self.hub.repo_id}'s" if self.hub else "the repo's"
            raise Ps3EdgeError(f"{path} in the Hugging Face cache links to {target}, outside {repo} cache folder "
                               f"{folder} (huggingface_hub links a snapshot's files to the blobs/ there)")
        return path

    def named(self, index: Path, name: str) -> Path:
        """The file that `index` (a safetensors index of the checkpoint) names `name`: a relative path
        inside the checkpoint, never absolute or with '..' (and, in a snapshot, resolving as `file` says)."""
        pure = PurePosixPath(name)
        if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts:
            points = Path(name) if pure.is_absolute() else Path(posixpath.normpath(index.parent / name))
            raise Ps3EdgeError(f"{index} names the weight file {name!r}, which points to {points}, outside the "
                               f"checkpoint directory {self.path}: an index names its files by relative paths "
                               "inside it, with no '..'")
        return self.file(index.parent / name)

    def check(self, files: CheckpointFiles) -> "Checkpoint":
        """The rules of `file` and `named` applied to the whole checkpoint before anything reads it
        (transformers reads an LLM's shards itself): every file and link of a snapshot, and the names
        of every safetensors index ps3edge reads."""
        if self.links_within is not None:
            for entry in sorted(self.path.rglob("*")):
                if entry.is_symlink() or entry.is_file():
                    self.file(entry)
        for index in files.indexes(self.path):
            for name in index_names(index):
                self.named(index, name)
        return self


def recorded_checkpoint(source: Mapping) -> Checkpoint:
    """The checkpoint a manifest's `source` (kind "checkpoint") names: its directory, and for one
    from the hub its repo, revision and commit, its files held inside the repo's cache folder."""
    path = Path(source["path"])
    if not source.get("repo_id"):
        return Checkpoint(path)
    folder = repo_folder_name(repo_id=source["repo_id"], repo_type="model")
    return Checkpoint(path, HubId(source["repo_id"], source.get("revision")), source.get("commit"),
                      next((p for p in path.parents if p.name == folder), path))


def parse_hub_id(spec: str) -> HubId | None:
    """`owner/name` or `owner/name@revision` as huggingface_hub validates repo ids; else None. A
    revision that no branch, tag or commit can have is refused (check_revision)."""
    repo_id, at, revision = str(spec).partition("@")
    if repo_id.count("/") != 1 or (at and not revision.strip()):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubId(repo_id, revision or None)


def with_revision(spec: str, revision: str | None) -> str:
    """`spec` with a --revision folded in (`owner/name@revision`), refused where it means nothing."""
    if revision is None:
        return spec
    hub = parse_hub_id(spec)
    if not revision.strip() or hub is None or Path(spec).is_dir():
        raise Ps3EdgeError(f"--revision applies to a Hugging Face hub id (owner/name), not to '{spec}'"
                           if revision.strip() else "--revision is empty")
    check_revision(revision, "--revision")
    if hub.revision not in (None, revision):
        raise Ps3EdgeError(f"'{spec}' already names revision {hub.revision}; --revision {revision} disagrees")
    return f"{hub.repo_id}@{revision}"


def locate(spec: str, files: CheckpointFiles, progress: Callable[[str], None] | None = None) -> Checkpoint | None:
    """A local checkpoint directory, or the snapshot of a hub id (fetched when needed); None when
    `spec` is neither. Callers try their preset names first: a preset always wins."""
    if Path(spec).is_dir():
        return Checkpoint(Path(spec)).check(files)
    hub = parse_hub_id(spec)
    return None if hub is None else fetch(hub, files, progress)


def fetch(hub: HubId, files: CheckpointFiles, progress: Callable[[str], None] | None = None) -> Checkpoint:
    """The snapshot of `hub` with `files`: from the cache when it is complete there, else downloaded."""
    say = progress or (lambda msg: None)
    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=hub.repo_id, repo_type="model")
    _check_ref(repo, hub)
    try:
        cached = Path(snapshot_download(hub.repo_id, revision=hub.ref, allow_patterns=list(files.patterns),
                                        local_files_only=True))
    except LocalEntryNotFoundError:
        cached = None
    checkpoint = None if cached is None else _snapshot(cached, hub, repo, files)
    lacking = None if cached is None else files.missing(cached)
    if checkpoint is not None and lacking is None:
        return checkpoint
    if constants.HF_HUB_OFFLINE:
        what = f"is not in the Hugging Face cache {constants.HF_HUB_CACHE}" if cached is None else \
            f"is in the Hugging Face cache ({cached}) without {lacking}"
        raise Ps3EdgeError(f"{hub} {what}, and HF_HUB_OFFLINE is set: fetch it with `{fetch_command(hub, files)}`")
    say(f"downloading {hub} from the Hugging Face hub into {constants.HF_HUB_CACHE}")
    path = Path(_download(hub, files))
    checkpoint = _snapshot(path, hub, repo, files)
    lacking = files.missing(path)
    if lacking is not None:
        raise Ps3EdgeError(f"the snapshot of {hub} (commit {path.name}, {path}) lacks {lacking}, which ps3edge "
                           f"needs of a {files.kind} checkpoint")
    return checkpoint


def _check_ref(repo: Path, hub: HubId) -> None:
    """refs/<revision> of the repo's cache folder, where there is one, holds a commit hash (what
    huggingface_hub writes there): never a path that would make another directory the snapshot."""
    if REGEX_COMMIT_HASH.fullmatch(hub.ref):
        return
    ref = repo / "refs" / hub.ref
    if not ref.exists() and not ref.is_symlink():
        return                                   # not cached: snapshot_download says so
    Checkpoint(ref, hub, links_within=repo).file(ref)
    if not ref.is_file():
        raise Ps3EdgeError(f"revision {hub.ref!r} of {hub.repo_id} names {ref} in the Hugging Face cache, "
                           "which is no ref (a file holding a commit hash)")
    held = ref.read_text(errors="replace")
    if not REGEX_COMMIT_HASH.fullmatch(held):
        raise Ps3EdgeError(f"{ref} in the Hugging Face cache holds {held[:80]!r}, not a commit hash "
                           f"(40 hexadecimal characters), so it names no snapshot of {hub.repo_id}")


def _snapshot(path: Path, hub: HubId, repo: Path, files: CheckpointFiles) -> Checkpoint:
    """A snapshot directory as snapshot_download returns it, <repo folder>/snapshots/<commit>, its
    files checked (Checkpoint.check)."""
    if path.parent != repo / "snapshots" or not REGEX_COMMIT_HASH.fullmatch(path.name):
        raise Ps3EdgeError(f"the snapshot of {hub} is {path}, not a commit's folder in {repo / 'snapshots'}")
    return Checkpoint(path, hub, path.name, links_within=repo).check(files)


def fetch_command(hub: HubId, files: CheckpointFiles) -> str:
    """The `hf` command that puts what ps3edge reads of `hub` into the cache."""
    revision = f" --revision {shlex.quote(hub.revision)}" if hub.revision else ""
    return f"hf download {hub.repo_id}{revision} --include {' '.join(map(shlex.quote, files.patterns))}"


def _download(hub: HubId, files: CheckpointFiles) -> str:
    """snapshot_download online, its failures as one line each."""
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        return snapshot_download(hub.repo_id, revision=hub.ref, allow_patterns=list(files.patterns))
    except GatedRepoError:
        raise Ps3EdgeError(f"{hub.repo_id} is a gated repo: accept its conditions at {constants.ENDPOINT}/"
                           f"{hub.repo_id} and {login} with a token that has access") from None
    except RepositoryNotFoundError:
        raise Ps3EdgeError(f"'{hub.repo_id}' is no local directory and no model repo on the Hugging Face hub "
                           f"(a private one needs a token: {login})") from None
    except RevisionNotFoundError:
        raise Ps3EdgeError(f"{hub.repo_id} has no revision '{hub.ref}' on the Hugging Face hub") from None
    except LocalEntryNotFoundError:      # what snapshot_download raises when the hub cannot be reached
        raise Ps3EdgeError(f"cannot reach the Hugging Face hub for {hub}, and it is not in the cache "
                           f"{constants.HF_HUB_CACHE}: fetch it where there is network with "
                           f"`{fetch_command(hub, files)}`") from None
    except (EntryNotFoundError, HfHubHTTPError) as e:
        if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code == 401:
            raise Ps3EdgeError(f"the Hugging Face hub refused {hub.repo_id} without a valid token: {login}") from None
        raise Ps3EdgeError(f"downloading {hub} from the Hugging Face hub failed: "
                           f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
