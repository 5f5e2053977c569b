"""Frontier and scaling-law fits (edm_opt.scaling, method.md section 5)."""

import dataclasses
import math

import numpy as np
import pytest

from edm_opt.scaling import (
    FreeFloorFit,
    PowerLawFit,
    compare_fits,
    compute_frontier,
    fit_frontier,
    fit_power_law,
    fit_power_law_free_floor,
)

# The paper's fitted ImageNet-64 law (method.md section 5): J(f) = 0.3675 f^-0.014 + 0.015.
PAPER_BETA, PAPER_ALPHA, PAPER_JSTAR = 0.3675, -0.014, 0.015
# A law whose floor is a large share of the loss: J(f) = 30 f^-0.25 + 0.25 over f = 1e6..1e12.
STEEP_BETA, STEEP_ALPHA, STEEP_JSTAR = 30.0, -0.25, 0.25


def law(f, beta, alpha, jstar):
    return jstar + beta * np.asarray(f, dtype=np.float64) ** alpha


def paper_data(n=40, noise=0.002, seed=1):
    """The paper's law over f = 1e15..1e21 FLOPs with multiplicative noise of `noise` (relative)."""
    rng = np.random.default_rng(seed)
    f = np.logspace(15, 21, n)
    return f, law(f, PAPER_BETA, PAPER_ALPHA, PAPER_JSTAR) * (1 + noise * rng.standard_normal(n))


def steep_data(n=40, noise=0.003, seed=1):
    rng = np.random.default_rng(seed)
    f = np.logspace(6, 12, n)
    return f, law(f, STEEP_BETA, STEEP_ALPHA, STEEP_JSTAR) * (1 + noise * rng.standard_normal(n))


def frontier_runs(seed, n_runs=8, k=0.05, run_sd=0.02, point_sd=0.005):
    """Runs whose lower envelope is the steep law: run i's gap is beta f^alpha (1 + k (ln f - l_i)^2).

    l_i (the run's compute-optimal ln f) is log-spaced over 1e7..1e11; FLOPs per image grow 1.5x per run
    on a shared logging schedule, so first f values are close; each run stops one e-fold past l_i.
    Noise: a per-run multiplicative offset (run_sd) and per-point noise (point_sd) on the gap.
    """
    rng = np.random.default_rng(seed)
    curves = []
    for i, l in enumerate(np.linspace(math.log(1e7), math.log(1e11), n_runs)):
        f = np.exp(np.linspace(math.log(1e6) + i * math.log(1.5), l + 1, 40))
        gap = STEEP_BETA * f ** STEEP_ALPHA * (1 + k * (np.log(f) - l) ** 2)
        gap *= np.exp(run_sd * rng.standard_normal() + point_sd * rng.standard_normal(f.size))
        curves.append((f, STEEP_JSTAR + gap))
    return curves


# --------------------------------------------------------------------------------------------------
# fit_power_law


def test_recovers_paper_law_with_jstar_given():
    f, J = paper_data()
    fit = fit_power_law(f, J, jstar=PAPER_JSTAR, bootstrap=1000, seed=0)
    assert isinstance(fit, PowerLawFit)
    assert fit.alpha_ci[0] < PAPER_ALPHA < fit.alpha_ci[1]
    assert fit.beta_ci[0] < PAPER_BETA < fit.beta_ci[1]
    assert fit.alpha == pytest.approx(PAPER_ALPHA, rel=0.03)
    assert fit.beta == pytest.approx(PAPER_BETA, rel=0.02)
    assert fit.rho < -0.99 and fit.r2 == pytest.approx(fit.rho ** 2)
    assert (fit.n_used, fit.n_dropped, fit.jstar, fit.note) == (40, 0, PAPER_JSTAR, "")
    np.testing.assert_allclose(fit.predict(f), law(f, PAPER_BETA, PAPER_ALPHA, PAPER_JSTAR), rtol=0.005)


def test_subtraction_raises_abs_rho_when_floor_is_large():
    f, J = steep_data()
    cmp = compare_fits(f, J, STEEP_JSTAR, bootstrap=200)
    # Measured: raw rho = -0.9717 (ln J is curved in ln f), subtracted rho = -0.99993.
    assert abs(cmp.raw.rho) < 0.98
    assert abs(cmp.subtracted.rho) > 0.9999
    assert cmp.raw.jstar is None and cmp.subtracted.jstar == STEEP_JSTAR
    assert cmp.subtracted.alpha_ci[0] < STEEP_ALPHA < cmp.subtracted.alpha_ci[1]
    assert cmp.raw.alpha > -0.12  # the raw law badly underestimates the exponent (measured -0.104)
    assert isinstance(cmp.free_floor, FreeFloorFit)


def test_points_at_or_below_jstar_are_dropped_and_counted():
    f, J = paper_data()
    J[[3, 10, 20]] = PAPER_JSTAR  # J - J* = 0
    J[[5, 30]] = PAPER_JSTAR - 0.01  # J - J* < 0
    fit = fit_power_law(f, J, jstar=PAPER_JSTAR, bootstrap=100)
    assert (fit.n_used, fit.n_dropped) == (35, 5)
    assert "5 points with J - J* <= 0 dropped" in fit.note
    assert fit.alpha == pytest.approx(PAPER_ALPHA, rel=0.05)
    raw = fit_power_law(f, J, bootstrap=0)  # nothing is <= 0 without the subtraction
    assert (raw.n_used, raw.n_dropped) == (40, 0)


@pytest.mark.parametrize("f, J", [
    ([1e6, 1e7], [1.0, 0.9]),  # two points
    ([], []),  # none
    ([1e6, 1e7, 1e8, 1e9], [0.2, 0.1, 0.3, np.nan]),  # all but one at or below J* (or non-finite)
])
def test_fewer_than_three_points_gives_nan_fit_with_note(f, J):
    fit = fit_power_law(f, J, jstar=0.25)
    assert math.isnan(fit.alpha) and math.isnan(fit.beta) and math.isnan(fit.rho)
    assert all(math.isnan(v) for v in fit.alpha_ci + fit.beta_ci)
    assert "usable points" in fit.note and fit.n_used < 3


def test_fit_is_frozen_and_prints_one_line():
    fit = fit_power_law(*steep_data(), jstar=STEEP_JSTAR, bootstrap=50)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fit.alpha = 0.0
    line = str(fit)
    assert line == fit.summary() and "\n" not in line
    assert "alpha=-0.25" in line and "J*=0.25" in line and "rho=" in line


def test_same_seed_same_fit_other_seed_other_ci():
    f, J = paper_data()
    a = fit_power_law(f, J, PAPER_JSTAR, bootstrap=300, seed=7)
    assert a == fit_power_law(f, J, PAPER_JSTAR, bootstrap=300, seed=7)
    b = fit_power_law(f, J, PAPER_JSTAR, bootstrap=300, seed=8)
    assert (a.alpha, a.beta) == (b.alpha, b.beta) and a.alpha_ci != b.alpha_ci
    curves = frontier_runs(seed=0)
    one, two = (fit_frontier(curves, STEEP_JSTAR, bootstrap=100, seed=3) for _ in range(2))
    assert one == two


# --------------------------------------------------------------------------------------------------
# compute_frontier


def test_frontier_of_crossing_curves_is_their_lower_envelope():
    # 2 f^-0.1 and 5 f^-0.15 cross at f = 2.5^20 ~ 9.1e7; sampled at different points per run.
    laws = [(2.0, -0.1), (5.0, -0.15)]
    f1, f2 = np.logspace(6, 10, 17), np.logspace(6, 10, 29)
    grid, J = compute_frontier([(f1, law(f1, *laws[0], 0)), (f2, law(f2, *laws[1], 0))])
    assert grid.size == 64 and grid[0] == 1e6 and grid[-1] == 1e10
    np.testing.assert_allclose(np.diff(np.log(grid)), math.log(1e4) / 63)
    each = np.stack([law(grid, *p, 0) for p in laws])
    # Log-log interpolation is exact for power laws, so the envelope is the pointwise min itself.
    np.testing.assert_allclose(J, each.min(axis=0), rtol=1e-12)
    winner = each.argmin(axis=0)
    assert winner[0] == 0 and winner[-1] == 1  # each curve is the frontier on one side of the crossing


def test_frontier_counts_only_runs_covering_each_point():
    a = np.logspace(6, 9, 13)  # lowest of all if extrapolated, but it stops at 1e9
    b = np.logspace(7, 11, 21)
    c = np.logspace(8, 10, 9)
    laws = {"a": (1.0, -0.1), "b": (3.0, -0.12), "c": (2.0, -0.11)}
    curves = [(a, law(a, *laws["a"], 0)), (b, law(b, *laws["b"], 0)), (c, law(c, *laws["c"], 0))]
    grid, J = compute_frontier(curves)
    # Default range: from the largest first f (1e8) to the largest last f (1e11).
    assert grid[0] == 1e8 and grid[-1] == 1e11
    expected = np.full(grid.shape, np.inf)
    for (f, _), p in zip(curves, laws.values()):
        cover = (grid >= f[0]) & (grid <= f[-1])
        expected[cover] = np.minimum(expected[cover], law(grid[cover], *p, 0))
    np.testing.assert_allclose(J, expected, rtol=1e-12)
    beyond = grid > 1e10  # only b covers these
    np.testing.assert_allclose(J[beyond], law(grid[beyond], *laws["b"], 0), rtol=1e-12)
    assert np.all(J[beyond] > law(grid[beyond], *laws["a"], 0))

    # An explicit grid: points that no run covers are NaN, and a fit drops and counts them.
    grid, J = compute_frontier(curves, grid=np.logspace(5, 12, 15))
    assert np.isnan(J[grid < 1e6]).all() and np.isnan(J[grid > 1e11]).all()
    assert np.isfinite(J[(grid >= 1e6) & (grid <= 1e11)]).all()
    fit = fit_power_law(grid, J, bootstrap=0)
    assert fit.n_dropped == int(np.isnan(J).sum()) and "non-finite" in fit.note


def test_frontier_rejects_malformed_runs():
    with pytest.raises(ValueError, match="run 1"):
        compute_frontier([([1.0, 2.0], [1.0, 0.5]), ([3.0, 2.0], [1.0, 0.5])])
    with pytest.raises(ValueError, match="at least one run"):
        compute_frontier([])


# --------------------------------------------------------------------------------------------------
# fit_frontier


def test_fit_frontier_with_fewer_than_five_runs_has_no_ci():
    fit = fit_frontier(frontier_runs(seed=0)[:4], jstar=STEEP_JSTAR)
    assert math.isfinite(fit.alpha)
    assert all(math.isnan(v) for v in fit.alpha_ci + fit.beta_ci)
    assert "CI not available (fewer than 5 runs)" in fit.note


def test_fit_frontier_ci_from_run_resampling_contains_true_alpha():
    fit = fit_frontier(frontier_runs(seed=0), jstar=STEEP_JSTAR, bootstrap=1000, seed=0)
    assert fit.alpha_ci[0] < STEEP_ALPHA < fit.alpha_ci[1]
    assert fit.beta_ci[0] < STEEP_BETA < fit.beta_ci[1]
    assert fit.alpha == pytest.approx(STEEP_ALPHA, abs=0.01)
    assert fit.n_used == 64 and fit.note == ""


# --------------------------------------------------------------------------------------------------
# fit_power_law_free_floor


def test_free_floor_recovers_known_floor():
    f = np.logspace(6, 12, 40)
    fit = fit_power_law_free_floor(f, law(f, STEEP_BETA, STEEP_ALPHA, STEEP_JSTAR))
    assert fit.converged and fit.identifiable and fit.note == ""
    assert fit.c == pytest.approx(STEEP_JSTAR, rel=1e-6)
    assert fit.alpha == pytest.approx(STEEP_ALPHA, rel=1e-6)
    assert fit.beta == pytest.approx(STEEP_BETA, rel=1e-6)
    assert fit.c_se < 1e-3 * fit.c
    # With 0.3% noise the floor is still resolved.
    noisy = fit_power_law_free_floor(*steep_data())
    assert noisy.identifiable and noisy.c == pytest.approx(STEEP_JSTAR, abs=3 * noisy.c_se)


@pytest.mark.parametrize("noise", [0.0, 0.001])
def test_free_floor_flags_no_curvature(noise):
    # A pure power law over one decade: no curvature, so nothing pins the floor.
    rng = np.random.default_rng(2)
    f = np.logspace(8, 9, 30)
    fit = fit_power_law_free_floor(f, 0.5 * f ** -0.05 * (1 + noise * rng.standard_normal(f.size)))
    assert fit.converged and not fit.identifiable
    assert "floor not identifiable" in fit.note


def test_free_floor_with_too_few_points_is_nan():
    fit = fit_power_law_free_floor([1e6, 1e7, 1e8], [1.0, 0.8, 0.7])
    assert not fit.converged and not fit.identifiable and math.isnan(fit.c)
    assert "usable points" in fit.note
