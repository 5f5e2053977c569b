"""Compute frontier and power-law fits of loss against training compute (method.md section 5).

The paper's modified scaling law subtracts the optimal loss J*, which is computed from the data and
never fitted:

    J(f) - J* = beta f^alpha,   i.e.   ln(J - J*) = ln(beta) + alpha ln(f)

f is cumulative training compute in FLOPs (forward + backward FLOPs per image x images seen, counted
by `edm_opt.compute`). J is a loss in edm-opt units, the per-dimension x0 MSE (VE coordinates, data
in [-1, 1]): a run's reference total (`loss/ref_total`) or its held-out loss at one sigma. J* is the
matching `jstar/ref_total` or `jstar/sigma_<s>`. The conventional law J(f) = beta f^alpha is the same
fit with J* = 0 (`jstar=None`). A third fit, J = beta f^alpha + c with the floor c free, is only a
diagnostic: it shows whether the curve alone could have identified the floor.

This module holds pure functions (numpy and scipy only): no torch, no mlflow, no file I/O.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

FRONTIER_POINTS = 64  # default size of the frontier's log-spaced f grid
MIN_RUNS_FOR_CI = 5  # fit_frontier resamples runs; with fewer the bootstrap means nothing
_NAN2 = (math.nan, math.nan)


# --------------------------------------------------------------------------------------------------
# Results.


def _g(v: float) -> str:
    return format(v, ".4g")


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares fit of ln(J - J*) = ln(beta) + alpha ln(f) (J* = 0 for the raw form).

    alpha: exponent (dimensionless, negative for a falling law). beta: J - J* at f = 1 FLOP, in J's
    units (per-dimension x0 MSE); it is an extrapolation far outside the data, so read it with alpha.
    rho: Pearson correlation of the pairs (ln f, ln(J - J*)), negative for a falling law (the paper
    quotes |rho|). r2: coefficient of determination of the log-log least squares (for this one-variable
    fit it equals rho^2). alpha_ci, beta_ci: 95% percentile bootstrap intervals, (nan, nan) when not
    available. n_used / n_dropped: points fitted / left out (J - J* <= 0, f <= 0 or non-finite).
    jstar: the J* subtracted, None for the raw fit. note: why points were dropped or values are NaN.
    """

    alpha: float
    beta: float
    rho: float
    r2: float
    alpha_ci: tuple[float, float]
    beta_ci: tuple[float, float]
    n_used: int
    n_dropped: int
    jstar: float | None
    note: str = ""

    def predict(self, f) -> np.ndarray:
        """J(f) = J* + beta f^alpha (J* = 0 for the raw fit), f in FLOPs."""
        return (self.jstar or 0.0) + self.beta * np.asarray(f, dtype=np.float64) ** self.alpha

    def summary(self) -> str:
        """One line for a report table."""
        form = "J" if self.jstar is None else f"J-J* (J*={_g(self.jstar)})"
        line = (f"{form}: alpha={_g(self.alpha)} [{_g(self.alpha_ci[0])}, {_g(self.alpha_ci[1])}]  "
                f"beta={_g(self.beta)} [{_g(self.beta_ci[0])}, {_g(self.beta_ci[1])}]  "
                f"rho={self.rho:.4f}  R2={self.r2:.4f}  n={self.n_used}")
        if self.n_dropped:
            line += f" ({self.n_dropped} dropped)"
        return line + (f"  [{self.note}]" if self.note else "")

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class FreeFloorFit:
    """Fit of J = beta f^alpha + c with the floor c free (identifiability diagnostic, method.md section 5).

    alpha dimensionless; beta and c in J's units (per-dimension x0 MSE); *_se: standard errors from the
    covariance of the least squares (inf when it cannot be estimated). converged: the optimiser
    finished. identifiable: a positive floor was resolved (see `fit_power_law_free_floor`).
    """

    alpha: float
    beta: float
    c: float
    alpha_se: float
    beta_se: float
    c_se: float
    n_used: int
    converged: bool
    identifiable: bool
    note: str = ""

    def predict(self, f) -> np.ndarray:
        """J(f) = beta f^alpha + c, f in FLOPs."""
        return self.c + self.beta * np.asarray(f, dtype=np.float64) ** self.alpha

    def summary(self) -> str:
        """One line for a report table."""
        line = (f"J=beta f^alpha+c: alpha={_g(self.alpha)}±{_g(self.alpha_se)}  "
                f"beta={_g(self.beta)}±{_g(self.beta_se)}  c={_g(self.c)}±{_g(self.c_se)}  n={self.n_used}")
        return line + (f"  [{self.note}]" if self.note else "")

    def __str__(self) -> str:
        return self.summary()


class ScalingComparison(NamedTuple):
    """The three fits of one loss series side by side (method.md section 5: report raw and subtracted)."""

    raw: PowerLawFit
    subtracted: PowerLawFit
    free_floor: FreeFloorFit


# --------------------------------------------------------------------------------------------------
# The frontier.


def _run_arrays(i: int, f, J) -> tuple[np.ndarray, np.ndarray]:
    """Validated (f, J) of run i, non-finite pairs dropped."""
    f = np.asarray(f, dtype=np.float64).ravel()
    J = np.asarray(J, dtype=np.float64).ravel()
    if f.shape != J.shape:
        raise ValueError(f"run {i}: f has {f.size} values but J has {J.size}")
    keep = np.isfinite(f) & np.isfinite(J)
    f, J = f[keep], J[keep]
    if f.size == 0:
        raise ValueError(f"run {i}: no finite (f, J) points")
    if f[0] <= 0 or np.any(np.diff(f) <= 0):
        raise ValueError(f"run {i}: f must be positive and strictly increasing")
    if np.any(J <= 0):
        raise ValueError(f"run {i}: losses must be positive (the frontier is interpolated in log-log)")
    return f, J


def _default_grid(runs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    lo = max(f[0] for f, _ in runs)
    hi = max(f[-1] for f, _ in runs)
    if lo == hi:
        return np.array([hi])
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), FRONTIER_POINTS))
    grid[0], grid[-1] = lo, hi  # exact ends, so the runs that define them cover them
    return grid


def compute_frontier(curves: Sequence[tuple], grid=None) -> tuple[np.ndarray, np.ndarray]:
    """Lower envelope over runs of loss J versus compute f (method.md section 5), on a common grid.

    curves: one (f, J) pair of arrays per run, f in FLOPs strictly increasing within the run, J > 0
    (per-dimension x0 MSE); runs may span different f ranges. Non-finite points are dropped.

    Each run is interpolated linearly in (ln f, ln J), which is exact for a power law, and only counts
    at grid points inside its own [first f, last f]: nothing is extrapolated.

    Default grid: FRONTIER_POINTS log-spaced points from the largest first f to the largest last f.
    Why: every run trains from f = 0, so below some run's first logged f its absence is an artefact of
    the logging interval (its first point comes later only because its FLOPs per image are larger),
    and an envelope there would be biased high. Above a run's last f that run genuinely spent no more
    compute, so the frontier continues with the runs that did; the range therefore ends at the largest
    last f. Every point of this range is covered by the run with the largest last f, so the envelope
    is never empty. With an explicit `grid`, points covered by no run get NaN.

    Returns (f, J): the grid and the envelope on it.
    """
    runs = [_run_arrays(i, f, J) for i, (f, J) in enumerate(curves)]
    if not runs:
        raise ValueError("compute_frontier needs at least one run")
    if grid is None:
        grid = _default_grid(runs)
    else:
        grid = np.asarray(grid, dtype=np.float64).ravel()
        if grid.size == 0 or not np.all(np.isfinite(grid) & (grid > 0)):
            raise ValueError("the frontier grid must be non-empty, finite and positive (FLOPs)")
    ln_grid = np.log(grid)
    best = np.full(grid.shape, np.inf)
    for f, J in runs:
        cover = (grid >= f[0]) & (grid <= f[-1])
        best[cover] = np.minimum(best[cover], np.interp(ln_grid[cover], np.log(f), np.log(J)))
    with np.errstate(over="ignore"):
        return grid, np.where(np.isfinite(best), np.exp(best), np.nan)


# --------------------------------------------------------------------------------------------------
# Power-law fits in log-log space.


def _loglog_points(f, J, jstar: float | None) -> tuple[np.ndarray, np.ndarray, int, str]:
    """x = ln f, y = ln(J - J*) of the usable points, the number dropped, and a note on why."""
    f = np.asarray(f, dtype=np.float64).ravel()
    J = np.asarray(J, dtype=np.float64).ravel()
    if f.shape != J.shape:
        raise ValueError(f"f has {f.size} values but J has {J.size}")
    gap = J - (jstar or 0.0)
    finite = np.isfinite(f) & np.isfinite(gap) & (f > 0)
    keep = finite & (gap > 0)
    notes = []
    if (n_nonpos := int(np.sum(finite & (gap <= 0)))):
        notes.append(f"{n_nonpos} points with J - J* <= 0 dropped" if jstar is not None
                     else f"{n_nonpos} points with J <= 0 dropped")
    if (n_bad := int(f.size - np.sum(finite))):
        notes.append(f"{n_bad} non-finite or f <= 0 points dropped")
    return np.log(f[keep]), np.log(gap[keep]), int(f.size - np.sum(keep)), "; ".join(notes)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares y = ln_beta + alpha x: (alpha, ln_beta, rho); NaNs if x has no spread."""
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0:
        return math.nan, math.nan, math.nan
    alpha = float(dx @ dy) / sxx
    rho = float(dx @ dy) / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return alpha, float(y.mean()) - alpha * float(x.mean()), rho


def _nan_fit(n_used: int, n_dropped: int, jstar: float | None, note: str) -> PowerLawFit:
    return PowerLawFit(math.nan, math.nan, math.nan, math.nan, _NAN2, _NAN2, n_used, n_dropped, jstar, note)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _point_fit(f, J, jstar: float | None) -> tuple[PowerLawFit, np.ndarray, np.ndarray]:
    """The fit without confidence intervals, and the (x, y) it used."""
    x, y, n_dropped, note = _loglog_points(f, J, jstar)
    jstar = None if jstar is None else float(jstar)
    if x.size < 3:
        return _nan_fit(x.size, n_dropped, jstar, _join(f"only {x.size} usable points (need 3)", note)), x, y
    alpha, ln_beta, rho = _line(x, y)
    if math.isnan(alpha):
        return _nan_fit(x.size, n_dropped, jstar, _join("all usable points have the same f", note)), x, y
    resid = y - (ln_beta + alpha * x)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1 - float(resid @ resid) / ss_tot if ss_tot > 0 else math.nan
    fit = PowerLawFit(alpha, math.exp(ln_beta), rho, r2, _NAN2, _NAN2, x.size, n_dropped, jstar, note)
    return fit, x, y


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return _NAN2
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def fit_power_law(f, J, jstar: float | None = None, bootstrap: int = 1000, seed: int = 0) -> PowerLawFit:
    """Fit J - J* = beta f^alpha by least squares of ln(J - J*) on ln f (method.md section 5).

    f: compute in FLOPs; J: loss (per-dimension x0 MSE); jstar: the optimal loss J*, computed from the
    data and given here (None: the raw law J = beta f^alpha). Points with J - J* <= 0 (or non-finite,
    or f <= 0) are dropped and counted in `n_dropped`. Confidence intervals: 95% percentile bootstrap
    over points, `bootstrap` resamples of the (f, J) pairs with `np.random.default_rng(seed)`; these
    treat the points as independent, so for a frontier use `fit_frontier`, which resamples runs.
    With fewer than 3 usable points every value is NaN and `note` says why; this never raises on data.
    """
    fit, x, y = _point_fit(f, J, jstar)
    if math.isnan(fit.alpha):
        return fit
    if bootstrap <= 0:
        return replace(fit, note=_join(fit.note, "no bootstrap"))
    # Resample (ln f, ln(J - J*)) pairs; all resamples' slopes at once (method.md section 5: bootstrap CIs).
    idx = np.random.default_rng(seed).integers(0, x.size, size=(bootstrap, x.size))
    xb, yb = x[idx], y[idx]
    xm, ym = xb.mean(axis=1), yb.mean(axis=1)
    dx = xb - xm[:, None]
    sxx = np.einsum("ij,ij->i", dx, dx)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where(sxx > 0, np.einsum("ij,ij->i", dx, yb - ym[:, None]) / sxx, np.nan)
    ln_betas = ym - alphas * xm
    lo, hi = _percentile_ci(ln_betas)
    return replace(fit, alpha_ci=_percentile_ci(alphas), beta_ci=(math.exp(lo), math.exp(hi)))


def fit_frontier(curves: Sequence[tuple], jstar: float | None = None, bootstrap: int = 1000,
                 seed: int = 0) -> PowerLawFit:
    """Fit J - J* = beta f^alpha to the frontier (lower envelope) of runs (method.md section 5).

    The point estimate fits `compute_frontier(curves)` (default grid). Confidence intervals resample
    RUNS with replacement (`np.random.default_rng(seed)`), recompute the frontier of each resample on its
    own default grid and refit, so they reflect run-to-run variation rather than the (strongly
    correlated) points of one frontier. With fewer than MIN_RUNS_FOR_CI = 5 runs the CIs are NaN and
    `note` says the CI is not available. Resamples whose fit fails are left out (and counted in `note`).
    """
    curves = [_run_arrays(i, f, J) for i, (f, J) in enumerate(curves)]  # validated once, not per resample
    fit, _, _ = _point_fit(*compute_frontier(curves), jstar)
    if math.isnan(fit.alpha):
        return fit
    if len(curves) < MIN_RUNS_FOR_CI:
        return replace(fit, note=_join(fit.note, f"CI not available (fewer than {MIN_RUNS_FOR_CI} runs)"))
    if bootstrap <= 0:
        return replace(fit, note=_join(fit.note, "no bootstrap"))
    # Resample runs, rebuild the frontier, refit (method.md section 5: bootstrap CIs over runs).
    picks = np.random.default_rng(seed).integers(0, len(curves), size=(bootstrap, len(curves)))
    alphas = np.full(bootstrap, np.nan)
    ln_betas = np.full(bootstrap, np.nan)
    for b, pick in enumerate(picks):
        x, y, _, _ = _loglog_points(*compute_frontier([curves[i] for i in np.unique(pick)]), jstar)
        if x.size >= 3:
            alphas[b], ln_betas[b], _ = _line(x, y)
    n_failed = int(np.sum(np.isnan(alphas)))
    lo, hi = _percentile_ci(ln_betas)
    failed = f"{n_failed} of {bootstrap} run resamples had no fit" if n_failed else ""
    return replace(fit, alpha_ci=_percentile_ci(alphas), beta_ci=(math.exp(lo), math.exp(hi)),
                   note=_join(fit.note, failed))


# --------------------------------------------------------------------------------------------------
# The floor fitted instead of given: an identifiability diagnostic.

_MAX_REL_SE_C = 0.5  # identifiable floor: c at least two standard errors above zero
_BOUND_TOL = 1e-4  # relative to min J: c this close to 0 or to min J sits on a bound


def _nan_free(n_used: int, converged: bool, note: str) -> FreeFloorFit:
    nan = math.nan
    return FreeFloorFit(nan, nan, nan, nan, nan, nan, n_used, converged, False, note)


def fit_power_law_free_floor(f, J) -> FreeFloorFit:
    """Fit J = beta f^alpha + c with the floor c free, by `scipy.optimize.curve_fit` (method.md section 5).

    f in FLOPs, J > 0 the loss (per-dimension x0 MSE); non-finite points and f <= 0, J <= 0 are dropped.
    Parameterisation: u = ln(f / g) with g the geometric mean of f and J = exp(b + alpha u) + c, so
    b = ln(beta g^alpha) is the log-gap at the data's centre (well conditioned, unlike ln beta at f = 1).
    Residuals are relative ((J - model) / J), for multiplicative noise. Bounds: c in [0, min J].
    Initial guess: the best log-log line over a few trial floors between 0 and min J.
    Standard errors come from the covariance (beta's by the delta method from b and alpha).

    `identifiable` is True only if the fit converged, its covariance is finite, c is off both bounds,
    and c_se < 0.5 c (c is resolved as a positive floor); otherwise `note` says which test failed.
    Fewer than 4 usable points (3 parameters): NaN values and a note; this never raises on data.
    """
    f = np.asarray(f, dtype=np.float64).ravel()
    J = np.asarray(J, dtype=np.float64).ravel()
    keep = np.isfinite(f) & np.isfinite(J) & (f > 0) & (J > 0)
    f, J = f[keep], J[keep]
    n = f.size
    if n < 4:
        return _nan_free(n, False, f"only {n} usable points (need 4 for 3 parameters)")
    ln_g = float(np.mean(np.log(f)))
    u = np.log(f) - ln_g
    if np.ptp(u) == 0:
        return _nan_free(n, False, "all usable points have the same f")
    j_min = float(J.min())

    # Initial guess: profile the floor over trial values, a log-log line for each.
    best = None
    for c0 in j_min * np.array([0.0, 0.25, 0.5, 0.75, 0.9, 0.97, 0.99]):
        a0, b0, _ = _line(u, np.log(J - c0))
        sse = float(np.sum(((J - c0 - np.exp(b0 + a0 * u)) / J) ** 2))
        if best is None or sse < best[0]:
            best = (sse, b0, a0, c0)
    p0 = best[1:]

    def model(u, b, alpha, c):
        return np.exp(b + alpha * u) + c

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            with np.errstate(over="ignore", invalid="ignore"):
                p, cov = curve_fit(model, u, J, p0=p0, sigma=J, method="trf", x_scale="jac", max_nfev=5000,
                                   bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, j_min]))
    except (RuntimeError, ValueError) as e:
        return _nan_free(n, False, f"did not converge ({e})")
    b, alpha, c = (float(v) for v in p)
    beta = math.exp(b - alpha * ln_g)
    if np.all(np.isfinite(cov)):
        var = np.diag(cov)
        b_se, alpha_se, c_se = (float(math.sqrt(max(v, 0.0))) for v in var)
        # ln beta = b - alpha ln g (delta method).
        var_ln_beta = var[0] + ln_g ** 2 * var[1] - 2 * ln_g * cov[0, 1]
        beta_se = beta * math.sqrt(max(float(var_ln_beta), 0.0))
    else:
        alpha_se = beta_se = c_se = math.inf

    if not math.isfinite(c_se):
        note = "floor not identifiable: covariance could not be estimated"
    elif c <= _BOUND_TOL * j_min:
        note = "floor not identifiable: c at the lower bound 0"
    elif c >= (1 - _BOUND_TOL) * j_min:
        note = "floor not identifiable: c at the upper bound min J"
    elif c_se >= _MAX_REL_SE_C * c:
        note = f"floor not identifiable: relative standard error of c {c_se / c:.3g}"
    else:
        note = ""
    return FreeFloorFit(alpha, beta, c, alpha_se, beta_se, c_se, n, True, not note, note)


def compare_fits(f, J, jstar: float, bootstrap: int = 1000, seed: int = 0) -> ScalingComparison:
    """Raw (J = beta f^alpha), subtracted (J - J* = beta f^alpha) and free-floor fits of one series.

    method.md section 5 reports rho and R^2 of the raw and subtracted forms side by side; the free-floor
    fit shows whether the floor could have been fitted instead of computed.
    """
    return ScalingComparison(raw=fit_power_law(f, J, None, bootstrap, seed),
                             subtracted=fit_power_law(f, J, jstar, bootstrap, seed),
                             free_floor=fit_power_law_free_floor(f, J))
