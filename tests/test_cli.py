"""End-to-end behaviour of the `ps3edge` command line: in this process through the console script's
main() (conftest.cli), and as real subprocesses where the process itself is what is tested (the entry
points, --help, one full run)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import SCRIPT, clean_env, cli, cli_process, random_image
from ps3edge.artifact.manifest import Manifest, load_manifest
from ps3edge.defaults import MANIFEST_SCHEMA_VERSION

LOWRES_TOKENS = 729
TINY_WIDTH = 64


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result


def read_outputs(path: Path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors["__metadata__"] = f.metadata()
    return tensors


def check_output_file(out: dict, high_res_tokens: int | None = None) -> int:
    """The contract of a features file; returns the number of high-res tokens."""
    features = out["features"]
    assert features.dtype == np.float32 and features.ndim == 3
    assert features.shape[0] == 1 and features.shape[2] == TINY_WIDTH
    assert np.all(np.isfinite(features))
    assert out["prob"].shape == (27, 27) and out["prob"].dtype == np.float32
    assert np.all((out["prob"] >= 0) & (out["prob"] <= 1))
    m756, m1512 = out["selection_map_756"], out["selection_map_1512"]
    assert m756.shape == (54, 54) and m1512.shape == (108, 108)
    assert m756.dtype == np.uint8 and m1512.dtype == np.uint8
    assert set(np.unique(m756)) <= {0, 1} and set(np.unique(m1512)) <= {0, 1}
    selected = int(m756.sum()) + int(m1512.sum())
    assert features.shape[1] == LOWRES_TOKENS + selected
    if high_res_tokens is not None:
        assert selected == high_res_tokens
    meta = out["__metadata__"]
    assert meta["tokens_each_scale"] == f"lowres:{LOWRES_TOKENS},756:{int(m756.sum())},1512:{int(m1512.sum())}"
    return selected


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    random_image(400, 300, seed=3).save(d / "input.png")
    return d


@pytest.fixture(scope="module")
def exported(workdir) -> Path:
    """ps3-tiny exported through `ps3edge export`."""
    out = workdir / "art"
    result = ok(cli("export", "--model", "ps3-tiny", "--out", out))
    assert f"wrote {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def runs(workdir, exported) -> dict:
    """backend -> outputs of `ps3edge run` with two look-close steps, plus the overlay path."""
    results = {}
    for backend in ("onnxruntime", "torch"):
        out, overlay = workdir / f"{backend}.safetensors", workdir / f"{backend}.png"
        result = ok(cli("run", exported, "--image", workdir / "input.png", "--out", out, "--overlay", overlay,
                        "--backend", backend, "--num-look-close", "2"))
        results[backend] = {"stdout": result.stdout, "out": read_outputs(out), "overlay": overlay, "path": out}
    return results


# --- entry points ---------------------------------------------------------------------------

def test_console_script_and_module_entry_point_agree():
    from ps3edge import __version__

    module = ok(subprocess.run([sys.executable, "-m", "ps3edge.cli", "version"], env=clean_env(),
                               capture_output=True, text=True, timeout=120))
    assert module.stdout.strip() == __version__
    if SCRIPT.is_file():
        assert ok(cli_process("version")).stdout.strip() == __version__
    assert ok(cli("version")).stdout.strip() == __version__          # the in-process runner agrees


def test_the_in_process_runner_shows_an_escaped_exception_as_a_traceback(monkeypatch):
    """What the checks for "no traceback" rely on: an exception main() lets through is a traceback
    on stderr and exit code 1 from conftest.cli, as from a real process, not a pass."""
    import ps3edge.cli as cli_module

    def escaping_main():           # main()'s own net turns everything into one line; this one lets it out
        raise RuntimeError("a bug")
    monkeypatch.setattr(cli_module, "main", escaping_main)
    result = cli("version")
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError: a bug" in result.stderr


def test_help_lists_the_commands():
    result = ok(cli_process("--help"))
    for command in ("demo", "export", "run", "parity", "inspect"):
        assert command in result.stdout


# --- demo -----------------------------------------------------------------------------------

def test_demo_writes_artifact_features_and_overlay(tmp_path):
    out = tmp_path / "demo"
    ok(cli("demo", "--out", out))
    assert (out / "artifacts" / "manifest.json").is_file()
    for stage in ("lowres", "selector", "highres"):
        assert (out / "artifacts" / f"{stage}.onnx").is_file()
    # one look-close step by default, so the overlay shows a choice
    check_output_file(read_outputs(out / "features.safetensors"), high_res_tokens=2560)
    with Image.open(out / "overlay.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and max(im.size) <= 1024
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# --- export and inspect ---------------------------------------------------------------------

def test_export_writes_manifest_and_stage_files(exported):
    manifest = load_manifest(exported)
    assert manifest.source == {"kind": "preset", "name": "ps3-tiny", "seed": 0}
    assert manifest.returned_layers == (2, 3)               # -2,-1 of a 4-block model
    assert sorted(manifest.files) == ["highres.onnx", "lowres.onnx", "prior_prompt.npy", "selector.onnx"]
    assert sorted(p.name for p in exported.iterdir()) == sorted([*manifest.files, "manifest.json"])
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".art.")]  # no staging left


def test_export_refuses_to_overwrite_without_flag_and_replaces_with_it(exported, tmp_path):
    out = tmp_path / "again"
    ok(cli("export", "--model", "ps3-tiny", "--out", out, "--layers", "-1"))
    refused = cli("export", "--model", "ps3-tiny", "--out", out)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert load_manifest(out).returned_layers == (3,)
    ok(cli("export", "--model", "ps3-tiny", "--out", out, "--overwrite", "--seed", "5"))
    manifest = load_manifest(out)
    assert manifest.returned_layers == (2, 3) and manifest.source["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_inspect_summarises_the_artifact(exported):
    result = ok(cli("inspect", exported))
    text = result.stdout
    assert f"schema v{MANIFEST_SCHEMA_VERSION}" in text and "opset 17" in text
    assert "up to 8 images per pass" in text
    assert "ps3-tiny" in text and "preset ps3-tiny (seed 0)" in text
    assert "[378, 756, 1512]" in text and "[27, 54, 108]" in text
    assert "512+2048" in text
    for stage in ("lowres.onnx", "selector.onnx", "highres.onnx"):
        assert stage in text
    assert "all sha256 match the manifest" in text


def test_inspect_json_is_the_manifest(exported):
    result = ok(cli("inspect", exported, "--json"))
    printed = json.loads(result.stdout)
    assert printed == json.loads((exported / "manifest.json").read_text())
    for key in ("schema_version", "producer", "model", "source", "returned_layers", "opset", "precision",
                "geometry", "defaults", "preprocessing", "stages", "files"):
        assert key in printed
    manifest = Manifest.from_dict(printed)
    assert set(manifest.stages) == {"lowres", "selector", "highres"}
    assert manifest.geometry.highres_patches_total == 2916 + 11664
    assert manifest.look_close_defaults.select_num_each_scale == (512, 2048)
    assert manifest.preprocessing.mean == (0.5, 0.5, 0.5)


# --- run ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_run_writes_features_prob_and_selection_maps(runs, backend):
    out = runs[backend]["out"]
    assert check_output_file(out, high_res_tokens=2 * 2560) == 5120
    assert out["features"].shape == (1, LOWRES_TOKENS + 5120, TINY_WIDTH)
    # each step takes 512 + 2048 patches, so two steps take twice that
    assert int(out["selection_map_756"].sum()) == 1024 and int(out["selection_map_1512"].sum()) == 4096
    assert out["__metadata__"]["layer"] == "2"               # the default --layer -2
    stdout = runs[backend]["stdout"]
    assert "look-close on" in stdout and backend in stdout and "(1, 5849, 64)" in stdout
    assert "highres calls (T steps x N tokens): [(2, 2560)]" in stdout


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_run_writes_an_overlay_png_of_the_image_size(runs, backend):
    with Image.open(runs[backend]["overlay"]) as im:
        assert im.format == "PNG" and im.size == (400, 300) and im.mode == "RGB"
        pixels = np.asarray(im)
    original = np.asarray(random_image(400, 300, seed=3))
    assert not np.array_equal(pixels, original)               # selected patches are tinted


def test_onnxruntime_and_torch_backends_agree(runs):
    a, b = runs["onnxruntime"]["out"], runs["torch"]["out"]
    assert a["features"].shape == b["features"].shape
    assert np.abs(a["features"] - b["features"]).max() <= 1e-3
    assert np.abs(a["prob"] - b["prob"]).max() <= 1e-5
    assert np.array_equal(a["selection_map_756"], b["selection_map_756"])
    assert np.array_equal(a["selection_map_1512"], b["selection_map_1512"])


def test_run_outputs_get_the_usual_file_permissions(runs):
    mask = os.umask(0)
    os.umask(mask)
    for backend in ("onnxruntime", "torch"):
        for path in (runs[backend]["path"], runs[backend]["overlay"]):
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_run_replaces_an_existing_output_and_leaves_no_temp_files(workdir, exported, tmp_path):
    """(A real process: one whole run of the console script, from start-up to exit code.)"""
    out = tmp_path / "f.safetensors"
    out.write_bytes(b"old")
    ok(cli_process("run", exported, "--image", workdir / "input.png", "--out", out, "--num-look-close", "1"))
    check_output_file(read_outputs(out), high_res_tokens=2560)
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


# --- look-close settings: environment variables, overridden by flags ---------------------------

def run_counts(workdir, exported, tmp_path, *flags, **env):
    out = tmp_path / "o.safetensors"
    ok(cli("run", exported, "--image", workdir / "input.png", "--out", out, *flags, env=clean_env(**env)))
    data = read_outputs(out)
    check_output_file(data)
    return int(data["selection_map_756"].sum()), int(data["selection_map_1512"].sum()), data


def test_default_is_six_steps_which_is_every_patch_at_1_5k(workdir, exported, tmp_path):
    # 6 x 2560 > 2916 + 11664: the 756 scale runs out in step 6 and the rest spills to 1512
    n756, n1512, data = run_counts(workdir, exported, tmp_path)
    assert (n756, n1512) == (54 * 54, 108 * 108)
    assert data["features"].shape[1] == LOWRES_TOKENS + 14580 == 15309


def test_num_look_close_env_is_honoured(workdir, exported, tmp_path):
    assert run_counts(workdir, exported, tmp_path, NUM_LOOK_CLOSE="1")[:2] == (512, 2048)


def test_num_look_close_flag_overrides_env(workdir, exported, tmp_path):
    assert run_counts(workdir, exported, tmp_path, "--num-look-close", "3", NUM_LOOK_CLOSE="1")[:2] == (1536, 6144)


# slow: every patch by default (six steps) is test_default_is_six_steps_which_is_every_patch_at_1_5k, a flag
# over the environment is test_num_look_close_flag_overrides_env, and 'all' read from NUM_LOOK_CLOSE is
# test_planning.py's test_num_look_close_env
@pytest.mark.slow
def test_num_look_close_all_takes_every_patch(workdir, exported, tmp_path):
    n756, n1512, _ = run_counts(workdir, exported, tmp_path, "--num-look-close", "5", NUM_LOOK_CLOSE="all")
    assert (n756, n1512) == (5 * 512, 5 * 2048)
    n756, n1512, _ = run_counts(workdir, exported, tmp_path, NUM_LOOK_CLOSE="all")
    assert (n756, n1512) == (54 * 54, 108 * 108)


def test_num_token_look_close_env_overrides_steps(workdir, exported, tmp_path):
    # 3000 tokens = one full step of 2560 and a last step of 440 split 512:2048 -> 88 + 352
    n756, n1512, _ = run_counts(workdir, exported, tmp_path, NUM_TOKEN_LOOK_CLOSE="3000", NUM_LOOK_CLOSE="6")
    assert (n756, n1512) == (512 + 88, 2048 + 352)


def test_num_token_look_close_flag_overrides_env(workdir, exported, tmp_path):
    n756, n1512, _ = run_counts(workdir, exported, tmp_path, "--num-token-look-close", "100",
                                NUM_TOKEN_LOOK_CLOSE="3000")
    assert n756 + n1512 == 100 and (n756, n1512) == (20, 80)


def test_select_num_each_scale_env_and_flag(workdir, exported, tmp_path):
    assert run_counts(workdir, exported, tmp_path, NUM_LOOK_CLOSE="1",
                      SELECT_NUM_EACH_SCALE="1000+1000")[:2] == (1000, 1000)
    assert run_counts(workdir, exported, tmp_path, "--select-num-each-scale", "0+300", NUM_LOOK_CLOSE="1",
                      SELECT_NUM_EACH_SCALE="1000+1000")[:2] == (0, 300)


def test_smooth_selection_prob_env_changes_the_selection(workdir, exported, tmp_path, runs):
    _, _, smooth = run_counts(workdir, exported, tmp_path, NUM_LOOK_CLOSE="2", SMOOTH_SELECTION_PROB="1")
    plain = runs["onnxruntime"]["out"]
    assert np.array_equal(smooth["prob"], plain["prob"])          # the map itself is not changed
    assert not np.array_equal(smooth["selection_map_1512"], plain["selection_map_1512"])
    _, _, flag_off = run_counts(workdir, exported, tmp_path, "--no-smooth-selection-prob",
                                NUM_LOOK_CLOSE="2", SMOOTH_SELECTION_PROB="1")
    assert np.array_equal(flag_off["selection_map_1512"], plain["selection_map_1512"])


def test_prompt_embedding_selects_top_down(workdir, exported, tmp_path, runs):
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, np.random.default_rng(7).standard_normal(TINY_WIDTH).astype(np.float32))
    _, _, top_down = run_counts(workdir, exported, tmp_path, "--prompt-embedding", prompt, NUM_LOOK_CLOSE="2")
    assert not np.allclose(top_down["prob"], runs["onnxruntime"]["out"]["prob"])
    assert top_down["features"].shape == runs["onnxruntime"]["out"]["features"].shape


def test_layer_flag_selects_another_exported_block(workdir, exported, tmp_path, runs):
    _, _, last = run_counts(workdir, exported, tmp_path, "--layer", "-1", NUM_LOOK_CLOSE="2")
    assert last["__metadata__"]["layer"] == "3"
    default = runs["onnxruntime"]["out"]
    assert np.array_equal(last["prob"], default["prob"])
    assert not np.allclose(last["features"], default["features"])


# --- parity ---------------------------------------------------------------------------------

def test_parity_against_the_official_model_passes():
    pytest.importorskip("ps3", reason="parity needs the official ps3-torch (the dev extra)")
    result = ok(cli("parity", "--model", "ps3-tiny", "--num-look-close", "1"))
    text = result.stdout
    assert "parity, fp32" in text and "3289 tokens" in text
    for row in ("lowres", "selector", "selection", "highres", "end-to-end"):
        assert row in text
    assert "FAIL" not in text and "ok" in text
