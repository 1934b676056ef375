"""Checkpoints named by Hugging Face hub id: resolved from a Hugging Face cache laid out on disk as
huggingface_hub writes it (no network: sockets refuse to connect), recorded in the manifest,
refused in one line; sharded safetensors loaded one tensor at a time."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import weakref
from pathlib import Path

import huggingface_hub
import pytest
import requests
import torch
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open
from safetensors.torch import save_file

import ps3edge.model.hub as hub
import ps3edge.model.weights as weights
from conftest import clean_env, cli_process, random_image
from conftest import cli as run_cli
from ps3edge.artifact.manifest import load_manifest
from ps3edge.errors import Ps3EdgeError
from ps3edge.llm.vila import VILA_FILES
from ps3edge.model import build, load_checkpoint, preset, random_model, save_checkpoint
from ps3edge.model.hub import Checkpoint, HubId, fetch, locate, parse_hub_id, recorded_checkpoint, with_revision
from ps3edge.model.weights import PS3_FILES
from test_bad_input import assert_one_line_error

COMMIT_MAIN = hashlib.sha1(b"main").hexdigest()
COMMIT_V2 = hashlib.sha1(b"v2").hexdigest()


# --- a Hugging Face cache on disk ----------------------------------------------------------------

def put_snapshot(cache: Path, repo_id: str, src: Path, commit: str, refs=("main",)) -> Path:
    """`src`'s files as huggingface_hub caches a download of `repo_id` at `commit`: content-addressed
    blobs, the snapshot's relative symbolic links to them, and refs/<ref> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, HF_HUB_OFFLINE=1 and no network. huggingface_hub reads its
    environment at import, so its constants are set as a process started with these variables has them."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1"),
                        ("PS3EDGE_CACHE", str(tmp_path / "ps3edge-cache"))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise OSError("the tests have no network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def online(monkeypatch):
    """HF_HUB_OFFLINE unset (the network stays disabled)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def cli(*args):
    return run_cli(*args, env=clean_env(columns="400"))


@pytest.fixture(scope="module")
def ps3_dirs(tmp_path_factory):
    """Two tiny PS3 checkpoints with different weights (seeds 11 and 12)."""
    root = tmp_path_factory.mktemp("ps3-ckpt")
    for seed in (11, 12):
        save_checkpoint(random_model(preset("ps3-tiny"), seed=seed), root / f"seed{seed}")
    return root


@pytest.fixture(scope="module")
def vila_dir(tmp_path_factory):
    from ps3edge.llm.vila import build_vila, save_vila
    return save_vila(build_vila("vila-hd-tiny", seed=4), tmp_path_factory.mktemp("vila-ckpt") / "ck")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- naming -----------------------------------------------------------------------------------

def test_hub_ids_and_revisions_are_parsed():
    assert parse_hub_id("nvidia/PS3-4K-SigLIP") == HubId("nvidia/PS3-4K-SigLIP")
    assert parse_hub_id("owner/name@v1.0") == HubId("owner/name", "v1.0")
    for not_an_id in ("ps3-tiny", "vila-hd-tiny", "/abs/dir", "a/b/c", "./x", "owner/name@", "owner/na me", "o--x/y"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    assert with_revision("owner/name", None) == "owner/name"
    assert with_revision("owner/name", "v2") == "owner/name@v2"
    assert with_revision("owner/name@v2", "v2") == "owner/name@v2"
    with pytest.raises(Ps3EdgeError, match="already names revision v1"):
        with_revision("owner/name@v1", "v2")
    with pytest.raises(Ps3EdgeError, match="applies to a Hugging Face hub id"):
        with_revision("ps3-tiny", "v2")


def test_download_patterns_are_the_files_ps3edge_reads():
    """What snapshot_download keeps of repos as they are published (other formats and docs left out)."""
    ps3_repo = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin", "README.md",
                ".gitattributes", "assets/teaser.png"]
    assert list(filter_repo_objects(ps3_repo, allow_patterns=list(PS3_FILES.patterns))) == [
        "config.json", "preprocessor_config.json", "model.safetensors"]
    vila_repo = ["config.json", "README.md", "trainer_state.json", "llm/config.json", "llm/generation_config.json",
                 "llm/merges.txt", "llm/vocab.json", "llm/tokenizer.json", "llm/tokenizer_config.json",
                 "llm/model.safetensors.index.json", "llm/model-00001-of-00004.safetensors",
                 "llm/pytorch_model.bin", "vision_tower/config.json", "vision_tower/model.safetensors",
                 "mm_projector/config.json", "mm_projector/model.safetensors", "mm_projector/pytorch_model.bin"]
    kept = list(filter_repo_objects(vila_repo, allow_patterns=list(VILA_FILES.patterns)))
    assert kept == [f for f in vila_repo if f not in ("README.md", "trainer_state.json", "llm/pytorch_model.bin",
                                                       "mm_projector/pytorch_model.bin")]


# --- resolved from the cache, no network ------------------------------------------------------------

def test_export_and_inspect_a_hub_checkpoint_offline(hf_cache, ps3_dirs, tmp_path):
    put_snapshot(hf_cache, "owner/ps3-tiny", ps3_dirs / "seed11", COMMIT_MAIN)
    out = tmp_path / "art"
    r = cli("export", "--model", "owner/ps3-tiny", "--out", out)
    assert r.returncode == 0, r.stderr
    source = load_manifest(out).source
    assert source["repo_id"] == "owner/ps3-tiny" and source["revision"] == "main" and source["commit"] == COMMIT_MAIN
    assert source["sha256"] == load_checkpoint(ps3_dirs / "seed11").source["sha256"]      # the same files
    assert source["path"] == str(hf_cache / "models--owner--ps3-tiny" / "snapshots" / COMMIT_MAIN)
    shown = cli("inspect", out)
    assert shown.returncode == 0, shown.stderr
    assert f"Hugging Face hub owner/ps3-tiny revision main, commit {COMMIT_MAIN}" in shown.stdout
    assert source["sha256"] in shown.stdout


def test_a_cached_snapshot_is_used_without_the_network_even_online(hf_cache, ps3_dirs, monkeypatch):
    online(monkeypatch)
    put_snapshot(hf_cache, "owner/ps3-tiny", ps3_dirs / "seed11", COMMIT_MAIN)
    put_snapshot(hf_cache, "owner/ps3-tiny", ps3_dirs / "seed12", COMMIT_V2, refs=("v2",))
    loaded = build("owner/ps3-tiny")
    assert loaded.source["commit"] == COMMIT_MAIN
    assert same_weights(loaded.model, random_model(preset("ps3-tiny"), seed=11))
    for spec in ("owner/ps3-tiny@v2", f"owner/ps3-tiny@{COMMIT_V2}"):         # a tag, or the commit itself
        other = build(spec)
        assert other.source["commit"] == COMMIT_V2 and other.source["revision"] == spec.split("@")[1]
        assert same_weights(other.model, random_model(preset("ps3-tiny"), seed=12))


def test_export_revision_flag(hf_cache, ps3_dirs, tmp_path):
    put_snapshot(hf_cache, "owner/ps3-tiny", ps3_dirs / "seed12", COMMIT_V2, refs=("v2",))
    r = cli("export", "--model", "owner/ps3-tiny", "--revision", "v2", "--out", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    assert load_manifest(tmp_path / "art").source["commit"] == COMMIT_V2
    r = cli("export", "--model", "ps3-tiny", "--revision", "v2", "--out", tmp_path / "art2")
    assert_one_line_error(r, "--revision applies to a Hugging Face hub id", absent=(tmp_path / "art2",))


def test_a_preset_and_a_local_directory_win_over_a_hub_id(hf_cache, ps3_dirs, tmp_path, monkeypatch):
    put_snapshot(hf_cache, "owner/ps3-tiny", ps3_dirs / "seed11", COMMIT_MAIN)
    local = tmp_path / "work"
    save_checkpoint(random_model(preset("ps3-tiny"), seed=12), local / "owner" / "ps3-tiny")
    save_checkpoint(random_model(preset("ps3-tiny"), seed=12), local / "ps3-tiny")
    monkeypatch.chdir(local)
    assert locate("owner/ps3-tiny", PS3_FILES) == Checkpoint(Path("owner/ps3-tiny"))
    assert "commit" not in build("owner/ps3-tiny").source
    assert build("ps3-tiny").source == {"kind": "preset", "name": "ps3-tiny", "seed": 0}


def test_chat_with_a_hub_model_path_offline(hf_cache, vila_dir, tmp_path, monkeypatch):
    import ps3edge.llm.export as export_module
    from ps3edge.artifact.vila import load_vila_manifest

    put_snapshot(hf_cache, "owner/vila-tiny", vila_dir, COMMIT_MAIN)
    img = tmp_path / "img.png"
    random_image(64, 48).save(img)
    r = cli("chat", "--model-path", "owner/vila-tiny", "--text", "hi", "--media", img, "--json",
            "--max-new-tokens", "2", "--num-look-close", "1")
    assert r.returncode == 0, r.stderr
    art = Path(json.loads(r.stdout)["artifacts"])
    assert art.name.startswith("owner--vila-tiny-")
    for source in (load_vila_manifest(art).source, load_manifest(art / "ps3").source):
        assert source["repo_id"] == "owner/vila-tiny" and source["commit"] == COMMIT_MAIN
    shown = cli("inspect", art / "ps3")
    assert f"commit {COMMIT_MAIN}" in shown.stdout, shown.stderr

    # the export cache knows the commit: a second run neither exports nor hashes the files again
    def refuse(*args, **kwargs):
        raise AssertionError("exported or hashed again")
    monkeypatch.setattr(export_module, "_export_locked", refuse)
    monkeypatch.setattr(export_module, "checkpoint_sha256", refuse)
    assert export_module.ensure_artifacts("owner/vila-tiny") == art


# --- one-line errors ------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ("export", "--model", "owner/absent", "--out", "OUT"),
    ("chat", "--model-path", "owner/absent", "--text", "hi", "--media", "IMG"),
    ("parity", "--model", "owner/absent"),
    ("bench", "--model", "owner/absent", "--device", "cpu"),
])
def test_offline_and_not_cached_is_one_line(hf_cache, tmp_path, image_file, command):
    out = tmp_path / "out"
    r = cli(*[{"OUT": out, "IMG": image_file}.get(a, a) for a in command])
    line = assert_one_line_error(r, "owner/absent is not in the Hugging Face cache", str(hf_cache),
                                 "HF_HUB_OFFLINE", "`hf download owner/absent --include ", absent=(out,))
    assert ("vision_tower" in line) == (command[0] in ("chat", "bench"))     # the files that command reads


def test_offline_revision_and_missing_files_are_one_line(hf_cache, ps3_dirs, tmp_path):
    snapshot = put_snapshot(hf_cache, "owner/ps3-tiny", ps3_dirs / "seed11", COMMIT_MAIN)
    out = tmp_path / "out"
    r = cli("export", "--model", "owner/ps3-tiny@v9", "--out", out)
    assert_one_line_error(r, "owner/ps3-tiny@v9 is not in the Hugging Face cache", "--revision v9", absent=(out,))
    (snapshot / "model.safetensors").unlink()
    r = cli("export", "--model", "owner/ps3-tiny", "--out", out)
    assert_one_line_error(r, "owner/ps3-tiny is in the Hugging Face cache", "without model.safetensors or "
                          "model.safetensors.index.json", "HF_HUB_OFFLINE", absent=(out,))


def test_a_snapshot_without_a_needed_file_after_download_is_one_line(hf_cache, ps3_dirs, tmp_path, monkeypatch):
    """The hub holds the repo, but not a file ps3edge needs (here the safetensors weights)."""
    online(monkeypatch)
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    fake_download(monkeypatch, hf_cache, tmp_path / "config-only")
    with pytest.raises(Ps3EdgeError) as e:
        build("owner/no-weights")
    assert "lacks model.safetensors or model.safetensors.index.json, which ps3edge needs of a PS3 checkpoint" \
        in str(e.value) and "\n" not in str(e.value)


def fake_download(monkeypatch, cache: Path, src: Path) -> list:
    """snapshot_download as it behaves online for a repo holding `src` at COMMIT_MAIN: the cache is
    the real one's, a download caches `src`. Returns the list of the downloads' allow_patterns."""
    calls = []
    real = hub.snapshot_download

    def download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            return real(repo_id, revision=revision, allow_patterns=allow_patterns, local_files_only=True)
        calls.append(allow_patterns)
        return str(put_snapshot(cache, repo_id, src, COMMIT_MAIN))
    monkeypatch.setattr(hub, "snapshot_download", download)
    return calls


def test_a_missing_snapshot_is_downloaded_with_the_patterns(hf_cache, ps3_dirs, monkeypatch):
    online(monkeypatch)
    calls = fake_download(monkeypatch, hf_cache, ps3_dirs / "seed11")
    said = []
    checkpoint = locate("owner/ps3-tiny", PS3_FILES, said.append)
    assert checkpoint.commit == COMMIT_MAIN and calls == [list(PS3_FILES.patterns)]
    assert said == [f"downloading owner/ps3-tiny from the Hugging Face hub into {hf_cache}"]
    assert locate("owner/ps3-tiny", PS3_FILES).commit == COMMIT_MAIN and len(calls) == 1     # cached now


@pytest.mark.parametrize("error, needles", [
    (RepositoryNotFoundError("404 Client Error. Repository Not Found"),
     ("'owner/absent' is no local directory and no model repo on the Hugging Face hub", "HF_TOKEN")),
    (GatedRepoError("403 Client Error. Cannot access gated repo"),
     ("owner/absent is a gated repo", "https://huggingface.co/owner/absent", "hf auth login")),
    (RevisionNotFoundError("404 Client Error. Revision Not Found"),
     ("owner/absent has no revision 'main' on the Hugging Face hub",)),
    (requests.exceptions.ConnectionError("Failed to establish a new connection"),
     ("cannot reach the Hugging Face hub for owner/absent", "hf download owner/absent")),
])
def test_hub_failures_are_one_line(hf_cache, monkeypatch, error, needles):
    """huggingface_hub's own snapshot_download, its hub API answering with `error`."""
    online(monkeypatch)

    def repo_info(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    with pytest.raises(Ps3EdgeError) as e:
        fetch(HubId("owner/absent"), PS3_FILES)
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_the_cache_and_offline_mode_come_from_the_environment(tmp_path):
    """A real process: HF_HUB_CACHE and HF_HUB_OFFLINE as the user sets them."""
    cache = tmp_path / "cache"
    r = cli_process("export", "--model", "owner/absent@v1", "--out", tmp_path / "out",
                    env=clean_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    assert_one_line_error(r, "owner/absent@v1 is not in the Hugging Face cache", str(cache),
                          "--revision v1", absent=(tmp_path / "out",))


# --- sharded checkpoints ----------------------------------------------------------------------

def shard(src: Path, dst: Path, parts: int = 3) -> Path:
    """`src` (a PS3 checkpoint) with its model.safetensors split into `parts` shards and an index."""
    dst.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    keys = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        part = keys[i::parts]
        save_file({k: tensors[k] for k in part}, str(dst / name))
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


class LiveTensors:
    """safe_open whose tensors are counted while alive: the most bytes read from the files and
    not yet released at any one time."""

    def __init__(self):
        self.live = self.peak = 0

    def _released(self, nbytes: int):
        self.live -= nbytes

    def open(self, *args, **kwargs):
        counter = self

        class Counted:
            def __enter__(self):
                self.f = safe_open(*args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                nbytes = t.numel() * t.element_size()
                counter.live += nbytes
                counter.peak = max(counter.peak, counter.live)
                weakref.finalize(t, counter._released, nbytes)
                return t
        return Counted()


def test_sharded_weights_load_one_tensor_at_a_time(ps3_dirs, tmp_path, monkeypatch):
    sharded = shard(ps3_dirs / "seed11", tmp_path / "sharded")
    counter = LiveTensors()
    monkeypatch.setattr(weights, "safe_open", counter.open)
    loaded = load_checkpoint(sharded)
    assert same_weights(loaded.model, random_model(preset("ps3-tiny"), seed=11))
    sizes = [t.numel() * t.element_size() for t in loaded.model.state_dict().values()]
    # never a second copy of the weights: at most one tensor read from the files is alive at a time
    assert counter.peak == max(sizes) < sum(sizes)
    assert counter.live == 0


def test_a_sharded_hub_snapshot_and_a_missing_shard(hf_cache, ps3_dirs, tmp_path):
    sharded = shard(ps3_dirs / "seed11", tmp_path / "sharded")
    snapshot = put_snapshot(hf_cache, "owner/sharded", sharded, COMMIT_MAIN)
    loaded = build("owner/sharded")           # the snapshot's shards link to the cache's blobs
    assert same_weights(loaded.model, random_model(preset("ps3-tiny"), seed=11))
    again = load_checkpoint(recorded_checkpoint(loaded.source))       # as the torch backend rebuilds it
    assert again.source == loaded.source and same_weights(again.model, loaded.model)
    (snapshot / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(Ps3EdgeError, match="without model-00002-of-00003.safetensors") as e:
        build("owner/sharded")
    assert "\n" not in str(e.value)


def test_a_vila_checkpoint_with_a_sharded_llm(vila_dir, tmp_path):
    from ps3edge.llm.vila import load_vila

    ck = tmp_path / "ck"
    for f in vila_dir.rglob("*"):
        if f.is_file() and not (f.parent.name == "llm" and f.name == "model.safetensors"):
            (ck / f.relative_to(vila_dir)).parent.mkdir(parents=True, exist_ok=True)
            (ck / f.relative_to(vila_dir)).write_bytes(f.read_bytes())
    whole = load_vila(vila_dir)
    whole.llm.save_pretrained(str(ck / "llm"), safe_serialization=True, max_shard_size="100KB")
    assert (ck / "llm" / "model.safetensors.index.json").is_file()
    assert len(list((ck / "llm").glob("model-*.safetensors"))) > 2
    assert VILA_FILES.missing(ck) is None
    assert same_weights(load_vila(ck).llm, whole.llm)
