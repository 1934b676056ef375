"""Bad input through the CLI: one-line errors, non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from conftest import clean_env, cli_process, random_image
from conftest import cli as run_cli
from ps3edge.runtime.preprocess import open_image, to_rgb


def cli(*args, **env) -> subprocess.CompletedProcess:
    """The shared (in-process) runner, the look-close variables given as keywords; COLUMNS is left as it is
    (rich's own width when not on a terminal), unlike the other CLI tests."""
    return run_cli(*args, env=clean_env(columns=None, **env))


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str, absent=(), clean_dirs=()) -> str:
    """Exit 2, one `error: ...` line on stderr naming the problem, no traceback, nothing left behind."""
    both = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in both
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: ")
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    for path in absent:
        assert not Path(path).exists(), f"{path} was written"
    for d in clean_dirs:
        stray = [p.name for p in Path(d).iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
        assert not stray, f"temporary files left in {d}: {stray}"
    return line


@pytest.fixture
def tiny(artifacts) -> Path:
    return artifacts("ps3-tiny")


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "outputs"
    d.mkdir()
    return d


def run_and_fail(tiny, image, outdir, *flags, needles=(), **env) -> str:
    """`ps3edge run` that must fail cleanly without writing --out or --overlay."""
    out, overlay = outdir / "features.safetensors", outdir / "overlay.png"
    result = cli("run", tiny, "--image", image, "--out", out, "--overlay", overlay, *flags, **env)
    return assert_one_line_error(result, *needles, absent=(out, overlay), clean_dirs=(outdir,))


# --- images -----------------------------------------------------------------------------------

def test_non_image_file(tiny, image_file, outdir, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture\n")
    run_and_fail(tiny, text, outdir, needles=("notes.png", "not an image"))


def test_truncated_image(tiny, image_file, outdir, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_file.read_bytes()[:4000])
    run_and_fail(tiny, broken, outdir, needles=("broken.png", "corrupt or truncated"))


def test_corrupt_jpeg(tiny, outdir, tmp_path):
    good = tmp_path / "photo.jpg"
    random_image().save(good, quality=90)
    data = bytearray(good.read_bytes())
    broken = tmp_path / "garbled.jpg"
    broken.write_bytes(bytes(data[:20]) + b"\x00" * 50)     # a JPEG header and then nothing usable
    run_and_fail(tiny, broken, outdir, needles=("garbled.jpg",))


def test_missing_image(tiny, outdir, tmp_path):
    run_and_fail(tiny, tmp_path / "nowhere.png", outdir, needles=("image not found", "nowhere.png"))


def test_directory_or_device_as_image(tiny, outdir, tmp_path):
    run_and_fail(tiny, tmp_path, outdir, needles=("is a directory, not a file",))
    run_and_fail(tiny, "/dev/zero", outdir, needles=("not a regular file",))


def test_vila_artifact_given_where_a_ps3_artifact_goes(vila_art, image_file, outdir):
    result = cli("run", vila_art, "--image", image_file, "--out", outdir / "f.safetensors")
    assert_one_line_error(result, "is a VILA-HD artifact", str(vila_art / "ps3"))


def test_image_name_with_brackets_is_printed_verbatim(tiny, outdir, tmp_path):
    # the CLI prints with rich; a file name must not be read as markup ([/b] once crashed it)
    folder = tmp_path / "x[" / "b]"                 # the path reads .../x[/b]/scan [final].png
    folder.mkdir(parents=True)
    weird = folder / "scan [final].png"
    weird.write_text("not an image")
    run_and_fail(tiny, weird, outdir, needles=("x[/b]/scan [final].png",))


# --- images that must work ---------------------------------------------------------------------

def run_ok(tiny, image: Path, outdir: Path) -> dict:
    out, overlay = outdir / f"{image.stem}.safetensors", outdir / f"{image.stem}.overlay.png"
    result = cli("run", tiny, "--image", image, "--out", out, "--overlay", overlay, NUM_LOOK_CLOSE="1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert overlay.is_file()
    with safe_open(str(out), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def base_gray8() -> np.ndarray:
    """An 8-bit gray picture with the full 0..255 range and structure the selector can rank."""
    yy, xx = np.mgrid[0:240, 0:320]
    return ((np.sin(xx / 13.0) * np.cos(yy / 7.0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def test_rgba_and_palette_images_work(tiny, outdir, tmp_path):
    rgb = random_image(seed=4)
    rgb.save(tmp_path / "rgb.png")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((rgb.height, rgb.width), 30, np.uint8)))
    rgba.save(tmp_path / "rgba.png")
    rgb.convert("P").save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "rgba.png").mode == "RGBA"
    assert Image.open(tmp_path / "palette.png").mode == "P"
    from_rgb = run_ok(tiny, tmp_path / "rgb.png", outdir)
    from_rgba = run_ok(tiny, tmp_path / "rgba.png", outdir)
    run_ok(tiny, tmp_path / "palette.png", outdir)
    # the alpha channel is dropped, not composited: same pixels, same features
    np.testing.assert_array_equal(from_rgba["features"], from_rgb["features"])


def test_grayscale_and_16_bit_grayscale_work_and_agree(tiny, outdir, tmp_path, base_gray8):
    Image.fromarray(base_gray8, "L").save(tmp_path / "gray8.png")
    Image.fromarray(base_gray8.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    with Image.open(tmp_path / "gray16.png") as im:
        assert im.mode.startswith("I") and np.asarray(im).max() > 255      # really 16-bit on disk
    gray8 = run_ok(tiny, tmp_path / "gray8.png", outdir)
    gray16 = run_ok(tiny, tmp_path / "gray16.png", outdir)
    # 65535 -> 255: the 16-bit file is exactly the 8-bit picture, so the features are identical
    np.testing.assert_array_equal(gray16["features"], gray8["features"])


def test_one_pixel_image_works(tiny, outdir, tmp_path):
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tmp_path / "dot.png")
    out = run_ok(tiny, tmp_path / "dot.png", outdir)
    assert out["features"].shape == (1, 729 + 2560, 64)
    with Image.open(outdir / "dot.overlay.png") as im:
        assert im.size == (1, 1)


def test_16_bit_gray_is_scaled_not_clipped(tmp_path, base_gray8):
    path = tmp_path / "gray16.png"
    Image.fromarray(base_gray8.astype(np.uint16) * 257).save(path)
    sixteen = open_image(path)
    assert sixteen.mode.startswith("I")
    rgb = np.asarray(to_rgb(sixteen))
    assert rgb.shape == (*base_gray8.shape, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], base_gray8)
    assert (rgb == 255).mean() < 0.1                                      # not clipped to white


def test_dark_16_bit_gray_stays_dark(tmp_path):
    # every value below 256 out of 65535: nearly black, not an 8-bit picture
    path = tmp_path / "dark16.png"
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16)).save(path)
    rgb = np.asarray(to_rgb(open_image(path)))
    assert rgb.max() <= 1


def test_8_bit_modes_convert_to_rgb():
    base = random_image(64, 48, seed=2)
    for mode in ("L", "LA", "P", "RGBA", "CMYK", "1"):
        rgb = to_rgb(base.convert(mode))
        assert rgb.mode == "RGB" and rgb.size == base.size


# --- look-close settings ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["7", "0"])
def test_num_look_close_env_out_of_range(tiny, image_file, outdir, value):
    run_and_fail(tiny, image_file, outdir, NUM_LOOK_CLOSE=value,
                 needles=("NUM_LOOK_CLOSE", "between 1 and 6", f"got {value}"))


def test_num_look_close_flag_out_of_range(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, "--num-look-close", "99",
                 needles=("NUM_LOOK_CLOSE", "between 1 and 6", "got 99"))


def test_num_look_close_not_a_number(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, NUM_LOOK_CLOSE="many", needles=("NUM_LOOK_CLOSE", "'many'"))


@pytest.mark.parametrize("value", ["0", "14581"])
def test_num_token_look_close_out_of_range(tiny, image_file, outdir, value):
    run_and_fail(tiny, image_file, outdir, NUM_TOKEN_LOOK_CLOSE=value,
                 needles=("NUM_TOKEN_LOOK_CLOSE", "between 1 and 14580", f"got {value}"))


def test_num_token_look_close_not_a_number(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, "--num-token-look-close", "1e3",
                 needles=("NUM_TOKEN_LOOK_CLOSE", "1e3"))


@pytest.mark.parametrize("value, parts", [("2560", 1), ("512+1024+1024", 3)])
def test_select_num_each_scale_wrong_number_of_parts(tiny, image_file, outdir, value, parts):
    run_and_fail(tiny, image_file, outdir, SELECT_NUM_EACH_SCALE=value,
                 needles=("SELECT_NUM_EACH_SCALE", "needs 2 parts", f"got {parts}"))


def test_select_num_each_scale_flag_wrong_number_of_parts_on_4k(artifacts, image_file, outdir):
    run_and_fail(artifacts("ps3-tiny-4k"), image_file, outdir, "--select-num-each-scale", "512+2048",
                 needles=("SELECT_NUM_EACH_SCALE", "needs 3 parts", "85+341+2134"))


@pytest.mark.parametrize("value", ["512,2048", "0+0", "3000+0"])
def test_select_num_each_scale_malformed(tiny, image_file, outdir, value):
    run_and_fail(tiny, image_file, outdir, SELECT_NUM_EACH_SCALE=value, needles=("SELECT_NUM_EACH_SCALE",))


def test_unknown_look_close_mode(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, LOOK_CLOSE_MODE="sideways", needles=("LOOK_CLOSE_MODE", "sideways"))


def test_bad_smooth_selection_prob(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, SMOOTH_SELECTION_PROB="maybe", needles=("SMOOTH_SELECTION_PROB",))


def test_layer_that_was_not_exported(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, "--layer", "0", needles=("layer 0", "not exported"))


def test_unknown_backend(tiny, image_file, outdir):
    run_and_fail(tiny, image_file, outdir, "--backend", "tensorflow", needles=("tensorflow", "onnxruntime"))


# --- prompt embeddings -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(63,), (2, 64)])
def test_prompt_embedding_of_the_wrong_size(tiny, image_file, outdir, tmp_path, shape):
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, np.ones(shape, np.float32))
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", prompt,
                 needles=("prompt embedding", "64 numbers", str(shape)))


def test_prompt_embedding_that_is_not_npy(tiny, image_file, outdir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("0.1 0.2 0.3\n")
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", prompt, needles=("prompt.txt", "not a .npy"))


def test_prompt_embedding_of_strings(tiny, image_file, outdir, tmp_path):
    prompt = tmp_path / "words.npy"
    np.save(prompt, np.array(["x"] * 64))
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", prompt, needles=("prompt embedding",))


def test_prompt_embedding_missing(tiny, image_file, outdir, tmp_path):
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", tmp_path / "gone.npy",
                 needles=("gone.npy", "not found"))


@pytest.mark.parametrize("kind", ["directory", "broken link", "device"])
def test_a_prompt_embedding_that_is_not_a_file_says_what_it_is(tiny, image_file, outdir, tmp_path, kind):
    prompt = tmp_path / "p.npy"
    if kind == "directory":
        prompt.mkdir()
        needles = ("p.npy", "is a directory, not a file")
    elif kind == "broken link":
        prompt.symlink_to(tmp_path / "moved.npy")
        needles = ("p.npy", "not found", "link to a missing file")
    else:
        prompt = Path("/dev/null")
        needles = ("/dev/null", "not a regular file")
    line = run_and_fail(tiny, image_file, outdir, "--prompt-embedding", prompt, needles=needles)
    assert kind == "broken link" or "not found" not in line


def test_prompt_embedding_with_bottom_up_mode(tiny, image_file, outdir, tmp_path):
    prompt = tmp_path / "prompt.npy"
    np.save(prompt, np.ones(64, np.float32))
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", prompt, LOOK_CLOSE_MODE="after_image",
                 needles=("after_image",))


# --- output paths -------------------------------------------------------------------------------

def test_out_must_end_in_safetensors(tiny, image_file, outdir):
    out = outdir / "features.npy"
    result = cli("run", tiny, "--image", image_file, "--out", out)
    assert_one_line_error(result, "--out", ".safetensors", "features.npy", absent=(out,), clean_dirs=(outdir,))


def test_out_below_a_regular_file(tiny, image_file, outdir):
    blocker = outdir / "file"
    blocker.write_text("x")
    out = blocker / "features.safetensors"
    result = cli("run", tiny, "--image", image_file, "--out", out)
    assert_one_line_error(result, "--out", "not a directory")
    assert blocker.read_text() == "x"


def test_overlay_that_cannot_be_written_leaves_no_features(tiny, image_file, outdir):
    out, overlay = outdir / "features.safetensors", outdir / "a-directory"
    overlay.mkdir()
    result = cli("run", tiny, "--image", image_file, "--out", out, "--overlay", overlay)
    assert_one_line_error(result, "--overlay", "a-directory", "is a directory", absent=(out,),
                          clean_dirs=(outdir,))


# --- tampered artifacts -------------------------------------------------------------------------

@pytest.fixture
def copy_of_tiny(tiny, tmp_path) -> Path:
    art = tmp_path / "artifact"
    shutil.copytree(tiny, art)
    return art


def refused_by_run(art: Path, image_file: Path, outdir: Path, *needles: str):
    out = outdir / "features.safetensors"
    assert_one_line_error(cli("run", art, "--image", image_file, "--out", out), *needles,
                          absent=(out,), clean_dirs=(outdir,))


def refused_by_run_and_inspect(art: Path, image_file: Path, outdir: Path, *needles: str):
    refused_by_run(art, image_file, outdir, *needles)
    assert_one_line_error(cli("inspect", art), *needles)


def edit_manifest(art: Path, change):
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_changed_stage_file(copy_of_tiny, image_file, outdir):
    path = copy_of_tiny / "highres.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused_by_run_and_inspect(copy_of_tiny, image_file, outdir, "highres.onnx", "changed after export")
    assert_one_line_error(cli("inspect", copy_of_tiny, "--json"), "highres.onnx", "changed after export")
    assert_one_line_error(cli("run", copy_of_tiny, "--image", image_file, "--out", outdir / "t.safetensors",
                              "--backend", "torch"), "highres.onnx", "changed after export")


def test_deleted_stage_file(copy_of_tiny, image_file, outdir):
    (copy_of_tiny / "selector.onnx").unlink()
    refused_by_run_and_inspect(copy_of_tiny, image_file, outdir, "selector.onnx", "missing")


def test_wrong_schema_version(copy_of_tiny, image_file, outdir):
    edit_manifest(copy_of_tiny, lambda m: m.update(schema_version=99))
    refused_by_run_and_inspect(copy_of_tiny, image_file, outdir, "manifest.json", "schema version 99")


def test_manifest_that_is_not_json(copy_of_tiny, image_file, outdir):
    (copy_of_tiny / "manifest.json").write_text('{"schema_version": 1, "model": ')
    refused_by_run_and_inspect(copy_of_tiny, image_file, outdir, "manifest.json", "not valid JSON")


def test_missing_manifest(copy_of_tiny, image_file, outdir):
    (copy_of_tiny / "manifest.json").unlink()
    refused_by_run_and_inspect(copy_of_tiny, image_file, outdir, "manifest.json", "ps3edge export")


def test_artifact_directory_that_does_not_exist(tmp_path, image_file, outdir):
    refused_by_run_and_inspect(tmp_path / "absent", image_file, outdir, "artifact directory not found")


@pytest.mark.parametrize("name, change, needle", [
    ("width edited", lambda m: m["model"].update(width=32), "stage 'lowres'"),
    ("model emptied", lambda m: m.update(model={}), "'model' section"),
    ("depth edited", lambda m: m["model"].update(depth=3), "'model' section"),
    ("files not a map", lambda m: m.update(files=list(m["files"])), "'files'"),
    ("file outside", lambda m: m["files"].update({"../input.png": "0" * 64}), "outside the artifact"),
    ("stage file swapped", lambda m: m["stages"]["highres"].update(file="lowres.onnx"), "stage 'highres'"),
    ("returned layer out of range", lambda m: m.update(returned_layers=[7]), "returned_layers [7]"),
    ("section removed", lambda m: m.pop("defaults"), "'defaults'"),
    ("budget edited", lambda m: m["defaults"].update(select_num_each_scale=[1, 2]), "select_num_each_scale"),
])
def test_hand_edited_manifest_is_refused(copy_of_tiny, name, change, needle):
    # `run` and `inspect` read the manifest through the same check; inspect starts faster
    edit_manifest(copy_of_tiny, change)
    assert_one_line_error(cli("inspect", copy_of_tiny), "manifest.json", "re-export", needle)


def test_manifest_whose_model_no_longer_matches_its_stages_is_refused_by_run(copy_of_tiny, image_file, outdir):
    edit_manifest(copy_of_tiny, lambda m: m["model"].update(width=32))
    refused_by_run(copy_of_tiny, image_file, outdir, "manifest.json", "stage 'lowres'")


# --- export -------------------------------------------------------------------------------------

def assert_export_fails(out: Path, *flags, needles=(), model="ps3-tiny", root: Path | None = None):
    """`ps3edge export` fails cleanly and adds nothing (no staging directory) under `root`."""
    root = out.parent if root is None else root
    before = sorted(root.rglob("*"))
    result = cli("export", "--model", model, "--out", out, *flags)
    line = assert_one_line_error(result, *needles)
    assert sorted(root.rglob("*")) == before, "export left files behind"
    return line


def test_export_into_a_non_empty_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_export_fails(out, "--overwrite", needles=("mine", "not empty"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_export_onto_a_regular_file(tmp_path):
    out = tmp_path / "file.onnx"
    out.write_text("x")
    assert_export_fails(out, needles=("file.onnx", "not a directory"))


def test_export_below_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_export_fails(tmp_path / "file" / "art", needles=("not a directory",), root=tmp_path)


@pytest.mark.parametrize("layers, needle", [("7", "[7]"), ("-5", "[-5]"), ("a,b", "--layers"), (",", "--layers")])
def test_export_with_wrong_layers(tmp_path, layers, needle):
    assert_export_fails(tmp_path / "art", "--layers", layers, needles=(needle,))


@pytest.mark.parametrize("opset", ["11", "99"])
def test_export_with_unsupported_opset(tmp_path, opset):
    assert_export_fails(tmp_path / "art", "--opset", opset, needles=(f"opset {opset}",))


def test_export_unknown_preset(tmp_path):
    assert_export_fails(tmp_path / "art", model="ps3-huge", needles=("ps3-huge", "ps3-tiny"))


def test_export_from_a_directory_that_is_no_checkpoint(tmp_path):
    empty = tmp_path / "ckpt"
    empty.mkdir()
    assert_export_fails(tmp_path / "art", model=empty, needles=("ckpt", "config.json"))


def test_demo_into_a_foreign_artifacts_directory(tmp_path):
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "x.txt").write_text("mine")
    result = cli("demo", "--out", tmp_path)
    assert_one_line_error(result, "artifacts", "not a ps3edge artifact")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


# --- usage errors, counts and paths refused before any work (a CLI walk-through's findings) -----------
@pytest.mark.parametrize("args, needle", [
    (("run", "ART", "--image", "x.png", "--out", "y.safetensors", "--layer", "abc"), "Invalid value for '--layer'"),
    (("version", "--bogus"), "No such option: --bogus"),
    (("frobnicate",), "No such command 'frobnicate'"),
    (("export", "--model", "ps3-tiny", "--out", "OUT", "--seed", "99999999999999999999"), "'--seed'"),
    (("bench", "--device", "cpu", "--repeat", "0"), "'--repeat'"),
    (("bench", "--device", "cpu", "--depth", "99"), "1 to 4, got 99"),
    (("bench", "--device", "bogus"), "--device takes"),
    (("bench", "--device", "cpu", "--num-look-close", "1,1"), "distinct whole numbers"),
    (("bench", "--device", "cpu", "--num-look-close", ""), "distinct whole numbers"),
    (("export", "--model", "ps3-tiny", "--out", "OUT", "--layers", "-1,3"), "the same block twice"),
    (("inspect", "ART", "--trt-version", "10.15"), "--trt-version applies to --lint"),
    (("run", "ART", "--image", "IMG", "--out", "OUT/f.safetensors", "--num-look-close", ""), "--num-look-close is empty"),
    (("chat", "--model-path", "vila-hd-tiny", "--text", "  ", "--media", "IMG"), "--text is empty"),
    (("chat", "--model-path", "OUT", "--text", "hi", "--media", "IMG"), "neither a VILA-HD preset"),
    (("chat", "--model-path", "vila-hd-tiny", "--text", "hi", "--media", "IMG", "--temperature", "inf"),
     "finite number"),
])
def test_usage_errors_are_one_line(tiny, image_file, tmp_path, args, needle):
    """typer's own usage errors and the counts it checks are one `error:` line with exit 2, and
    nothing is written (the export --out is never created)."""
    subst = {"ART": tiny, "IMG": image_file, "OUT": tmp_path / "out", "OUT/f.safetensors": tmp_path / "f.safetensors"}
    result = cli(*[subst.get(a, a) for a in args])
    assert_one_line_error(result, needle, absent=(tmp_path / "out", tmp_path / "f.safetensors"))


def test_usage_error_from_the_console_script():
    """The same net in a real process started from the installed console script."""
    result = cli_process("version", "--bogus", env=clean_env(columns=None))
    assert_one_line_error(result, "No such option: --bogus")
    in_process = cli("version", "--bogus")                  # the runner the other tests use agrees
    assert (in_process.returncode, in_process.stdout, in_process.stderr) == (2, result.stdout, result.stderr)


def test_run_refuses_to_overwrite_its_own_inputs(tiny, image_file, outdir):
    out = outdir / "features.safetensors"
    before = Path(image_file).read_bytes()
    for flags, needle in ((("--out", out, "--overlay", image_file), "--image and --overlay are the same file"),
                          (("--out", out, "--overlay", out), "--out and --overlay are the same file"),
                          (("--out", out, "--overlay", outdir / "overlay.jpg"), "give a .png name")):
        assert_one_line_error(cli("run", tiny, "--image", image_file, *flags), needle, absent=(out,))
    assert Path(image_file).read_bytes() == before


def test_non_finite_prompt_embedding_and_output_are_refused(tiny, image_file, outdir, tmp_path):
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full(64, np.nan, np.float32))
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", nan, needles=("finite numbers",))
    huge = tmp_path / "huge.npy"                   # finite, but the selector's softmax overflows on it
    np.save(huge, np.full(64, 3e38, np.float32))
    run_and_fail(tiny, image_file, outdir, "--prompt-embedding", huge, needles=("non-finite",))


def test_demo_checks_settings_and_its_directory_first(tmp_path):
    out = tmp_path / "demo"
    assert_one_line_error(cli("demo", "--out", out, NUM_LOOK_CLOSE="abc"), "NUM_LOOK_CLOSE", absent=(out,))
    assert_one_line_error(cli("demo", "--out", out, NUM_TOKEN_LOOK_CLOSE="0"), "NUM_TOKEN_LOOK_CLOSE", absent=(out,))
    (out / "artifacts").mkdir(parents=True)
    (out / "artifacts" / defaults_manifest()).write_text(json.dumps({"files": {}}))
    (out / "artifacts" / "mine.txt").write_text("mine")
    assert_one_line_error(cli("demo", "--out", out), "not part of its artifact", "mine.txt")
    assert (out / "artifacts" / "mine.txt").read_text() == "mine"


def defaults_manifest() -> str:
    from ps3edge import defaults
    return defaults.MANIFEST_NAME


def test_calibrate_checks_every_input_before_writing(copy_of_tiny, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        random_image(seed=i).save(images / f"{i}.png")
    before = sorted(p.name for p in copy_of_tiny.iterdir())
    for flags, needle in ((("--holdout-images", tmp_path / "none"), "not found"),
                          (("--num-look-close", "0"), "NUM_LOOK_CLOSE")):
        result = cli("calibrate", copy_of_tiny, "--images", images, "--samples", "1", *flags)
        assert_one_line_error(result, needle)
        assert sorted(p.name for p in copy_of_tiny.iterdir()) == before       # no int8 stage written
    (images / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")           # a held-out image that cannot open
    assert_one_line_error(cli("calibrate", copy_of_tiny, "--images", images, "--samples", "1"), "3.png")
    assert sorted(p.name for p in copy_of_tiny.iterdir()) == before


def test_file_system_errors_are_one_line(tmp_path):
    """The last net: an OSError the command did not foresee (here a name too long to create,
    after the benchmark ran) is one line too."""
    result = cli("bench", "--device", "cpu", "--num-look-close", "1", "--warmup", "0", "--repeat", "1",
                 "--json", tmp_path / ("x" * 300 + ".json"))
    assert_one_line_error(result, "File name too long")
