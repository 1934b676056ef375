"""Where a `PS3` gets its weights: seeded random init for presets, or a checkpoint: a local directory
or a Hugging Face hub id `owner/name[@revision]` (fetched into the Hugging Face cache by hub.py).

Checkpoint layout (what the official `PS3VisionModel.save_pretrained` writes and the published
`nvidia/PS3-*-SigLIP`, `PS3-*-SigLIP2` and `PS3_Lang-*` snapshots hold): `config.json` (flat, or with
`vision_config`), `model.safetensors` (or a sharded `model.safetensors.index.json`) with keys
`vision_model.*`, and optionally `preprocessor_config.json` with the image mean / std. The text tower
(`text_model.*`) and the trunk's pooling head (`trunk.attn_pool`, `trunk.norm`, ...) are not part of the
encoder's feature path and are ignored (never read). An optional `depth` key truncates the trunk to its
first blocks. Tensors are copied into the model one at a time, shard by shard, so loading holds the
model's weights once (plus one tensor), never a second full copy. Where a checkpoint's links and its
index's shard names may lead is hub.py's rule (Checkpoint.check), applied before any file is read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import defaults
from ..artifact.io import file_sha256
from ..errors import Ps3EdgeError
from .config import PS3Config, default_select_num_each_scale, is_finite_number, is_whole_number, preset, PRESETS
from .hub import Checkpoint, CheckpointFiles, locate
from .ps3 import PS3

PREFIX = "vision_model."
# Official parameters that the feature path never uses: the SigLIP pooling head and final norm.
UNUSED_TRUNK_PREFIXES = ("trunk.attn_pool.", "trunk.norm.", "trunk.fc_norm.", "trunk.head.")
# (width, heads) of the timm SigLIP trunks a config.json's model_name may name; "so400m" covers both
# vit_so400m_patch14_siglip_384 (PS3-*-SigLIP) and vit_so400m_patch14_siglip_378 (PS3-*-SigLIP2,
# PS3_Lang-*), the same trunk. A width other than the named one (a truncated test model) is no guess.
TRUNK_BY_TIMM_NAME = {"so400m": (1152, 16), "giantopt": (1536, 16), "giant": (1408, 16),
                      "large": (1024, 16), "base": (768, 12)}
# What a hub snapshot of a PS3 checkpoint must hold: the layout of the module docstring, shards included.
PS3_FILES = CheckpointFiles(
    "PS3", ("config.json", "preprocessor_config.json", "model*.safetensors", "model.safetensors.index.json"),
    (("config.json",), ("model.safetensors", "model.safetensors.index.json")))


@dataclass
class LoadedModel:
    model: PS3
    cfg: PS3Config
    source: dict          # how to rebuild it: {"kind": "preset", ...} or {"kind": "checkpoint", ...}


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes, in name order): what
    the export records, so a rebuilt model can prove it holds the exported weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():        # the tensor's own bytes, read in place (no copy of a 385 MiB residual)
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def build(spec: str, seed: int = defaults.DEFAULT_SEED, progress=None) -> LoadedModel:
    """A preset name (seeded random weights; a preset wins over a directory or hub id of that name),
    a checkpoint directory or a Hugging Face hub id."""
    if spec in PRESETS:
        cfg = preset(spec)
        return LoadedModel(random_model(cfg, seed), cfg, {"kind": "preset", "name": spec, "seed": seed})
    checkpoint = locate(spec, PS3_FILES, progress)
    if checkpoint is not None:
        return load_checkpoint(checkpoint)
    raise Ps3EdgeError(f"'{spec}' is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory "
                       "or Hugging Face hub id (owner/name)")


# ------------------------------------------------------------------------------------------
# seeded random weights
# ------------------------------------------------------------------------------------------

def seeded_init_(module, seed: int, unit_noise=(), small_noise=()) -> None:
    """Deterministic random weights, scaled like a trained network so activations stay O(1).

    Every parameter is drawn from one CPU generator in name order, so a (module, seed) pair
    names the same weights on every machine with the same torch version: biases 0.02 * noise,
    parameters named in `unit_noise` plain noise, those in `small_noise` 0.02 * noise, other 1-D
    gains 1 + 0.1 * noise, matrices and kernels noise / sqrt(fan_in).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            # drawn into the parameter and scaled there: the same values as drawing a new tensor
            # and copying, without two temporaries the size of the largest parameter (4K: 336 MiB)
            if p.is_contiguous() and p.dtype == torch.float32:
                noise = p.normal_(generator=gen)                 # what torch.randn does into a new tensor
            else:
                noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                noise.mul_(0.02)
            elif any(key in name for key in unit_noise):
                pass
            elif any(key in name for key in small_noise):
                noise.mul_(0.02)
            elif p.ndim == 1:                                    # LayerNorm / RMSNorm / layer-scale gains
                noise.mul_(0.1).add_(1.0)
            else:                                                # matrices and conv kernels
                noise.div_(p[0].numel() ** 0.5)
            if noise is not p:
                p.copy_(noise)


def random_model(cfg: PS3Config, seed: int = defaults.DEFAULT_SEED) -> PS3:
    """A PS3 with seeded random weights (see seeded_init_)."""
    model = PS3(cfg)
    seeded_init_(model, seed, unit_noise=("prior_prompt",), small_noise=("pos_embed", "pos_emb_residual"))
    return model.eval()


# ------------------------------------------------------------------------------------------
# checkpoint directories
# ------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Ps3EdgeError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise Ps3EdgeError(f"{path} is not a JSON object")
    return data


def _weight_files(checkpoint: Checkpoint) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json names (Checkpoint.named: paths
    inside the checkpoint)."""
    path = checkpoint.path
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise Ps3EdgeError(f"{index} has no weight_map")
        return [checkpoint.named(index, s) for s in sorted(set(map(str, weight_map.values())))]
    raise Ps3EdgeError(f"{path} has no model.safetensors (or model.safetensors.index.json)")


@dataclass(frozen=True)
class Stored:
    """A tensor as its file's header describes it: where it is and its shape (no data read)."""
    file: Path
    shape: tuple[int, ...]


def _stored_tensors(files: list[Path]) -> dict[str, Stored]:
    """Every `vision_model.*` tensor of the files, from their headers alone."""
    stored = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    if key.startswith(PREFIX):
                        stored[key[len(PREFIX):]] = Stored(f, tuple(st.get_slice(key).get_shape()))
        except Exception as e:  # safetensors raises its own types for truncated / corrupt files
            raise Ps3EdgeError(f"cannot read weights {f}: {e}") from None
    if not stored:
        raise Ps3EdgeError(f"no '{PREFIX}*' tensors in {', '.join(str(f) for f in files)}")
    return stored


def _copy_weights(path: Path, stored: dict[str, Stored], params: dict[str, torch.Tensor]) -> None:
    """Copy each tensor of `params` (the model's state_dict) from its file, shard by shard and one
    tensor at a time, so the checkpoint is never held in memory beside the model. Refuses integer
    tensors where PS3 has floating-point weights (never cast: the file is not what it claims) and
    NaN or infinite weights, each naming every such tensor."""
    integral, broken = [], []
    by_file: dict[Path, list[str]] = {}
    for key in sorted(params):
        by_file.setdefault(stored[key].file, []).append(key)
    with torch.no_grad():
        for f, keys in by_file.items():
            try:
                with safe_open(str(f), framework="pt") as st:
                    for key in keys:
                        tensor = st.get_tensor(PREFIX + key)
                        if params[key].is_floating_point() and not tensor.is_floating_point():
                            integral.append(f"{PREFIX}{key} ({str(tensor.dtype).replace('torch.', '')})")
                        elif tensor.is_floating_point() and not torch.isfinite(tensor).all():
                            broken.append(PREFIX + key)
                        else:
                            params[key].copy_(tensor)
                        del tensor
            except Exception as e:  # safetensors' own types, for data that its header promised
                raise Ps3EdgeError(f"cannot read weights {f}: {e}") from None
    for what, names in (("has integer tensors where PS3 has floating-point weights: ", integral),
                        ("has NaN or infinite weights in ", broken)):
        if names:
            names.sort()
            raise Ps3EdgeError(f"checkpoint {path} {what}" + ", ".join(names[:4])
                               + (f" (+{len(names) - 4} more)" if len(names) > 4 else ""))


def config_from_checkpoint(path: Path, tensors: dict[str, Stored]) -> PS3Config:
    raw = read_json(path / "config.json")
    vc = raw.get("vision_config", raw)
    if not isinstance(vc, dict):
        raise Ps3EdgeError(f"{path / 'config.json'}: vision_config is not an object")
    mean, std = read_normalisation(path / "preprocessor_config.json")
    try:
        cfg = _config_from_dict(path, vc, tensors, mean, std)
    except (TypeError, ValueError) as e:       # a value of the wrong type, e.g. "depth": "abc"
        raise Ps3EdgeError(f"{path / 'config.json'} has an invalid value ({type(e).__name__}: {e})") from None
    try:
        return cfg.validate()
    except Ps3EdgeError as e:                   # e.g. "max_select_num_each_scale": [0, 0]
        raise Ps3EdgeError(f"{path / 'config.json'}: {e}") from None


def read_normalisation(pp: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean and std from preprocessor_config.json (each 3 numbers or one for all channels);
    CLIP's statistics, the official processor's fallback, where the file is absent."""
    if not pp.is_file():
        return defaults.CLIP_MEAN, defaults.CLIP_STD
    ppc = read_json(pp)
    values = []
    for key, short, fallback in (("image_mean", "mean", defaults.CLIP_MEAN), ("image_std", "std", defaults.CLIP_STD)):
        value = ppc.get(key, ppc.get(short, fallback))
        numbers = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        if len(numbers) != 3 or not all(is_finite_number(v) for v in numbers):
            raise Ps3EdgeError(f"{pp}: {key} must be 3 finite numbers (or one), got {value!r}")
        if key == "image_std" and min(numbers) <= 0:
            raise Ps3EdgeError(f"{pp}: image_std must be above 0 (it divides the pixels), got {value!r}")
        values.append(tuple(float(v) for v in numbers))
    return values[0], values[1]


def _config_from_dict(path: Path, vc: dict, tensors: dict[str, Stored],
                      mean: tuple[float, ...], std: tuple[float, ...]) -> PS3Config:
    if vc.get("separate_pos_emb", True) is False or vc.get("highres_selection_feature", True) is False:
        raise Ps3EdgeError("checkpoints without separate_pos_emb or highres_selection_feature are not supported")
    if vc.get("radio"):
        raise Ps3EdgeError(f"{path / 'config.json'} is a RADIO-based PS3 checkpoint (\"radio\": true), which ps3edge "
                           f"does not support; it runs the SigLIP-based ones (PS3-*-SigLIP, PS3-*-SigLIP2, PS3_Lang-*)")
    if "trunk.pos_embed" not in tensors or "trunk.blocks.0.mlp.fc1.weight" not in tensors:
        raise Ps3EdgeError(f"{path}: weights lack trunk.pos_embed / trunk.blocks.0.* - not a PS3 checkpoint")

    width = tensors["trunk.pos_embed"].shape[-1]
    blocks_in_file = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"trunk\.blocks\.(\d+)\.", k)))
    depth = vc.get("depth", blocks_in_file)
    for key, value in (("depth", depth), ("num_heads", vc.get("num_heads", 1)), ("max_select_num", vc.get("max_select_num", 1))):
        if not is_whole_number(value):                   # 4.9 is refused, never truncated to 4
            raise Ps3EdgeError(f"{path / 'config.json'} has an invalid value: {key} must be a whole number, "
                               f"got {value!r}")
    if not 1 <= depth <= blocks_in_file:
        raise Ps3EdgeError(f"config asks for depth {depth} but the weights hold {blocks_in_file} blocks "
                           f"(depth must be 1..{blocks_in_file})")
    num_heads = vc.get("num_heads")
    if num_heads is None:
        name = str(vc.get("model_name") or "")
        num_heads = next((h for key, (w, h) in TRUNK_BY_TIMM_NAME.items() if key in name and w == width), None)
        if num_heads is None:
            if width % 72:      # not SigLIP's head dim 72: any guess would silently be wrong
                raise Ps3EdgeError(f"{path / 'config.json'} does not say num_heads and its model_name "
                                   f"'{name}' names no known trunk {width} wide; add \"num_heads\" to it")
            num_heads = width // 72
    scales = tuple(sorted(vc.get("ps3_scales", [378, 756, 1512])))
    select_layers = tuple(vc.get("select_based_on_layer", [0, 9, 18, 26]))
    budget = vc.get("max_select_num_each_scale") or default_select_num_each_scale(
        scales, vc.get("max_select_num", 1280))

    return PS3Config(
        name=vc.get("name") or path.name, width=width, depth=depth, num_heads=num_heads,
        mlp_dim=tensors["trunk.blocks.0.mlp.fc1.weight"].shape[0], scales=scales,
        select_layers=select_layers, select_num_each_scale=tuple(budget),
        conv_hidden=_positive_int(path, vc, "highres_selection_module_hidden_dim", 512),
        conv_out=_positive_int(path, vc, "highres_selection_module_out_dim", 512),
        conv_depth=_positive_int(path, vc, "highres_selection_module_depth", 3),
        conv_kernel=_positive_int(path, vc, "highres_selection_module_kernel_size", 28),
        image_mean=mean, image_std=std)


def _positive_int(path: Path, vc: dict, key: str, default: int) -> int:
    """A config.json size whose PS3Config name differs from its key: checked here to name the key."""
    value = vc.get(key, default)
    if not is_whole_number(value) or value < 1:
        raise Ps3EdgeError(f"{path / 'config.json'}: {key} must be a positive whole number, got {value!r}")
    return value


def load_checkpoint(path) -> LoadedModel:
    """A PS3 from a checkpoint directory (a path, or a hub.Checkpoint whose repo and commit the
    source records too)."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint(Path(path))
    checkpoint.check(PS3_FILES)            # where its files and its index's names may lead (hub.py)
    path = checkpoint.path
    if not (path / "config.json").is_file():
        raise Ps3EdgeError(f"{path} has no config.json")
    files = _weight_files(checkpoint)
    tensors = _stored_tensors(files)
    cfg = config_from_checkpoint(path, tensors)
    model = PS3(cfg)
    expected = model.state_dict()

    def ignored(key: str) -> bool:
        if key.startswith(UNUSED_TRUNK_PREFIXES):
            return True
        m = re.match(r"trunk\.blocks\.(\d+)\.", key)
        return m is not None and int(m.group(1)) >= cfg.depth      # truncated away on purpose

    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in expected and not ignored(k))
    misshaped = sorted(f"{k} {tensors[k].shape} != {tuple(v.shape)}"
                       for k, v in expected.items() if k in tensors and tensors[k].shape != tuple(v.shape))
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise Ps3EdgeError(f"checkpoint {path} does not match the PS3 architecture - " + "; ".join(parts))
    _copy_weights(path, tensors, expected)
    digest = hashlib.sha256()
    for f in files:
        digest.update(file_sha256(f).encode())
    source = {"kind": "checkpoint", "path": str(path.resolve()), "sha256": digest.hexdigest(),
              **checkpoint.source_fields()}
    return LoadedModel(model.eval(), cfg, source)


def save_checkpoint(model: PS3, path: Path) -> None:
    """Write `model` in the official layout (flat config.json, `vision_model.*` keys)."""
    cfg = model.cfg
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    config = {
        "model_type": "ps3_vision_model", "name": cfg.name, "hidden_size": cfg.width,
        "depth": cfg.depth, "num_heads": cfg.num_heads, "ps3_scales": list(cfg.scales),
        "select_based_on_layer": list(cfg.select_layers),
        "max_select_num_each_scale": list(cfg.select_num_each_scale),
        "max_select_num": cfg.tokens_per_step,
        "highres_selection_module_hidden_dim": cfg.conv_hidden,
        "highres_selection_module_out_dim": cfg.conv_out,
        "highres_selection_module_depth": cfg.conv_depth,
        "highres_selection_module_kernel_size": cfg.conv_kernel,
        "separate_pos_emb": True, "highres_selection_feature": True,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_size": cfg.max_size, "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)},
        indent=2))
