"""The |x| histogram an activation tensor's INT8 threshold is chosen from, and the ways to choose it.

`AbsHistogram` keeps counts of |x| in bins of a fixed width, set by the first sample to
HIST_BINS bins over its range, and adds bins when a later sample reaches further. Thresholds:
  percentile  the upper edge of the bin where the cumulative count reaches q percent;
  entropy     TensorRT's entropy calibration. For each candidate threshold, at bin index i (from
              ENTROPY_LEVELS bins up to all n of them, at most ENTROPY_CANDIDATES candidates):
                p = the first i bins, with every count beyond them added to bin i-1 (clipping);
                q = p's bins merged into ENTROPY_LEVELS levels (edges floor(linspace(0, i, 129))),
                    each level's count of the first i bins spread evenly over its nonzero bins of p
                    (zero bins stay 0);
                KL(p || q) of the two normalised, infinite where p has mass and q has none.
              The threshold is the middle of bin i for the first i of least KL, capped at the
              largest |x| seen.

KL(p || q) is not summed bin by bin. q is constant over a level's nonzero bins, so with
P = sum(p) (every count), Q = sum(q) (the counts of the first i bins), S_j the counts of level j
in the first i bins, Z_j its nonzero bins of p and P_j its share of p (S_j, plus the clipped
counts in the last level):
    KL = sum_b p_b log p_b / P - log P - sum_j P_j log(S_j / Z_j) / P + log Q,
and sum_b p_b log p_b is a prefix sum over the histogram plus the clipped last bin. That makes
each candidate cost ENTROPY_LEVELS terms rather than i: summing bin by bin, candidate by
candidate, was a third of a small model's INT8 calibration.
"""

from __future__ import annotations

import numpy as np

HIST_BINS = 2048
ENTROPY_LEVELS = 128
ENTROPY_CANDIDATES = 512


class AbsHistogram:
    """Histogram of |x| with a fixed bin width set by the first sample; grows with the range."""

    def __init__(self):
        self.counts: np.ndarray | None = None
        self.width = 0.0
        self.absmax = 0.0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x.astype(np.float32, copy=False)).ravel()
        amax = float(a.max()) if a.size else 0.0
        self.absmax = max(self.absmax, amax)
        if self.counts is None:
            self.width = (amax or 1e-8) / HIST_BINS
            self.counts = np.zeros(HIST_BINS, np.int64)
        need = int(np.floor(amax / self.width)) + 1
        if need > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros(need - len(self.counts), np.int64)])
        idx = np.minimum((a / self.width).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(idx, minlength=len(self.counts))

    def percentile(self, q: float) -> float:
        cdf = np.cumsum(self.counts) / max(self.counts.sum(), 1)
        i = int(np.searchsorted(cdf, q / 100.0))
        return min((i + 1) * self.width, self.absmax)

    def entropy(self) -> float:
        """TensorRT's entropy calibration, thresholds searched over bin edges (see the module docstring)."""
        hist = self.counts.astype(np.float64)
        n = len(hist)
        if n <= ENTROPY_LEVELS or hist.sum() == 0:
            return self.absmax
        cuts = np.arange(ENTROPY_LEVELS, n + 1, max(1, n // ENTROPY_CANDIDATES))
        kl = clipped_kl(hist, cuts)
        best = int(np.argmin(kl))                      # the first of equal minima
        best_i = int(cuts[best]) if np.isfinite(kl[best]) else n
        return min((best_i + 0.5) * self.width, self.absmax)


def clipped_kl(hist: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """KL(p || q) for each candidate cut i in `cuts`, by the module docstring's per-level formula;
    inf where q has no mass at all, or none in a bin where p has some. `hist` holds whole counts
    in float64, so every sum of counts here is exact."""
    h_sum = np.concatenate([[0.0], np.cumsum(hist)])                       # h_sum[k] = counts of bins < k
    nz_sum = np.concatenate([[0.0], np.cumsum(hist > 0, dtype=np.float64)])
    hlogh_sum = np.concatenate([[0.0], np.cumsum(xlogx(hist))])
    total = h_sum[-1]                                                      # P
    clipped = total - h_sum[cuts]                                          # the counts beyond each cut
    # linspace over all cuts at once computes, row by row, what it computes for one cut
    edges = np.linspace(0, cuts, ENTROPY_LEVELS + 1, axis=1).astype(np.int64)   # (c, levels+1)
    last_h = hist[cuts - 1]
    last_p = last_h + clipped                                              # bin i-1 of p
    s = np.diff(h_sum[edges], axis=1)                                      # (c, levels): S_j
    z = np.diff(nz_sum[edges], axis=1)                                     # (c, levels): Z_j, as in hist
    z[:, -1] += (last_p > 0).astype(np.float64) - (last_h > 0)             # ... and as in p
    share = s.copy()                                                       # (c, levels): P_j
    share[:, -1] += clipped
    q_total = h_sum[cuts]                                                  # Q
    p_log_p = hlogh_sum[cuts - 1] + xlogx(last_p)
    q_level = (z > 0) & (s > 0)                                            # levels where q has mass
    level_terms = np.where(q_level, share * np.log(np.where(q_level, s / np.maximum(z, 1), 1.0)), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        kl = (p_log_p - level_terms) / total - np.log(total) + np.log(q_total)
    p_mass_without_q = ((z > 0) & (s == 0)).any(axis=1)
    kl[(q_total == 0) | p_mass_without_q] = np.inf
    return kl


def xlogx(v: np.ndarray) -> np.ndarray:
    """v log v, 0 where v is 0."""
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1.0)), 0.0)
