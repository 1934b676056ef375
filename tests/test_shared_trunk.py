"""The trunk's weights once on disk (trunk.onnx.data, exporter/share.py) and once in memory (the
onnxruntime runner's SharedWeights): what the export writes, that every reader of the stage
files still reads them, and that two onnxruntime sessions hold one copy."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from ps3edge import defaults
from ps3edge.artifact.manifest import load_manifest
from ps3edge.errors import Ps3EdgeError
from ps3edge.exporter.share import external_ref

SHARED = defaults.SHARED_WEIGHTS_FILE


@pytest.fixture(scope="module")
def tiny_shared(tmp_path_factory):
    """ps3-tiny (seed 0, as the `artifacts` fixture's) exported with its trunk in trunk.onnx.data."""
    from ps3edge.exporter.onnx_export import export

    out = tmp_path_factory.mktemp("shared") / "tiny"
    export("ps3-tiny", out, share_weights=True)
    return out


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """A model whose trunk (6 blocks of width 512: 76 MB) is over SHARED_WEIGHTS_MIN_BYTES, so the
    default export shares it; the rest kept small so that it exports in seconds."""
    from ps3edge.exporter.onnx_export import export
    from ps3edge.model.config import preset
    from ps3edge.model.weights import LoadedModel, random_model

    cfg = preset("ps3-tiny").replace(name="ps3-mid", width=512, num_heads=8, mlp_dim=2048, depth=6)
    model = random_model(cfg, 0)
    out = tmp_path_factory.mktemp("shared") / "mid"
    export(LoadedModel(model, cfg, {"kind": "preset", "name": "ps3-tiny", "seed": 0}), out)
    trunk = sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith("trunk.blocks."))
    params = sum(p.numel() * 4 for p in model.parameters())
    return out, trunk, params


def _contents(art: Path, graph: str) -> dict:
    """content key (dtype, dims, sha256) -> where its bytes are, for every initializer of one
    graph: ("external", file, offset, length) or ("graph",)."""
    model = onnx.load(str(art / graph), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        ref = external_ref(t)
        if ref is None:
            data, where = onnx.numpy_helper.to_array(t).tobytes(), ("graph",)
        else:
            with open(art / ref.location, "rb") as f:
                f.seek(ref.offset)
                data = f.read(ref.length)
            where = ("external", ref.location, ref.offset, ref.length)
        out[(t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())] = where
    return out


def test_each_shared_tensor_is_on_disk_once(mid):
    art, trunk_bytes, param_bytes = mid
    manifest = load_manifest(art)
    assert SHARED in manifest.files
    assert SHARED in manifest.stages["lowres"].external_data and SHARED in manifest.stages["highres"].external_data
    assert manifest.stages["lowres"].file == "lowres.onnx"              # StageSpec.file stays the graph
    low, high = _contents(art, "lowres.onnx"), _contents(art, "highres.onnx")
    common = set(low) & set(high)
    # every tensor both graphs hold is at one place in the shared file, the same for both
    big = [k for k in common if low[k] != ("graph",)]
    assert big and all(low[k] == high[k] and low[k][1] == SHARED for k in big)
    stored = sum(low[k][3] for k in big)
    assert stored >= trunk_bytes                                        # the blocks, and the patch embedding's bias...
    assert (art / SHARED).stat().st_size < stored + defaults.EXTERNAL_DATA_ALIGNMENT * len(big)
    assert all(low[k][2] % defaults.EXTERNAL_DATA_ALIGNMENT == 0 for k in big)
    # no shared content left anywhere else: the artifact is about the parameters once (plus the
    # highres position table, which replaces the residuals), not the trunk twice
    artifact = sum(f.stat().st_size for f in art.iterdir())
    assert artifact < 1.15 * param_bytes < artifact + trunk_bytes


def test_graphs_load_run_and_match_the_unshared_export(artifacts, tiny_shared):
    """The files with the shared data file compute bit for bit what the export without it does
    (plain sessions); the runner (shared in memory, no pre-packing) within the FP32 bound."""
    import onnxruntime as ort

    from ps3edge.runtime.runners.onnxruntime import BACKEND
    from ps3edge.model.patches import PatchTaps, gather_patches

    plain = artifacts("ps3-tiny")
    shared_m, plain_m = load_manifest(tiny_shared), load_manifest(plain)
    assert shared_m.weights_sha256 == plain_m.weights_sha256
    assert SHARED not in plain_m.files
    rng = np.random.default_rng(0)
    cfg = plain_m.config
    feeds = {"lowres": {"pixels": rng.standard_normal((1, 3, cfg.max_size, cfg.max_size), dtype=np.float32)}}
    outs = {}
    for art in (plain, tiny_shared):
        sessions = {s: ort.InferenceSession(str(art / f"{s}.onnx"), providers=["CPUExecutionProvider"])
                    for s in ("lowres", "highres")}
        low = sessions["lowres"].run(None, feeds["lowres"])
        cut = gather_patches(feeds["lowres"]["pixels"], np.zeros(16, int), np.arange(16), PatchTaps.of(cfg), 16)
        steps = {"patches": cut[None], "positions": np.arange(16, dtype=np.int32)[None],
                 "step_image": np.zeros(1, np.int32), "kv_cache": low[1]}
        outs[art] = low + sessions["highres"].run(None, steps)
        feeds["highres"] = steps
    for a, b in zip(outs[plain], outs[tiny_shared]):
        np.testing.assert_array_equal(a, b)
    stages = {art: BACKEND.load_stages(art, load_manifest(art)) for art in (plain, tiny_shared)}
    for stage in ("lowres", "highres"):
        a, b = (stages[art][stage].infer(feeds[stage]) for art in (plain, tiny_shared))
        assert all(np.abs(a[k] - b[k]).max() <= 1e-5 for k in a)


def test_manifest_verifies_the_shared_file(tiny_shared, tmp_path):
    from conftest import cli

    load_manifest(tiny_shared, verify=True)
    broken = tmp_path / "art"
    shutil.copytree(tiny_shared, broken)
    data = bytearray((broken / SHARED).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / SHARED).write_bytes(bytes(data))
    with pytest.raises(Ps3EdgeError, match=f"{SHARED} was changed after export"):
        load_manifest(broken, verify=True)
    result = cli("inspect", str(broken))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"{SHARED} was changed after export" in result.stderr


_OPEN = textwrap.dedent("""
    import json, sys
    from ps3edge.artifact.manifest import load_manifest
    from ps3edge.runtime.runners.onnxruntime import BACKEND
    def rss():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
    manifest = load_manifest(sys.argv[1], verify=False)
    before = rss()
    stages = BACKEND.load_stages(sys.argv[1], manifest)
    print(json.dumps(rss() - before))
""")


def test_onnxruntime_sessions_share_the_trunk_in_memory(mid):
    """Opening lowres and highres costs about one copy of the weights: at least most of a trunk
    less than with PS3EDGE_ORT_SHARED_WEIGHTS=0 (each session its own copy)."""
    from conftest import clean_env

    art, trunk_bytes, _ = mid

    def opened(**env) -> int:
        done = subprocess.run([sys.executable, "-c", _OPEN, str(art)], env=clean_env(OMP_NUM_THREADS="1", **env),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    shared, own = opened(), opened(PS3EDGE_ORT_SHARED_WEIGHTS="0")
    weights_once = sum((art / f).stat().st_size for f in ("lowres.onnx", "highres.onnx", "selector.onnx", SHARED))
    assert own - shared >= 0.75 * trunk_bytes, (shared, own, trunk_bytes)
    assert shared < weights_once + 100 * 2 ** 20, (shared, weights_once)


def test_lint_calibrate_build_plan_and_triton_repo_read_the_shared_file(tiny_shared, tmp_path):
    from conftest import cli
    from ps3edge.calibration.calibrate import CalibrationOptions, calibrate
    from ps3edge.engines.builder import BuildOptions
    from ps3edge.engines.plan import plan_build
    from ps3edge.exporter.lint import lint_artifacts

    art = tmp_path / "art"
    shutil.copytree(tiny_shared, art)
    report, _ = lint_artifacts(art)
    assert not [f for f in report.findings if f.severity == "error"]
    # build: the engine cache key covers every file the parser reads, the shared one included
    plans = plan_build(load_manifest(art), BuildOptions(), "10.3.0", 87)
    assert all(SHARED in p.source_files for p in plans if p.stage in ("lowres", "highres"))
    # calibrate writes FP16 stages with their own copy of every weight (self-contained files)
    calibrate(art, CalibrationOptions("fp16", report=False))
    manifest = load_manifest(art, verify=True)
    for stage in manifest.precisions["fp16"].stages.values():
        assert SHARED not in stage.external_data
    assert SHARED in manifest.files
    repo = tmp_path / "repo"
    result = cli("triton-repo", str(art), "--out", str(repo), "--num-look-close", "1")
    assert result.returncode == 0, result.stderr
    copied = repo / "ps3" / "1" / "artifact"
    assert (copied / SHARED).is_file()
    load_manifest(copied, verify=True)
