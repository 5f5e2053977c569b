"""The per-sigma gap against FID across snapshots (the paper's Figure 2b): which noise levels track sample quality.

Points are (run, snapshot) pairs with an FID; each carries the held-out gap J_sigma(theta) - J*_sigma (per-dimension
x0 MSE) of the evaluation at the same nimg, read from the run's per-sigma history.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from . import EdmOptError
from . import contract as C
from .diffusion import sigma_key
from .fileio import write_json
from .plots import plot_gap_fid
from .scaling import MIN_RUNS_FOR_CI
from .tracking import find_runs, load_json_artifact, metric_history


class GapFidError(EdmOptError, ValueError):
    """No snapshots with FID to correlate."""


@dataclass(frozen=True)
class GapFidPoint:
    """One (run, snapshot) with FID: the held-out per-sigma gap J_sigma(theta) - J*_sigma (per-dimension x0
    MSE) of the evaluation at the same nimg, keyed by sigma key (`format(s, ".4g")`), and the FID there."""

    run_id: str
    run_name: str
    nimg: int
    fid: float
    gap: dict[str, float]


@dataclass(frozen=True)
class GapFidCorrelation:
    """Correlation across (run, snapshot) points of the gap at one sigma with FID: n points from `runs` runs, and
    the 95% bootstrap interval of Pearson's rho [pearson_lo, pearson_hi] from resampling whole runs."""

    sigma: float
    pearson: float
    spearman: float
    n: int
    runs: int = 0
    pearson_lo: float = float("nan")
    pearson_hi: float = float("nan")


def match_gap_fid(run_id: str, run_name: str, sigmas, nimg, gap, fid) -> list[GapFidPoint]:
    """Pair each FID with the per-sigma gap evaluated at the same nimg.

    sigmas [K]; nimg [T] the steps of the held-out evaluations; gap [T][K] (None or NaN where missing);
    fid: (nimg, FID) pairs. FID steps without an evaluation at exactly that nimg are skipped.
    """
    row_at = {int(n): i for i, n in enumerate(nimg)}
    keys = [sigma_key(s) for s in sigmas]
    points = []
    for step, value in fid:
        i = row_at.get(int(step))
        if i is None or not np.isfinite(value):
            continue
        g = {k: float(v) for k, v in zip(keys, gap[i]) if v is not None and np.isfinite(v)}
        if g:
            points.append(GapFidPoint(run_id, run_name, int(step), float(value), g))
    return points


def gap_fid_points(uri: str, experiment: str, parent_run_id: str | None = None) -> list[GapFidPoint]:
    """All (run, snapshot) points with FID in an MLflow experiment (children of `parent_run_id` if given).

    The gap at each FID step comes from the run's per-sigma history (`per_sigma.json`, loss_x0 - jstar) where
    it has that step, else from the metric histories (`contract.PerSigmaHistory.from_metric_histories`).
    """
    points = []
    for run in find_runs(uri, experiment, parent_run_id):
        if C.FID not in run.metrics:
            continue
        fid = metric_history(uri, run.run_id, C.FID)
        d = load_json_artifact(uri, run.run_id, C.PER_SIGMA_ARTIFACT)
        found = []
        if d and d.get("nimg"):
            h = C.PerSigmaHistory.from_json(d)
            found = match_gap_fid(run.run_id, run.run_name, h.sigmas, h.nimg, h.array("loss_x0") - h.jstar, fid)
        matched = {p.nimg for p in found}
        missing = [(n, v) for n, v in fid if n not in matched]
        if missing:
            h = C.PerSigmaHistory.from_metric_histories(run.metrics, lambda k: metric_history(uri, run.run_id, k),
                                                        rows=())
            found += match_gap_fid(run.run_id, run.run_name, h.sigmas, h.nimg, h.array("loss_x0") - h.jstar, missing)
        points.extend(sorted(found, key=lambda p: p.nimg))
    return points


def pearson_run_bootstrap(pairs: np.ndarray, run: np.ndarray, resamples: int, rng: np.random.Generator
                          ) -> tuple[float, float]:
    """95% percentile interval of Pearson's rho of pairs [n, 2] (gap, FID) when whole runs are resampled with
    replacement (the snapshots of one run are not independent draws). NaN with fewer than MIN_RUNS_FOR_CI runs,
    or when under half the resamples have a defined rho."""
    ids = np.unique(run)
    if len(ids) < MIN_RUNS_FOR_CI or resamples < 1:
        return float("nan"), float("nan")
    members = [np.flatnonzero(run == i) for i in ids]
    rho = []
    for draw in rng.integers(0, len(ids), size=(resamples, len(ids))):
        x, y = pairs[np.concatenate([members[j] for j in draw])].T
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            rho.append(np.corrcoef(x, y)[0, 1])
    if len(rho) < resamples / 2:
        return float("nan"), float("nan")
    lo, hi = np.quantile(rho, [0.025, 0.975])
    return float(lo), float(hi)


def gap_fid_correlation(points: list[GapFidPoint], resamples: int = 1000, seed: int = 0) -> list[GapFidCorrelation]:
    """Pearson and Spearman correlation of gap_sigma with FID per sigma, over all points, by sigma, with a
    run-resampling bootstrap interval of Pearson's rho (`resamples` draws; 0: none).

    Fewer than 3 points, or no spread, at a sigma: NaN correlations (n says how many points there were).
    """
    keys = sorted({k for p in points for k in p.gap}, key=float)
    rng = np.random.default_rng(seed)
    out = []
    for k in keys:
        used = [p for p in points if k in p.gap]
        pairs = np.array([(p.gap[k], p.fid) for p in used], dtype=np.float64).reshape(-1, 2)
        run = np.array([p.run_id for p in used])
        pearson = spearman = lo = hi = float("nan")
        if len(pairs) >= 3 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # near-constant input: scipy warns and returns what it can
                pearson = float(pearsonr(pairs[:, 0], pairs[:, 1])[0])
                spearman = float(spearmanr(pairs[:, 0], pairs[:, 1])[0])
            lo, hi = pearson_run_bootstrap(pairs, run, resamples, rng)
        out.append(GapFidCorrelation(float(k), pearson, spearman, len(pairs), len(set(run)), lo, hi))
    return out


def gap_fid_report(uri: str, experiment: str, out: Path, parent_run_id: str | None = None, echo=print) -> list:
    """`edm-opt diagnose --runs EXPERIMENT`: per-sigma correlation of gap and FID across snapshots (table, plot)."""
    points = gap_fid_points(uri, experiment, parent_run_id)
    if not points:
        raise GapFidError(f"no snapshots with FID in experiment {experiment!r} at {uri}: run `edm-opt evaluate` "
                            f"on its runs (or train with --fid-every) first")
    corr = gap_fid_correlation(points)
    echo(f"gap vs FID across {len(points)} snapshots of {len({p.run_id for p in points})} runs in {experiment!r}")
    echo(f"{'sigma':>8} {'pearson':>8} {'95% CI (runs resampled)':>24} {'spearman':>9} {'n':>4} {'runs':>5}")
    for c in corr:
        echo(f"{sigma_key(c.sigma):>8} {c.pearson:8.3f} {f'[{c.pearson_lo:.3f}, {c.pearson_hi:.3f}]':>24} "
             f"{c.spearman:9.3f} {c.n:4d} {c.runs:5d}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gap_fid.json", {"points": [p.__dict__ for p in points], "correlation": [c.__dict__ for c in corr]})
    echo(f"wrote {plot_gap_fid(points, corr, out / 'gap_fid.png')}")
    return corr
