"""PS3 in plain PyTorch: architecture config and presets, the network, its stages, its weights."""

from .config import PS3Config, PRESETS, preset
from .ps3 import PS3
from .stages import LowResStage, SelectorStage, HighResStage
from .weights import LoadedModel, build, load_checkpoint, random_model, save_checkpoint

__all__ = ["PS3Config", "PRESETS", "preset", "PS3", "LowResStage", "SelectorStage", "HighResStage",
           "LoadedModel", "build", "load_checkpoint", "random_model", "save_checkpoint"]
