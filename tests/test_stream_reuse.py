"""Reuse between a stream's frames (runtime/reuse.py) and the per-frame deadline
(streaming/deadline.py): identical frames give the last result back, marked; a changed frame is
computed; a partly changed one encodes only its changed patches and keeps the others' features;
the refresh every N frames is the normal path's result; the chosen look-close steps fall as the
measured cost or the batch rises; and `ps3edge stream --reuse --deadline` records both per frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli, random_image

STEPS = 2                                        # a short pass: these tests check the rule, not PS3


def frame(seed: int = 0, box: tuple | None = None, value: int = 0) -> np.ndarray:
    """A 320 x 240 frame; `box` (y0, y1, x0, x1) painted `value` (a moved object)."""
    rgb = np.array(random_image(seed=seed))
    if box is not None:
        y0, y1, x0, x1 = box
        rgb[y0:y1, x0:x1] = value
    return rgb


@pytest.fixture(scope="module")
def pipeline(artifacts):
    from ps3edge.runtime.lookclose import Pipeline

    with Pipeline(artifacts("ps3-tiny")) as p:
        yield p


@pytest.fixture
def settings():
    from ps3edge.runtime.planning import LookCloseSettings

    return LookCloseSettings(num_look_close=STEPS)


def planned(result, geometry) -> np.ndarray:
    return np.sort(np.concatenate([result.plan.step_positions(geometry, t) for t in range(len(result.plan.steps))]))


def test_identical_frames_are_reused_and_a_changed_frame_is_computed(pipeline, settings):
    from ps3edge.runtime.reuse import COMPUTED, REUSED, FrameReuse

    reuse = FrameReuse(pipeline, threshold=0, refresh=10, patches=False)
    first = reuse.run([0], [frame()], settings, -2)[0]
    assert first.status == COMPUTED and first.difference is None
    alone = pipeline.run_batch([frame()], settings)[0]
    assert np.array_equal(first.result.features, alone.features)          # the normal path's result
    again = reuse.run([0], [frame().copy()], settings, -2)[0]
    assert again.status == REUSED and again.difference == 0 and again.encoded_patches == 0
    assert again.result is first.result                                   # the same result, bit for bit
    changed = reuse.run([0], [frame(box=(10, 20, 10, 20))], settings, -2)[0]
    assert changed.status == COMPUTED and changed.difference > 0
    assert np.array_equal(changed.result.features, pipeline.run_batch([frame(box=(10, 20, 10, 20))], settings)[0].features)
    # a threshold above the change reuses it; the reference stays the last computed frame
    loose = FrameReuse(pipeline, threshold=300, refresh=10, patches=False)
    loose.run([0], [frame()], settings, -2)
    assert loose.run([0], [frame(box=(10, 20, 10, 20))], settings, -2)[0].status == REUSED


def test_patch_reuse_encodes_only_the_changed_patches(pipeline, settings):
    from ps3edge.runtime.reuse import PARTIAL, FrameReuse

    geometry = pipeline.geometry
    reuse = FrameReuse(pipeline, threshold=0, refresh=10)
    before = reuse.run([0], [frame()], settings, -2)[0].result
    moved = frame(box=(100, 140, 150, 200), value=255)
    out = reuse.run([0], [moved], settings, -2)[0]
    assert out.status == PARTIAL
    # which patches changed, from the patches of both frames as the highres stage is fed them
    low_a, _ = pipeline.run_lowres([frame()])
    low_b, _ = pipeline.run_lowres([moved])
    every = np.arange(sum(g * g for g in geometry.highres_grids))
    levels = [reuse.patch_levels(low["pixels"], 0, every) for low in (low_a, low_b)]
    changed = np.nonzero((levels[0] != levels[1]).any(axis=1))[0]
    assert 0 < len(changed) < 2000
    had, now = planned(before, geometry), planned(out.result, geometry)
    expected_encoded = np.setdiff1d(now, np.setdiff1d(had, changed))
    assert out.encoded_patches == len(expected_encoded) and out.reused_patches == len(now) - len(expected_encoded)
    assert sum(t * n for t, n in out.result.highres_calls) == len(expected_encoded)   # what the highres stage ran
    n0 = geometry.lowres_grid ** 2
    feats_before = dict(zip(had.tolist(), before.features[0, n0:]))
    feats_now = dict(zip(now.tolist(), out.result.features[0, n0:]))
    kept = np.setdiff1d(now, expected_encoded)
    assert all(np.array_equal(feats_now[p], feats_before[p]) for p in kept.tolist())
    assert all(not np.array_equal(feats_now[p], feats_before[p]) for p in np.intersect1d(changed, had).tolist()
               if p in feats_now)
    # the low-res tokens and the selection are the frame's own
    full = pipeline.run_batch([moved], settings)[0]
    assert np.array_equal(out.result.features[0, :n0], full.features[0, :n0])
    assert np.array_equal(out.result.prob, full.prob)
    cos = (out.result.features[0] * full.features[0]).sum(1) / (
        np.linalg.norm(out.result.features[0], axis=1) * np.linalg.norm(full.features[0], axis=1))
    assert cos.min() > 0.5


def test_the_refresh_is_a_full_computation_equal_to_the_normal_path(pipeline, settings):
    from ps3edge.runtime.reuse import COMPUTED, PARTIAL, REUSED, FrameReuse

    reuse = FrameReuse(pipeline, threshold=0, refresh=3)
    frames = [frame(), frame(box=(0, 30, 0, 30)), frame(box=(0, 30, 0, 60)), frame(box=(0, 30, 0, 90)), frame(box=(0, 30, 0, 90))]
    statuses = []
    for rgb in frames:
        out = reuse.run([0], [rgb], settings, -2)[0]
        statuses.append(out.status)
    assert statuses == [COMPUTED, PARTIAL, PARTIAL, COMPUTED, REUSED]
    assert np.array_equal(out.result.features, pipeline.run_batch([frames[3]], settings)[0].features)
    # two sources in one batch keep apart
    two = reuse.run([0, 1], [frames[4], frames[0]], settings, -2)
    assert [o.status for o in two] == [REUSED, COMPUTED]


def test_reuse_options_are_checked():
    from ps3edge.errors import Ps3EdgeError
    from ps3edge.runtime.reuse import check_reuse

    for threshold, refresh in ((-1, 10), (float("nan"), 10), (0, 0), (0, 2.5)):
        with pytest.raises(Ps3EdgeError):
            check_reuse(threshold, refresh)


def test_the_chosen_steps_fall_as_the_measured_cost_or_the_batch_rises():
    from ps3edge.streaming.deadline import DeadlineRule, StepCost

    rule = DeadlineRule(1000, ceiling=6, margin=1.0, cost=StepCost(weight=1.0))
    assert rule.choose(2).steps == 1 and rule.choose(2).predicted_ms is None    # nothing measured: the floor
    # per frame 50 ms fixed, 20 ms a step; no overhead: D(B,s) = B * (50 + 20 s), budget 500
    rule.cost.observe(2, 6, {"preprocess": 40.0, "lowres": 60.0, "highres": 240.0}, wall_ms=340.0)
    chosen = [rule.choose(b).steps for b in (1, 2, 4)]
    assert chosen == [6, 6, 3] and all(chosen[i] >= chosen[i + 1] for i in range(2))
    # the machine gets busier: every stage twice as long
    rule.cost.observe(2, 6, {"preprocess": 80.0, "lowres": 120.0, "highres": 480.0}, wall_ms=680.0)
    assert [rule.choose(b).steps for b in (1, 2, 4)] == [6, 3, 1]
    # a frame that already waited leaves less; too little for even the floor is said so
    assert rule.choose(2, waited_ms=700).steps == 1
    over = rule.choose(8)
    assert over.steps == 1 and not over.fits and over.predicted_ms > 500
    # a running estimate moves part way
    cost = StepCost(weight=0.5)
    cost.observe(1, 1, {"lowres": 100.0, "highres": 100.0})
    cost.observe(1, 1, {"lowres": 200.0, "highres": 300.0})
    assert (cost.frame_ms, cost.step_ms) == (150.0, 200.0)


def test_the_command_line_records_reuse_and_steps_under_a_generous_deadline(artifacts, tmp_path):
    still, moving = tmp_path / "still", tmp_path / "moving"
    still.mkdir()
    moving.mkdir()
    for i in range(3):
        random_image(160, 120, seed=7).save(still / f"{i:03d}.png")          # a still scene: one picture
        Image.fromarray(frame(seed=i)).save(moving / f"{i:03d}.png")
    out = tmp_path / "r.jsonl"
    result = cli("stream", artifacts("ps3-tiny"), "--source", f"still={still}", "--source", f"moving={moving}",
                 "--fps", "4", "--loop", "--num-look-close", str(STEPS), "--reuse", "--deadline", "30000",
                 "--jsonl", out, "--max-frames", "8", "--duration", "120")
    assert result.returncode == 0, result.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["source"] for r in recs} == {"still", "moving"}
    for r in recs:
        assert 1 <= r["steps"] <= STEPS and r["deadline_ms"] == 30000
        assert r["deadline_met"] is True and r["latency_ms"] < 30000
        assert r["status"] in ("computed", "partial", "reused")
    still_recs = [r for r in recs if r["source"] == "still"]
    assert still_recs[0]["status"] == "computed"
    assert all(r["status"] == "reused" and r["encoded_patches"] == 0 for r in still_recs[1:])
    assert "reused" in result.stderr
    bad = cli("stream", artifacts("ps3-tiny"), "--source", f"still={still}", "--reuse", "--refresh", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --refresh")
