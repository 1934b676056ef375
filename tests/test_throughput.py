"""`ps3edge bench --batch` (throughput.py) and the official baseline as VILA-HD configures it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import clean_env, cli, random_image
from ps3edge.errors import Ps3EdgeError
from ps3edge.model import build
from ps3edge.throughput import batch_images, markdown, parse_backends, parse_batches, summary


def test_batch_and_backend_flags():
    assert parse_batches("1,2,4,8") == [1, 2, 4, 8]
    assert parse_backends("torch,onnxruntime") == ["torch", "onnxruntime"]
    for bad in ("0", "1,1", "", "two"):
        with pytest.raises(Ps3EdgeError, match="--batch must be distinct whole numbers"):
            parse_batches(bad)
    for bad in ("tensorrt", "torch,torch", ""):
        with pytest.raises(Ps3EdgeError, match="--backend with --batch takes torch"):
            parse_backends(bad)


@pytest.mark.parametrize("args, needle", [
    (("--batch", "0"), "--batch must be distinct whole numbers"),
    (("--batch", "1", "--backend", "tensorrt"), "--backend with --batch takes"),
    (("--backend", "onnxruntime"), "for onnxruntime use benchmarks/cpu_stages.py"),   # without --batch, as before
])
def test_bench_batch_flags_are_refused_in_one_line(args, needle):
    proc = cli("bench", "--device", "cpu", *args, env=clean_env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line


def test_batch_images_are_different_views_of_one_size():
    image = random_image(320, 240)
    views = batch_images(image, 8)
    assert len(views) == 8 and all(v.size == image.size for v in views)
    arrays = [np.asarray(v) for v in views]
    assert all(not np.array_equal(arrays[i], arrays[j]) for i in range(8) for j in range(i))


def test_official_model_configured_as_vila_hd_returns_the_last_two_layers():
    pytest.importorskip("ps3", reason="the official ps3-torch reference is not installed")
    from ps3edge.reference import VILA_HD_LAYERS_TO_RETURN, layers_returned, official_model

    official = official_model(build("ps3-tiny").model, VILA_HD_LAYERS_TO_RETURN)
    pixels = torch.randn(2, 3, 1512, 1512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        two = official(pixels, num_look_close=1)
        with layers_returned(official, 4):
            every = official(pixels, num_look_close=1)
    assert len(two.hidden_states) == 2 and len(every.hidden_states) == 4
    assert torch.equal(two.hidden_states[-2], every.hidden_states[-2])
    assert official.vision_model.num_hidden_layers_to_return == 2                 # restored


def _row(backend, b, ours, official):
    return {"model": "m", "backend": backend, "device": "cpu", "dtype": "fp32", "precision": "fp32",
            "num_look_close": 6, "batch": b, "tokens": 16089, "ours_batch_ms": 1e3 * b / ours,
            "ours_ms_per_image": 1e3 / ours, "ours_images_per_s": ours, "ours_peak_gib": 1.5,
            "ours_peak_kind": "cuda", "official_images_per_s": official, "official_ms_per_image": 1e3 / official,
            "official_peak_gib": 2.0, "official_peak_kind": "cuda", "speedup": round(ours / official, 2)}


def test_summary_and_table_state_the_scaling_and_the_ratio():
    rows = [_row("torch", 1, 10.0, 4.0), _row("torch", 8, 25.0, 5.0)]
    assert summary(rows) == ["m torch NUM_LOOK_CLOSE=6: 10.00 images/s at B=1, 25.00 at B=8 (2.50x); "
                             "against the official code B=1 2.50x, B=8 5.00x"]
    table = markdown(rows).splitlines()
    assert "official images/s (VILA-HD: last 2 layers)" in table[0] and "ours / official images/s" in table[0]
    assert table[3].startswith("| m | torch | cpu | fp32 | 6 | 8 | 16089 | 25.00 | 40.0 | 320.0 | 1.500 |")


@pytest.mark.slow
def test_bench_batch_on_cpu_against_official(tmp_path):
    pytest.importorskip("ps3", reason="the official ps3-torch reference is not installed")
    out, md = tmp_path / "rows.json", tmp_path / "table.md"
    proc = cli("bench", "--model", "ps3-tiny", "--device", "cpu", "--dtype", "fp32", "--num-look-close", "1",
               "--batch", "1,2", "--backend", "torch,onnxruntime", "--against", "official", "--warmup", "0",
               "--repeat", "1", "--json", out, "--markdown", md, env=clean_env(columns=None))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["batch"]) for r in rows] == [("torch", 1), ("torch", 2), ("onnxruntime", 1),
                                                          ("onnxruntime", 2)]
    for r in rows:
        assert r["tokens"] == r["official_tokens"] == 729 + 2560
        assert r["ours_images_per_s"] > 0 and r["official_images_per_s"] > 0
        assert r["speedup"] == round(r["ours_images_per_s"] / r["official_images_per_s"], 2)
        assert r["ours_ms_per_image"] == pytest.approx(r["ours_batch_ms"] / r["batch"], abs=1e-3)
        assert r["official_config"] == "VILA-HD: last 2 layers returned"
    assert rows[0]["official_batch_ms"] == rows[2]["official_batch_ms"]        # one official run per B
    assert "| ps3-tiny | onnxruntime |" in md.read_text()


def test_bench_official_all_layers_is_an_extra_labelled_column(tmp_path):
    pytest.importorskip("ps3", reason="the official ps3-torch reference is not installed")
    out, md = tmp_path / "rows.json", tmp_path / "table.md"
    proc = cli("bench", "--model", "ps3-tiny", "--device", "cpu", "--dtype", "fp32", "--num-look-close", "1",
               "--against", "official", "--official-all-layers", "--warmup", "0", "--repeat", "1",
               "--json", out, "--markdown", md, env=clean_env(columns=None))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())
    assert row["official_config"] == "VILA-HD: last 2 layers returned"
    assert row["official_all_layers_ms"] > 0 and row["speedup_all_layers"] > 0
    header = md.read_text().splitlines()[0]
    assert "official ms (VILA-HD: last 2 layers)" in header and "official ms (all layers returned)" in header
    assert "(VILA-HD: last 2 layers returned)" in proc.stdout
