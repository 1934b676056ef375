"""The Jetson memory plan (examples/jetson/memory_plan.py): its tables are what the docs page shows
(the walk-through's verdict table is checked in tests/test_engines.py), and its figures agree with
the definitions they come from - the Qwen2 parameter formula, the buffers onnxruntime's
MatMulNBits / GatherBlockQuantized kernels take, the projector's cell rule."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
from pathlib import Path

import numpy as np
import pytest

from ps3edge.model.config import preset
from ps3edge.model.projector import projector_cells
from ps3edge.runtime.planning import Geometry, LookCloseSettings, resolve

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "jetson" / "memory_plan.py"


def _table_rows(text: str) -> list[str]:
    """Markdown table rows, without header and separator rows."""
    lines = text.splitlines()
    return [line for i, line in enumerate(lines) if line.startswith("| ") and not line.startswith("| ---")
            and not (i + 1 < len(lines) and lines[i + 1].startswith("| ---"))]


@pytest.fixture(scope="module")
def plan():
    """The script's namespace and its output, run as `python memory_plan.py` runs it."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr("sys.argv", [str(SCRIPT)])
        namespace = runpy.run_path(str(SCRIPT), run_name="__main__")
    return namespace, out.getvalue()


def test_docs_tables_are_the_scripts_output(plan):
    _, text = plan
    rows = _table_rows(text)
    assert len(rows) > 100
    docs = (ROOT / "docs" / "tensorrt-and-jetson.md").read_text()
    missing = [r for r in rows if r not in docs]
    assert not missing, missing


def test_llm_parameters_are_the_qwen2_formula(plan):
    ns, _ = plan
    llm = ns["llm_params"](ns["LLM_CONFIG"])
    c = ns["LLM_CONFIG"]
    H, I, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * H // c["num_attention_heads"]
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H      # q, k, v (biased), o, MLP, 2 norms
    assert llm["total"] == L * layer + 2 * V * H + H                          # + embedding, head, final norm
    assert len(llm["matmuls"]) == 7 * L and llm["head"] == (H, V) and llm["embedding"] == (V, H)


def _pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes along the last axis, two per byte, low nibble first."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


@pytest.mark.parametrize("block", [32, 128])
def test_int4_sizes_are_the_buffers_onnxruntime_kernels_take(plan, block):
    """A MatMulNBits and a GatherBlockQuantized node run by onnxruntime on buffers of exactly the
    planned sizes (fp16 scales, 4-bit zero points) reproduce the dequantized weights."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    ns, _ = plan
    rng = np.random.default_rng(block)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    K, N, M = 256, 64, 3
    kb = K // block
    q, zp = rng.integers(0, 16, (N, kb, block), dtype=np.uint8), rng.integers(0, 16, (N, kb), dtype=np.uint8)
    scales = (rng.random((N, kb)) * 0.1 + 0.01).astype(np.float16)
    B, zpp = _pack(q), _pack(np.pad(zp, ((0, 0), (0, kb % 2))))
    assert B.nbytes + scales.nbytes + zpp.nbytes == ns["matmul_nbits_bytes"](K, N, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "s", "z"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [M, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [M, N])],
                              [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales.reshape(-1), "s"),
                               numpy_helper.from_array(zpp.reshape(-1), "z")])
    A = rng.standard_normal((M, K)).astype(np.float16)
    y = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"A": A})[0]
    W = ((q.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(N, K)
    ref = A.astype(np.float32) @ W.T
    assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max()

    V, Hd = 100, 256
    hb = Hd // block
    q, zp = rng.integers(0, 16, (V, Hd), dtype=np.uint8), rng.integers(0, 16, (V, hb), dtype=np.uint8)
    scales = (rng.random((V, hb)) * 0.1 + 0.01).astype(np.float16)
    data = helper.make_tensor("d", TensorProto.UINT4, [V, Hd], _pack(q).tobytes(), raw=True)
    zpt = helper.make_tensor("z", TensorProto.UINT4, [V, hb], _pack(np.pad(zp.reshape(-1), (0, V * hb % 2))).tobytes(),
                             raw=True)
    assert len(data.raw_data) + scales.nbytes + len(zpt.raw_data) == ns["gather_block_bytes"](V, Hd, block)
    node = helper.make_node("GatherBlockQuantized", ["d", "ids", "s", "z"], ["Y"], domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [3, Hd])],
                              [data, numpy_helper.from_array(scales, "s"), zpt])
    ids = np.array([0, 57, 99])
    y = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(),
                             providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    E = ((q.astype(np.float32).reshape(V, hb, block) - zp[..., None]) * scales[..., None]).reshape(V, Hd)
    assert np.abs(y - E[ids]).max() <= 1e-3 * np.abs(E).max()


@pytest.mark.parametrize("name,nlc", [("ps3-1.5k", 2), ("ps3-1.5k", 6), ("ps3-4k", 2), ("ps3-4k", 6)])
def test_image_tokens_are_the_projectors_cells(plan, name, nlc):
    """The planned image tokens: VILA-HD's context rule bounds them, and selections packed into whole
    2x2 cells (the most cells a selection can give) reach them through the real projector code."""
    ns, _ = plan
    cfg = preset(name)
    tokens = ns["image_tokens"](cfg, nlc)
    schedule = resolve(LookCloseSettings(num_look_close=nlc), Geometry.of(cfg))
    assert tokens["patches"] == schedule.patches_asked or tokens["patches"] == cfg.highres_patches_total
    assert tokens["image"] <= tokens["lowres"] + 1 + schedule.patches_asked // 4        # llm/pipeline.py's rule
    maps = []
    for s, g in enumerate(cfg.highres_grids):
        n = sum(step[s] for step in schedule.counts)
        cells = np.zeros((g // 2) ** 2, dtype=bool)
        cells[: n // 4] = True                       # n // 4 whole cells, then the rest in one more cell
        m = cells.reshape(g // 2, g // 2).repeat(2, 0).repeat(2, 1).astype(np.uint8)
        rest = np.flatnonzero(m.reshape(-1) == 0)[: n % 4]
        m.reshape(-1)[rest] = 1
        assert m.sum() == n
        maps.append(m)
    features = np.zeros((cfg.lowres_tokens + tokens["patches"], 1), np.float32)
    cells, counts = projector_cells(features, maps, cfg.lowres_grid)
    assert counts["lowres"] == tokens["lowres"] and len(cells) == tokens["lowres"] + tokens["highres"]


def test_a_checkpoints_llm_config_replaces_the_table(plan, tmp_path):
    ns, _ = plan
    config = {**ns["LLM_CONFIG"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 260, "model_type": "qwen2"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ns["main"](["--llm-config", str(path)])
    params = 2 * (64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 260 * 64 + 64
    assert f"| 64 | 2 | 4 | 2 | 128 | 260 | false | {params / 1e9:.3f} B |" in out.getvalue()
