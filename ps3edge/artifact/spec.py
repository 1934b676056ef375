"""One declaration per exported stage: its tensors, dtypes and (symbolic) shapes.

The exporter, the manifest, the runtime backends, the TensorRT profiles and the lint all read
these declarations; nothing else spells out a stage's I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.config import PS3Config


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy dtype name: float32, int32
    shape: tuple                     # ints, or strings for dynamic axes ("T", "N")

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def stage_specs(cfg: PS3Config, num_returned_layers: int) -> dict[str, StageSpec]:
    """B: images in one pass; T: look-close steps in one highres call, of any of the B images
    (`step_image` says whose); N: tokens per step. The patches a highres call reads are no
    stage's output: the runtime cuts them from the pixels (model/patches.py)."""
    C, R, S = cfg.width, num_returned_layers, cfg.max_size
    g0, N0 = cfg.lowres_grid, cfg.lowres_tokens
    kv = (cfg.depth, 2, "B", cfg.num_heads, N0, cfg.head_dim)
    conv = ("B", cfg.conv_out, cfg.conv_grid, cfg.conv_grid)
    f32, i32 = "float32", "int32"
    return {
        "lowres": StageSpec("lowres",
            inputs=(TensorSpec("pixels", f32, ("B", 3, S, S)),),
            outputs=(TensorSpec("lowres_features", f32, (R, "B", N0, C)),
                     TensorSpec("kv_cache", f32, kv),
                     TensorSpec("selection_features", f32, ("B", C, g0, g0)),
                     TensorSpec("conv_features", f32, conv))),
        "selector": StageSpec("selector",
            inputs=(TensorSpec("selection_features", f32, ("B", C, g0, g0)),
                    TensorSpec("conv_features", f32, conv),
                    TensorSpec("prompt", f32, ("B", C))),
            outputs=(TensorSpec("prob", f32, ("B", g0, g0)),)),
        "highres": StageSpec("highres",
            inputs=(TensorSpec("patches", f32, ("T", "N", cfg.patch_dim)),
                    TensorSpec("positions", i32, ("T", "N")),
                    TensorSpec("step_image", i32, ("T",)),
                    TensorSpec("kv_cache", f32, kv)),
            outputs=(TensorSpec("highres_features", f32, (R, "T", "N", C)),)),
    }


STAGE_ORDER = ("lowres", "selector", "highres")


def projector_spec(vision_width: int, llm_width: int) -> StageSpec:
    """VILA-HD's projector: M cells of 4C channels (dynamic M) -> M LLM embeddings."""
    return StageSpec("projector",
                     inputs=(TensorSpec("cells", "float32", ("M", 4 * vision_width)),),
                     outputs=(TensorSpec("embeddings", "float32", ("M", llm_width)),))


def llm_spec(num_layers: int, num_kv_heads: int, head_dim: int, hidden: int, vocab: int) -> StageSpec:
    """The exported decoder: dynamic new positions S and past length P; P+S is `T`."""
    kv = lambda length: (num_layers, 2, 1, num_kv_heads, length, head_dim)      # noqa: E731
    return StageSpec("llm",
                     inputs=(TensorSpec("inputs_embeds", "float32", (1, "S", hidden)),
                             TensorSpec("past_kv", "float32", kv("P"))),
                     outputs=(TensorSpec("logits", "float32", (1, vocab)),
                              TensorSpec("hidden", "float32", (1, hidden)),
                              TensorSpec("present_kv", "float32", kv("T"))))
