"""The export checks what it wrote: every stage file, run in onnxruntime on the inputs its export
traced with, against the PyTorch module it came from (exporter/validate.py), before anything is
renamed into place."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import ps3edge.exporter.onnx_export as onnx_export
from conftest import cli
from ps3edge import defaults
from ps3edge.errors import Ps3EdgeError
from ps3edge.model.projector import random_projector
from test_bad_input import assert_one_line_error


def shift_largest_weight(path: Path) -> None:
    """Add 1 to every value of the file's largest float initializer: the file then computes
    something else than its module, as it would after a rewrite that broke its arithmetic."""
    model = onnx.load(str(path))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    largest = max(floats, key=lambda t: int(np.prod(t.dims)))
    largest.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(largest) + np.float32(1), largest.name))
    onnx.save(model, str(path))


def test_export_reports_each_stage_it_checked_within_the_fp32_tolerance(tmp_path):
    out = tmp_path / "art"
    r = cli("export", "--model", "ps3-tiny", "--out", out)
    assert r.returncode == 0, r.stderr
    tol = defaults.TOLERANCES["fp32"]
    for stage in ("lowres", "selector", "highres"):
        line = next(l for l in r.stdout.splitlines() if f"stage '{stage}' matches PyTorch in onnxruntime" in l)
        found = re.search(r"max \|diff\| (\S+) \(\w+\), min cosine (\S+) over (\d+) output", line)
        assert found, line
        assert float(found[1]) <= tol["max_abs"] and float(found[2]) >= tol["min_cosine"], line
    assert (out / "manifest.json").is_file()


def test_a_stage_file_that_computes_something_else_fails_the_export_and_leaves_nothing(tmp_path, monkeypatch):
    """A real mismatch, onnxruntime untouched: the selector's file, once onnxruntime's rewrites have
    written it into the staging directory, gets one weight matrix shifted by 1 (what a rewrite that
    broke the graph's arithmetic would leave). The check must name the stage and output with the
    figures, and the export must leave no artifact, no staging directory and no lock."""
    real = onnx_export.simplify_stage

    def simplify_then_break_selector(path, *args, **kwargs):
        written = real(path, *args, **kwargs)
        if Path(path).name == "selector.onnx":
            shift_largest_weight(written[0])
        return written

    monkeypatch.setattr(onnx_export, "simplify_stage", simplify_then_break_selector)
    out = tmp_path / "art"
    line = assert_one_line_error(cli("export", "--model", "ps3-tiny", "--out", out),
                                 "stage 'selector'", "output 'prob'", "max |diff|", "min cosine",
                                 f"tolerance {defaults.TOLERANCES['fp32']['max_abs']}")
    assert "lowres" not in line
    assert list(tmp_path.iterdir()) == []


def test_the_projector_file_is_checked_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """VILA-HD's single-file exports (projector, LLM) take the same check: a good file is written,
    one that computes something else (its weights shifted in the staging directory) is not."""
    projector = random_projector(16, 24)
    good = onnx_export.export_projector(projector, tmp_path / "good" / "projector.onnx")
    assert good.is_file()

    real = onnx_export._export_stage

    def export_then_break(*args, **kwargs):
        written = real(*args, **kwargs)
        shift_largest_weight(written[0])
        return written

    monkeypatch.setattr(onnx_export, "_export_stage", export_then_break)
    with pytest.raises(Ps3EdgeError, match=r"stage 'projector' does not match .* output 'embeddings' max \|diff\|"):
        onnx_export.export_projector(projector, tmp_path / "bad" / "projector.onnx")
    assert list((tmp_path / "bad").iterdir()) == []
