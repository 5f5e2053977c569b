"""Per-sigma gap against FID across snapshots (edm_opt.diagnose, the paper's Figure 2b): pure functions."""

import math

import numpy as np
import pytest

from edm_opt.gap_fid import GapFidPoint, gap_fid_correlation, match_gap_fid

KEYS = ["0.01", "0.1", "1", "10", "80"]


def test_correlation_finds_the_sigma_that_drives_fid():
    """FID = 3 x gap at sigma = 1 + noise; the gaps at the other sigmas are unrelated to it."""
    rng = np.random.default_rng(0)
    points = []
    for i in range(200):
        gap = {k: float(rng.uniform(0.01, 1.0)) for k in KEYS}
        fid = 3.0 * gap["1"] + 0.05 * rng.standard_normal()
        points.append(GapFidPoint(f"run{i % 10}", f"run{i % 10}", 512 * (i // 10 + 1), fid, gap))
    corr = gap_fid_correlation(points)
    assert [c.sigma for c in corr] == [0.01, 0.1, 1.0, 10.0, 80.0]
    by_sigma = {c.sigma: c for c in corr}
    assert by_sigma[1.0].pearson > 0.98 and by_sigma[1.0].spearman > 0.98 and by_sigma[1.0].n == 200
    for s in (0.01, 0.1, 10.0, 80.0):
        assert abs(by_sigma[s].pearson) < 0.25 and abs(by_sigma[s].spearman) < 0.25


def test_correlation_needs_three_points_with_spread():
    two = [GapFidPoint("a", "a", n, float(n), {"1": float(n)}) for n in (1, 2)]
    (c,) = gap_fid_correlation(two)
    assert math.isnan(c.pearson) and math.isnan(c.spearman) and c.n == 2
    flat = [GapFidPoint("a", "a", n, float(n), {"1": 0.5, "10": float(n)}) for n in (1, 2, 3)]
    c1, c10 = gap_fid_correlation(flat)
    assert math.isnan(c1.pearson) and c1.n == 3  # no spread in the gap
    assert c10.pearson == pytest.approx(1.0) and c10.spearman == pytest.approx(1.0)
    assert gap_fid_correlation([]) == []


def test_match_pairs_fid_with_the_evaluation_at_the_same_nimg():
    sigmas = [0.01, 1.0, 80.0]
    nimg = [512, 1024, 1536]
    gap = [[0.1, 0.2, 0.3], [0.05, None, 0.25], [0.01, 0.1, float("nan")]]
    fid = [(1024, 9.0), (1536, 8.0), (2000, 7.0), (512, float("nan"))]
    points = match_gap_fid("id", "name", sigmas, nimg, gap, fid)
    assert [(p.nimg, p.fid) for p in points] == [(1024, 9.0), (1536, 8.0)]  # 2000: no evaluation; NaN FID
    assert points[0].gap == {"0.01": 0.05, "80": 0.25}  # None dropped
    assert points[1].gap == {"0.01": 0.01, "1": 0.1}  # NaN dropped
    assert points[0].run_id == "id" and points[0].run_name == "name"


def _runs_of(n_runs: int, per_run: int, slope: float, seed: int) -> list[GapFidPoint]:
    """Each run's snapshots share a run-level offset in FID: FID = slope x gap + offset_run + noise."""
    rng = np.random.default_rng(seed)
    points = []
    for r in range(n_runs):
        offset = rng.normal(0, 0.5)
        for t in range(per_run):
            g = float(rng.uniform(0.1, 1.0))
            points.append(GapFidPoint(f"r{r}", f"r{r}", 512 * (t + 1), slope * g + offset + 0.1 * rng.normal(), {"1": g}))
    return points


def test_bootstrap_interval_resamples_runs():
    (c,) = gap_fid_correlation(_runs_of(12, 6, slope=2.0, seed=1), resamples=500)
    assert c.n == 72 and c.runs == 12
    assert c.pearson_lo < c.pearson < c.pearson_hi and 0 < c.pearson_lo and c.pearson_hi <= 1
    # the same data with every snapshot its own run: the interval narrows (runs carry the offsets)
    alone = [GapFidPoint(f"p{i}", f"p{i}", p.nimg, p.fid, p.gap) for i, p in enumerate(_runs_of(12, 6, 2.0, 1))]
    (d,) = gap_fid_correlation(alone, resamples=500)
    assert d.pearson == pytest.approx(c.pearson) and d.runs == 72
    assert d.pearson_hi - d.pearson_lo < c.pearson_hi - c.pearson_lo
    # deterministic given the seed; no interval without resamples or with fewer runs than a CI needs
    assert gap_fid_correlation(_runs_of(12, 6, 2.0, 1), resamples=500) == [c]
    (e,) = gap_fid_correlation(_runs_of(12, 6, 2.0, 1), resamples=0)
    assert math.isnan(e.pearson_lo) and e.pearson == pytest.approx(c.pearson)
    (f,) = gap_fid_correlation(_runs_of(4, 6, 2.0, 1))
    assert f.runs == 4 and math.isnan(f.pearson_hi) and np.isfinite(f.pearson)


def test_bootstrap_interval_covers_zero_when_fid_ignores_the_gap():
    (c,) = gap_fid_correlation(_runs_of(10, 5, slope=0.0, seed=2), resamples=500)
    assert c.pearson_lo < 0 < c.pearson_hi
