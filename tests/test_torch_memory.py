"""What keeps the staged torch path's memory down without changing a value: the highres
position rows built on demand equal the baked table bit for bit (so the runtime holds no table
beside the residuals), the torch highres calls bounded by their MLP activation give the same
features, the seeded weights drawn in place equal the old draw-and-copy, and the weights digest
reads tensors in place."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ps3edge import defaults
from ps3edge.artifact.manifest import load_manifest
from ps3edge.model import HighResStage
from ps3edge.model.weights import build, seeded_init_, state_dict_sha256
from ps3edge.runtime.lookclose import Pipeline
from ps3edge.runtime.planning import settings_from_env
from ps3edge.runtime.runners.torch import cpu_rows_per_call, release_free_heap


@pytest.mark.parametrize("name", ["ps3-tiny-4k", "ps3-tiny"])
def test_position_rows_on_demand_equal_the_baked_table_bit_for_bit(name):
    model = build(name).model
    with torch.no_grad():
        table = model.highres_position_table()
        every = model.highres_position_rows(torch.arange(len(table), dtype=torch.int32)[None], channels=24)
        assert torch.equal(every[0], table)
        positions = torch.from_numpy(np.random.default_rng(1).integers(0, len(table), (3, 100)).astype(np.int32))
        assert torch.equal(model.highres_position_rows(positions), table[positions.long()])
        # a call that reaches one scale only
        assert torch.equal(model.highres_position_rows(positions[:, :1] % 100), table[positions[:, :1].long() % 100])


def test_the_unbaked_highres_stage_holds_no_table_and_gives_the_same_features():
    model = build("ps3-tiny-4k").model
    cfg = model.cfg
    baked, lazy = HighResStage(model, [-2, -1]), HighResStage(model, [-2, -1], bake_positions=False)
    assert lazy.position_table is None and "position_table" not in dict(lazy.named_buffers())
    rng = np.random.default_rng(2)
    patches = torch.from_numpy(rng.standard_normal((2, 40, 588)).astype(np.float32))
    positions = torch.from_numpy(rng.integers(0, len(baked.position_table), (2, 40)).astype(np.int32))
    step_image = torch.zeros(2, dtype=torch.int32)
    kv = torch.from_numpy(rng.standard_normal((cfg.depth, 2, 1, cfg.num_heads, cfg.lowres_tokens,
                                               cfg.width // cfg.num_heads)).astype(np.float32))
    with torch.inference_mode():
        assert torch.equal(lazy(patches, positions, step_image, kv), baked(patches, positions, step_image, kv))


def test_torch_highres_calls_are_bounded_by_their_mlp_activation(artifacts, image, monkeypatch):
    art = artifacts("ps3-tiny")
    manifest = load_manifest(art)
    assert cpu_rows_per_call(manifest) is None                  # the tiny model's 6 default steps fit
    settings = settings_from_env({}, num_look_close=2, mode="after_image")
    with Pipeline(art, "torch", device="cpu") as pipe:
        assert pipe.stages["highres"].module.position_table is None      # one copy of the positions
        assert pipe.steps_per_call() == 6
        whole = pipe.run(image, settings)
    per_row = manifest.geometry.max_tokens_per_highres_call * manifest.config.mlp_dim * 4
    monkeypatch.setattr(defaults, "TORCH_CPU_HIGHRES_MLP_BYTES", per_row)
    assert cpu_rows_per_call(manifest) == 1
    with Pipeline(art, "torch", device="cpu") as pipe:
        assert pipe.steps_per_call() == 1
        one_by_one = pipe.run(image, settings)
    assert whole.highres_calls == [(2, 2560)] and one_by_one.highres_calls == [(1, 2560)] * 2
    assert np.abs(one_by_one.features - whole.features).max() <= 1e-5
    release_free_heap()                                          # harmless to call at any time


def _old_seeded_init(module, seed, unit_noise=(), small_noise=()):
    """seeded_init_ as it was: a new tensor drawn, scaled, and copied in."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif any(key in name for key in unit_noise):
                p.copy_(noise)
            elif any(key in name for key in small_noise):
                p.copy_(0.02 * noise)
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seeded_weights_drawn_in_place_equal_the_old_draw(dtype):
    def module():
        return torch.nn.Sequential(torch.nn.Linear(33, 17), torch.nn.LayerNorm(17), torch.nn.Conv2d(3, 5, 3),
                                   torch.nn.Embedding(7, 4)).to(dtype)
    old, new = module(), module()
    _old_seeded_init(old, 3, unit_noise=("3.",), small_noise=("2.",))
    seeded_init_(new, 3, unit_noise=("3.",), small_noise=("2.",))
    assert all(torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters()))


def test_the_weights_digest_is_the_one_of_the_tensors_bytes():
    model = build("ps3-tiny").model
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    assert state_dict_sha256(model) == h.hexdigest()
