"""The PyTorch model an artifact was exported from, rebuilt from the weight source its manifest
records (a preset and its seed, or a checkpoint and its sha256) and checked against the
manifest's model config: what the torch backend runs and what parity compares."""

from __future__ import annotations

from .. import defaults
from ..errors import Ps3EdgeError
from ..model import build, load_checkpoint
from ..model.hub import recorded_checkpoint
from ..model.weights import state_dict_sha256


def rebuild_torch_model(manifest, loaded=None):
    """Our PyTorch PS3 with the artifact's weights (preset seed or the checkpoint, sha256 checked).

    `loaded` (a weights.LoadedModel the caller already holds, e.g. VILA-HD's vision tower) is
    used instead of building the model again, after the same checks."""
    source = manifest.source
    if loaded is not None:
        keys = ("kind", "name", "seed") if source.get("kind") == "preset" else ("kind", "sha256")
        if any(loaded.source.get(k) != source.get(k) for k in keys):
            raise Ps3EdgeError("the PS3 model given to the torch backend is not the one the artifact was exported from")
    elif source.get("kind") == "preset":
        loaded = build(source["name"], seed=int(source.get("seed", defaults.DEFAULT_SEED)))
    elif source.get("kind") == "checkpoint":
        loaded = load_checkpoint(recorded_checkpoint(source))
        if loaded.source["sha256"] != source.get("sha256"):
            raise Ps3EdgeError(f"checkpoint {source['path']} changed since export; the torch backend "
                               "would not match the artifact - re-export")
    else:
        raise Ps3EdgeError("the manifest does not say where the weights came from; the torch backend needs it")
    expected = manifest.config
    if loaded.cfg.to_dict() != expected.to_dict():
        raise Ps3EdgeError("the model rebuilt for the torch backend differs from the manifest's config")
    recorded = manifest.weights_sha256                 # every export records it; never skipped for its absence
    if recorded is None:
        raise Ps3EdgeError("the manifest has no weights_sha256, so the torch backend cannot check that it rebuilt "
                           "the exported weights - re-export the model")
    if state_dict_sha256(loaded.model) != recorded:
        raise Ps3EdgeError("the weights rebuilt for the torch backend are not the exported ones (their sha256 differs "
                           "from weights_sha256: the manifest's source or the checkpoint changed since export) - "
                           "re-export the model")
    return loaded.model
