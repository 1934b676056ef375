"""Two runs of PS3 compared stage by stage: the metrics, the checks, and their judging.

Running is the callers' job (parity.py: the official model against our pipelines;
calibration/report.py: reduced-precision stages against the FP32 ones). Each side hands over its
outputs as a dict by name - stage outputs under their ONNX names, and for a whole run `prob`,
`plan` (our planner's Plan), `selection_maps` and `features`, plus whatever a check of the caller
derives from them. A `Check` names a row, how it is measured (max |diff|, the minimum per-token
cosine, the selection's IoU and whether a difference is only ties) and how it is judged: against
the precision's `Tolerance`, against a fixed bound, or not at all (an informative row).

Measuring and judging are apart, as in Polygraphy's Comparator and CompareFunc: `compare` measures
one input and judges it, or (without a tolerance) applies only the fixed bounds, so that `worst`
can merge many inputs and judge the worst value of each row once.

The features measure (feature_diff) and the tolerance with its features rule live in metrics.py,
below the exporter, whose check of the files it writes uses them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .metrics import Tolerance, feature_diff   # noqa: F401 - compare's callers take them from here too

Outputs = Mapping[str, Any]

# how a row is judged
FEATURES = "features"          # max |diff| and min cosine against the tolerance
BOUND = "bound"                # max |diff| against the check's fixed bound (None: no bound)
SELECTION = "selection"        # IoU against the tolerance, or near ties where the precision accepts them
INFORMATIVE = "informative"    # measured only; the measure's own verdict (`Measured.agrees`) still counts

NEAR_TIES = "(near ties)"


@dataclass
class ParityRow:
    stage: str
    compared: str
    max_abs: float | None = None
    min_cosine: float | None = None
    iou: float | None = None           # selection IoU, where a row measures one
    selection: str = ""
    ok: bool = True


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------

def selection_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def identical_selection(maps_a, maps_b) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(maps_a, maps_b))


def tie_equivalent(ours: np.ndarray, theirs: np.ndarray, scale_prob: np.ndarray) -> bool:
    """Same number of patches and the same multiset of probabilities selected."""
    a = np.sort(scale_prob[ours.astype(bool)])
    b = np.sort(scale_prob[theirs.astype(bool)])
    return a.shape == b.shape and bool(np.array_equal(a, b))


def near_ties_only(plan_ref, plan_test, prob_error: float) -> bool:
    """True when every patch that one selection has and the other lacks had, in the reference,
    a probability within 2 x `prob_error` of the reference's cut - the swap is what the measured
    probability error can do to near-tied patches, not a change of what the model looks at."""
    for ref_map, test_map, prob in zip(plan_ref.selection_maps, plan_test.selection_maps, plan_ref.scale_probs):
        ref_sel, test_sel = ref_map.astype(bool), test_map.astype(bool)
        moved = ref_sel != test_sel
        if not moved.any():
            continue
        cut = float(prob[ref_sel].min()) if ref_sel.any() else float(prob.max())
        if np.any(np.abs(prob[moved] - cut) > 2 * prob_error):
            return False
    return True


# ------------------------------------------------------------------------------------------
# measures: (reference outputs, test outputs) -> Measured
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    max_abs: float | None = None
    min_cosine: float | None = None
    iou: float | None = None
    selection: str = ""
    agrees: bool = True        # False: the measure itself found a difference no tolerance excuses


Measure = Callable[[Outputs, Outputs], Measured]


def features(key: str, test_key: str | None = None, view: Callable | None = None) -> Measure:
    """Max |diff| and the least per-token cosine of one output (the test's `test_key`, if named)."""
    def measure(ref: Outputs, test: Outputs) -> Measured:
        a, b = ref[key], test[test_key or key]
        if view is not None:
            a, b = view(a), view(b)
        return Measured(*feature_diff(b, a))
    return measure


def difference(key: str, test_key: str | None = None) -> Measure:
    """Max |diff| of one output (the test's `test_key`, if named), in the outputs' own dtype."""
    def measure(ref: Outputs, test: Outputs) -> Measured:
        return Measured(max_abs=float(np.abs(test[test_key or key] - ref[key]).max()))
    return measure


def selection_up_to_ties(ref: Outputs, test: Outputs) -> Measured:
    """Per scale: identical, equivalent up to equal probabilities (the test plan's), or DIFFERENT."""
    parts, agrees = [], True
    the_plan = test["plan"]
    for mine, theirs, sp in zip(the_plan.selection_maps, ref["selection_maps"], the_plan.scale_probs):
        if np.array_equal(mine, theirs):
            parts.append("identical")
        elif tie_equivalent(mine, theirs, sp):
            parts.append(f"IoU {selection_iou(mine, theirs):.3f} (ties)")
        else:
            parts.append(f"IoU {selection_iou(mine, theirs):.3f} DIFFERENT")
            agrees = False
    return Measured(selection=", ".join(parts), agrees=agrees)


def selection_up_to_near_ties(ref: Outputs, test: Outputs) -> Measured:
    """The least IoU over scales; "identical", or the IoUs, marked when only near ties moved."""
    plan_r, plan_t = ref["plan"], test["plan"]
    ious = [selection_iou(a, b) for a, b in zip(plan_t.selection_maps, plan_r.selection_maps)]
    iou_text = "IoU " + ", ".join(f"{x:.3f}" for x in ious)
    if identical_selection(plan_t.selection_maps, plan_r.selection_maps):
        text = "identical"
    elif near_ties_only(plan_r, plan_t, float(np.abs(test["prob"] - ref["prob"]).max())):
        text = f"{iou_text} {NEAR_TIES}"
    else:
        text = iou_text
    return Measured(iou=min(ious), selection=text)


# ------------------------------------------------------------------------------------------
# checks and judging
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    stage: str
    measure: Measure
    judge: str = FEATURES
    bound: float | None = None


def judge(row: ParityRow, check: Check, tol: Tolerance) -> bool:
    if check.judge == FEATURES:
        return tol.accepts_features(row.max_abs, row.min_cosine)
    if check.judge == BOUND:
        return check.bound is None or row.max_abs <= check.bound
    if check.judge == SELECTION:
        return row.iou >= tol.min_iou - 1e-12 or (tol.near_ties and row.selection.endswith(NEAR_TIES))
    return True


def compare(checks: Sequence[Check], ref: Outputs, test: Outputs, label: str,
            tol: Tolerance | None) -> list[ParityRow]:
    """One row per check, `test` against `ref`. Without `tol` only fixed bounds (and the measures'
    own verdicts) are judged now; the tolerance judges the worst rows over many inputs (`worst`)."""
    rows = []
    for check in checks:
        m = check.measure(ref, test)
        row = ParityRow(check.stage, label, m.max_abs, m.min_cosine, m.iou, m.selection)
        deferred = tol is None and check.judge in (FEATURES, SELECTION)
        row.ok = m.agrees and (deferred or judge(row, check, tol))
        rows.append(row)
    return rows


def _kind(selection: str) -> int:
    return 0 if selection == "identical" else 1 if selection.endswith(NEAR_TIES) else 2


def _merge(m: ParityRow, r: ParityRow, check: Check) -> None:
    """Fold row `r` of another input into `m`, keeping the worse value of each column."""
    if r.max_abs is not None:
        m.max_abs = max(m.max_abs, r.max_abs)
    if r.min_cosine is not None:
        m.min_cosine = min(m.min_cosine, r.min_cosine)
    if check.judge == SELECTION:
        # the worst input: a real difference over near ties over identical, then the lower IoU
        if (_kind(r.selection), -r.iou) > (_kind(m.selection), -m.iou):
            m.selection = r.selection
        m.iou = min(m.iou, r.iou)
    elif r.min_cosine is not None and r.min_cosine <= m.min_cosine:
        m.selection = r.selection               # a feature row's note (token count) of its worst input
    m.ok = m.ok and r.ok


def worst(rows_by_input: Mapping[str, list[ParityRow]], checks: Sequence[Check], tol: Tolerance) -> list[ParityRow]:
    """Per (stage, compared), the worst of each column over the inputs, judged against `tol`."""
    by_stage = {c.stage: c for c in checks}
    merged: dict[tuple[str, str], ParityRow] = {}
    for rows in rows_by_input.values():
        for r in rows:
            key = (r.stage, r.compared)
            if key not in merged:
                merged[key] = ParityRow(r.stage, r.compared, r.max_abs, r.min_cosine, r.iou, r.selection, r.ok)
            else:
                _merge(merged[key], r, by_stage[r.stage])
    for m in merged.values():
        m.ok = m.ok and judge(m, by_stage[m.stage], tol)
    return list(merged.values())
