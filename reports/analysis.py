"""What a report computes from the runs: frontier fits, schedules at equal compute, loss shares and gap
ratios per sigma, gap-FID correlation.

Fits use `edm_opt.scaling` on the frontier over runs (method.md section 5): f = cumulative training compute
(FLOPs), J = the reference total or the held-out loss at one sigma (per-dimension x0 MSE), J* the
matching optimal loss of the reference run (the first run with data), given, never fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edm_opt.gap_fid import GapFidCorrelation, GapFidPoint, gap_fid_correlation, match_gap_fid
from edm_opt.diffusion import sigma_key
from edm_opt.scaling import (
    FRONTIER_POINTS,
    ScalingComparison,
    compute_frontier,
    fit_frontier,
    fit_power_law_free_floor,
)

from .data import ExperimentData, RunData

REFERENCE_LABEL = "reference total"
MIN_LOGGED_POINTS = 3


@dataclass(frozen=True)
class SeriesFit:
    """Raw, J*-subtracted and free-floor fits of one loss series on the frontier over `n_runs` runs.

    sigma: None for the reference total. jstar: the J* subtracted (per-dimension x0 MSE). frontier:
    (f in FLOPs, J) of `compute_frontier`, None without data. fits: None without data (`note` says why).
    """

    label: str
    sigma: float | None
    jstar: float
    n_runs: int
    frontier: tuple[np.ndarray, np.ndarray] | None
    fits: ScalingComparison | None
    note: str = ""


@dataclass(frozen=True)
class ScheduleFrontier:
    """Frontier over one schedule's runs of the reference gap J - J* (f in FLOPs)."""

    schedule: str
    n_runs: int
    f: np.ndarray
    gap: np.ndarray


@dataclass(frozen=True)
class ScheduleComparison:
    """A schedule's reference-gap frontier against the baseline's, on their common compute range.

    f_range: (lowest, highest) FLOPs compared; f, ratio: the common log-spaced f grid (points where both
    gaps are positive) and gap / baseline gap there; fraction_lower: share of it where the ratio is
    below 1; gap_ratio: its geometric mean.
    """

    schedule: str
    baseline: str
    f_range: tuple[float, float]
    f: np.ndarray
    ratio: np.ndarray
    fraction_lower: float
    gap_ratio: float
    note: str = ""

    @property
    def n_points(self) -> int:
        return int(self.f.size)


@dataclass(frozen=True)
class ShareProfile:
    """A series' share of the training signal per grid sigma (VE) at its runs' last status, averaged over
    the `n_runs` runs that logged shares there (fractions; each run's sum to 1)."""

    schedule: str
    sigmas: np.ndarray
    share: np.ndarray
    n_runs: int


@dataclass(frozen=True)
class GapRatioProfile:
    """A series' final per-sigma gap (held-out loss minus J*, per-dimension x0 MSE) over its baseline's.

    ratio [K]: the geometric mean over `n_pairs` pairs of runs with the same preset and seed, or, when no
    pair matches (n_pairs 0), the ratio of the two series' mean final gaps over all their runs; NaN where a
    gap is not positive.
    """

    schedule: str
    baseline: str
    sigmas: np.ndarray
    ratio: np.ndarray
    n_pairs: int


@dataclass
class Analysis:
    reference: SeriesFit
    sigma_fits: list[SeriesFit]
    frontiers: dict[str, ScheduleFrontier]
    comparisons: list[ScheduleComparison]
    gap_fid_points: list[GapFidPoint]
    gap_fid: list[GapFidCorrelation]
    shares: list[ShareProfile] = field(default_factory=list)
    gap_ratios: list[GapRatioProfile] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Scaling fits


def fit_series(label: str, sigma: float | None, curves: list, jstar: float, bootstrap: int,
               seed: int = 0) -> SeriesFit:
    """Frontier of the (f, J) curves and its three fits; CIs resample runs (`fit_frontier`)."""
    if not curves:
        return SeriesFit(label, sigma, jstar, 0, None, None, "no run has data for this series")
    frontier = compute_frontier(curves)
    # The frontier interpolates runs on a 64-point grid; a fit needs 3 logged points behind it.
    lo, hi = frontier[0][0], frontier[0][-1]
    logged = sum(int(np.sum((f >= lo) & (f <= hi))) for f, _ in curves)
    if logged < MIN_LOGGED_POINTS:
        return SeriesFit(label, sigma, jstar, len(curves), frontier, None,
                         f"only {logged} logged points on the frontier (a fit needs {MIN_LOGGED_POINTS})")
    fits = ScalingComparison(raw=fit_frontier(curves, None, bootstrap, seed),
                             subtracted=fit_frontier(curves, jstar, bootstrap, seed),
                             free_floor=fit_power_law_free_floor(*frontier))
    return SeriesFit(label, sigma, jstar, len(curves), frontier, fits)


def fit_reference_total(exp: ExperimentData, bootstrap: int = 1000) -> SeriesFit:
    """Fits of the reference total J = loss/ref_total against f = compute/flops_total."""
    ref = exp.reference
    if ref is None:
        return SeriesFit(REFERENCE_LABEL, None, math.nan, 0, None, None, "no run has a held-out evaluation")
    curves = [c for r in exp.with_history if (c := r.curve()) is not None]
    return fit_series(REFERENCE_LABEL, None, curves, ref.jstar_ref, bootstrap)


def panel_sigmas(sigmas: np.ndarray, count: int = 8) -> list[int]:
    """Indices of up to `count` grid sigmas spread evenly (in ln sigma) over the grid, ends included."""
    k = len(sigmas)
    return sorted(set(np.linspace(0, k - 1, min(count, k)).round().astype(int).tolist())) if k else []


def fit_sigma(exp: ExperimentData, key: str, bootstrap: int = 200) -> SeriesFit:
    """Fits of the held-out loss at one sigma (`loss_x0/sigma_<key>`) against f, J* = J*_sigma."""
    ref = exp.reference
    jstar = float(ref.jstar[ref.keys.index(key)])
    curves = [c for r in exp.with_history if key in r.keys and (c := r.curve(r.keys.index(key))) is not None]
    return fit_series(f"sigma={key}", float(key), curves, jstar, bootstrap)


# --------------------------------------------------------------------------------------------------
# Schedules at equal compute


def _curves_of(exp: ExperimentData, schedule: str) -> list:
    return [c for r in exp.with_history if r.schedule == schedule and (c := r.curve()) is not None]


def schedule_frontiers(exp: ExperimentData) -> dict[str, ScheduleFrontier]:
    """Each schedule's frontier of the reference gap (over its own runs)."""
    out = {}
    for s in exp.schedules:
        curves = _curves_of(exp, s)
        if curves:
            f, J = compute_frontier(curves)
            out[s] = ScheduleFrontier(s, len(curves), f, J - exp.reference.jstar_ref)
    return out


def baseline_schedule(schedules: list[str]) -> str | None:
    """`edm` if present, else the first schedule (sorted) that is not an `optimal` series, else None."""
    if "edm" in schedules:
        return "edm"
    return next((s for s in sorted(schedules) if not s.startswith("optimal")), None)


def series_baselines(exp: ExperimentData, schedules: list[str]) -> dict[str, str]:
    """What each series of `schedules` is compared with: an `optimal` series (any label) with its own base
    schedule when that is among `schedules`, every other series with `baseline_schedule`; the baseline
    itself is left out."""
    general = baseline_schedule(schedules)
    base_of = {r.schedule: r.base_schedule for r in exp.runs if r.base_schedule}
    out = {}
    for s in schedules:
        base = base_of.get(s) if base_of.get(s) in schedules else general
        if base is not None and s != base:
            out[s] = base
    return out


def compare_schedules(exp: ExperimentData, frontiers: dict[str, ScheduleFrontier]) -> list[ScheduleComparison]:
    """Every schedule's frontier against its baseline's (`series_baselines`) on the compute range both
    frontiers cover."""
    out = []
    for s, base in series_baselines(exp, list(frontiers)).items():
        fr, b = frontiers[s], frontiers[base]
        lo, hi = max(fr.f[0], b.f[0]), min(fr.f[-1], b.f[-1])
        none = np.zeros(0)
        if not lo < hi:
            out.append(ScheduleComparison(s, base, (lo, hi), none, none, math.nan, math.nan,
                                          "the two frontiers cover no common compute range"))
            continue
        grid = np.exp(np.linspace(math.log(lo), math.log(hi), FRONTIER_POINTS))
        jstar = exp.reference.jstar_ref
        gap_s = compute_frontier(_curves_of(exp, s), grid)[1] - jstar
        gap_b = compute_frontier(_curves_of(exp, base), grid)[1] - jstar
        ok = np.isfinite(gap_s) & np.isfinite(gap_b) & (gap_s > 0) & (gap_b > 0)
        if not ok.any():
            out.append(ScheduleComparison(s, base, (lo, hi), none, none, math.nan, math.nan,
                                          "no positive gaps to compare"))
            continue
        ratio = gap_s[ok] / gap_b[ok]
        out.append(ScheduleComparison(s, base, (float(lo), float(hi)), grid[ok], ratio, float(np.mean(ratio < 1)),
                                      float(np.exp(np.mean(np.log(ratio))))))
    return out


# --------------------------------------------------------------------------------------------------
# Loss shares and gaps per sigma (method.md section 4.4)


def finite_mean(rows: list[np.ndarray]) -> np.ndarray:
    """[K] column means of equal-length rows over their finite entries (NaN where a column has none)."""
    a = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    ok = np.isfinite(a)
    n = ok.sum(axis=0)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=0) / np.maximum(n, 1), math.nan)


def _series_runs(exp: ExperimentData, schedule: str) -> list[RunData]:
    """The series' runs with a history on the grid of its first such run."""
    runs = [r for r in exp.with_history if r.schedule == schedule]
    return [r for r in runs if r.keys == runs[0].keys]


def share_profiles(exp: ExperimentData) -> list[ShareProfile]:
    """Each series' final share per sigma, averaged over its runs; series with no share logged are left out."""
    out = []
    for s in sorted({r.schedule for r in exp.with_history}):
        runs = _series_runs(exp, s)
        rows = [r.share[-1] for r in runs if np.isfinite(r.share[-1]).any()]
        if rows:
            out.append(ShareProfile(s, runs[0].sigmas, finite_mean(rows), len(rows)))
    return out


def _pair_key(r: RunData) -> tuple[str, str] | None:
    seed = r.params.get("seed")
    return None if seed in (None, "None", "") else (r.preset, seed)


def _positive_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((num > 0) & (den > 0), num / den, math.nan)


def gap_ratio_profiles(exp: ExperimentData) -> list[GapRatioProfile]:
    """Every series' final per-sigma gap over its baseline's (`series_baselines`), on the grid both share."""
    out = []
    for s, base in series_baselines(exp, sorted({r.schedule for r in exp.with_history})).items():
        runs, bases = _series_runs(exp, s), _series_runs(exp, base)
        if runs[0].keys != bases[0].keys:
            continue
        pairs = [_positive_ratio(r.gap[-1], b.gap[-1]) for r in runs for b in bases
                 if _pair_key(r) is not None and _pair_key(r) == _pair_key(b)]
        if pairs:
            ratio = np.exp(finite_mean([np.log(p) for p in pairs]))
        else:
            ratio = _positive_ratio(finite_mean([r.gap[-1] for r in runs]), finite_mean([b.gap[-1] for b in bases]))
        out.append(GapRatioProfile(s, base, runs[0].sigmas, ratio, len(pairs)))
    return out


# --------------------------------------------------------------------------------------------------
# Everything


def report_gap_fid_points(exp: ExperimentData) -> list[GapFidPoint]:
    """(run, snapshot) points with FID, the gap taken from the history already read."""
    return [p for r in exp.with_history if len(r.fid)
            for p in match_gap_fid(r.run_id, r.name, r.sigmas, r.nimg, r.gap, r.fid)]


def analyse(exp: ExperimentData, bootstrap: int = 1000, sigma_bootstrap: int = 200,
            sigma_panels: int = 8) -> Analysis:
    """All fits and comparisons of a report. bootstrap / sigma_bootstrap: run resamples of the CIs of
    the reference-total fits and of each per-sigma fit (each resample rebuilds the frontier)."""
    ref = exp.reference
    keys = [] if ref is None else [sigma_key(ref.sigmas[i]) for i in panel_sigmas(ref.sigmas, sigma_panels)]
    frontiers = schedule_frontiers(exp) if ref is not None else {}
    points = report_gap_fid_points(exp)
    return Analysis(reference=fit_reference_total(exp, bootstrap),
                    sigma_fits=[fit_sigma(exp, k, sigma_bootstrap) for k in keys],
                    frontiers=frontiers, comparisons=compare_schedules(exp, frontiers),
                    gap_fid_points=points, gap_fid=gap_fid_correlation(points),
                    shares=share_profiles(exp), gap_ratios=gap_ratio_profiles(exp))
