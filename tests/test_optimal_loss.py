"""J* estimators against analytic values, limits, the paper's orderings, and the table format."""

import json
import os

import numpy as np
import pytest
import torch
from scipy import integrate

from edm_opt.data import load_dataset
from edm_opt.diffusion import edm_weight, reference_total, sigma_grid
from edm_opt.optimal_loss import (JStarMismatch, OptimalLossTable, cache_dir, estimate_for_dataset,
                                  estimate_optimal_loss, estimate_upper_bound, linear_optimal_loss, resolve_jstar,
                                  upper_bound_for_dataset)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_x(digits):
    return digits.to_float()


def two_point_jstar(a: torch.Tensor, sigma: float) -> float:
    """{+a, -a}: J* = ||a||^2 E_z[1 - tanh^2(||a||^2/sigma^2 + (||a||/sigma) z)] / D (adaptive quadrature)."""
    na2 = float((a * a).sum())
    na = na2 ** 0.5

    def f(z):
        return (1 - np.tanh(na2 / sigma ** 2 + na / sigma * z) ** 2) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)

    return na2 * integrate.quad(f, -np.inf, np.inf, epsabs=1e-13, limit=200)[0] / a.numel()


def test_two_point_dataset_matches_quadrature():
    a = torch.tensor([0.5, -0.3, 0.2, 0.1, 0.35, -0.25])
    norm = float(a.norm())
    sigmas = norm / np.array([2.0, 1.5, 1.0, 0.6, 0.3])  # ||a||/sigma <= 2
    table = estimate_optimal_loss(torch.stack([a, -a]), sigmas, "full", num_samples=20000)
    for s, v, e in zip(sigmas, table.values, table.stderr):
        exact = two_point_jstar(a, s)
        assert abs(v - exact) <= max(3 * e, 1e-6), (s, v, exact, e)


def test_limits_and_shape_on_digits(digits_x):
    sigmas = np.array([0.002, 0.05, 0.3, 0.6, 1.0, 2.0, 5.0, 20.0, 80.0])
    t = estimate_optimal_loss(digits_x, sigmas, "full")
    variance = t.data_variance
    assert variance == pytest.approx(0.293, abs=5e-4)  # method.md: digits 0.293 per dimension
    assert t.values[0] < 1e-12  # one-hot posterior: exactly 0 up to float64 round-off
    assert np.all(t.values >= 0)
    assert np.all(np.diff(t.values) >= -3 * (t.stderr[1:] + t.stderr[:-1]))  # non-decreasing within noise
    assert t.values[-1] == pytest.approx(variance, rel=1e-3)  # sigma -> inf: the data variance
    assert t.sigma_star < 0.6 and t.values[3] > 1e-3 * t.values[-1]


def test_gaussian_data_matches_closed_form_where_n_fills_it():
    g = torch.Generator().manual_seed(1)
    lam = torch.tensor([1.0, 0.25, 0.04])
    x = torch.randn(8000, 3, generator=g) * lam.sqrt()
    sample_lam = np.linalg.eigvalsh(np.cov(x.double().numpy().T, bias=True))
    sigmas = np.array([0.3, 0.5, 1.0, 2.0, 4.0])
    t = estimate_optimal_loss(x, sigmas, "full", num_samples=4096)
    closed = np.array([np.sum(sample_lam * s ** 2 / (sample_lam + s ** 2)) / 3 for s in sigmas])
    np.testing.assert_allclose(t.values, closed, rtol=0.02)
    # at small sigma the N points no longer fill the Gaussian: the empirical value collapses towards 0
    small = estimate_optimal_loss(x, [1e-3], "full", num_samples=1024).values[0]
    assert small < 0.05 * np.sum(sample_lam * 1e-6 / (sample_lam + 1e-6)) / 3


def test_estimator_ordering_at_intermediate_sigma(digits_x):
    sigmas = np.array([0.6, 0.8, 1.0])
    est = {e: estimate_optimal_loss(digits_x, sigmas, e, subset_size=256) for e in ("dol", "cdol", "snis")}
    full = estimate_optimal_loss(digits_x, sigmas, "full")
    for lo, hi in (("dol", "cdol"), ("cdol", "snis")):
        gap = est[hi].values - est[lo].values
        assert np.all(gap > 3 * np.hypot(est[hi].stderr, est[lo].stderr)), (lo, hi, gap)
    assert np.all(est["dol"].values < full.values) and np.all(full.values < est["snis"].values)
    # measured bias of DOL at sigma = 1 (quoted in the estimator's docstring): strongly negative
    assert est["dol"].values[2] / full.values[2] - 1 < -0.2


def test_cdol_converges_to_full_as_subset_grows(digits_x):
    n = digits_x.shape[0]
    sigmas = np.array([1.0, 1.5, 2.0, 4.0])
    full = estimate_optimal_loss(digits_x, sigmas, "full")
    small = estimate_optimal_loss(digits_x, sigmas, "cdol", subset_size=64)
    half = estimate_optimal_loss(digits_x, sigmas, "cdol", subset_size=n // 2)
    np.testing.assert_allclose(half.values, full.values, rtol=0.10)
    assert np.abs(half.values / full.values - 1).mean() < np.abs(small.values / full.values - 1).mean()


@pytest.mark.parametrize("estimator", ["dol", "cdol", "snis"])
def test_subset_at_least_n_is_the_full_estimator(digits_x, estimator):
    sigmas = np.array([0.5, 1.0])
    full = estimate_optimal_loss(digits_x, sigmas, "full", num_samples=1024)
    sub = estimate_optimal_loss(digits_x, sigmas, estimator, num_samples=1024, subset_size=digits_x.shape[0])
    np.testing.assert_array_equal(sub.values, full.values)


def test_class_conditional_is_below_unconditional(digits, digits_x):
    sigmas = np.array([0.5, 1.0, 2.0, 80.0])
    unc = estimate_optimal_loss(digits_x, sigmas, "full", num_samples=2048)
    cond = estimate_optimal_loss(digits_x, sigmas, "full", num_samples=2048, labels=digits.labels)
    assert np.all(cond.values <= unc.values + 3 * np.hypot(cond.stderr, unc.stderr))
    assert cond.values[-1] < 0.7 * unc.values[-1]  # at large sigma: within-class variance vs total variance
    assert cond.meta["class_conditional"] and not unc.meta["class_conditional"]


def test_no_model_beats_jstar_wiener_filter(digits_x):
    """The best linear denoiser's loss (closed form from the data covariance) is >= J* at every sigma."""
    x = digits_x.reshape(len(digits_x), -1).double().numpy()
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.T, bias=True)), 0, None)
    sigmas = np.array([0.1, 0.3, 1.0, 3.0])
    t = estimate_optimal_loss(digits_x, sigmas, "full", num_samples=2048)
    wiener = np.array([np.sum(lam * s ** 2 / (lam + s ** 2)) / x.shape[1] for s in sigmas])
    assert np.all(wiener >= t.values - 3 * t.stderr)
    assert wiener[0] > 100 * t.values[0]  # far from optimal at small sigma, where the data are memorised


def test_deterministic_for_a_seed(digits_x):
    a = estimate_optimal_loss(digits_x, [0.7], "cdol", num_samples=1500, subset_size=128, seed=3)
    b = estimate_optimal_loss(digits_x, [0.7], "cdol", num_samples=1500, subset_size=128, seed=3)
    c = estimate_optimal_loss(digits_x, [0.7], "cdol", num_samples=1500, subset_size=128, seed=4)
    assert a.values[0] == b.values[0] and a.values[0] != c.values[0]


def test_bad_arguments():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_optimal_loss(x, [1.0], "exact")
    with pytest.raises(ValueError, match="positive"):
        estimate_optimal_loss(x, [0.0, 1.0])
    with pytest.raises(ValueError, match="labels"):
        estimate_optimal_loss(x, [1.0], labels=torch.zeros(3, dtype=torch.long))


# --- the table ------------------------------------------------------------------------------------


def test_table_round_trip_and_mismatches(tmp_path, digits):
    grid = np.array([0.5, 1.0, 2.0])
    table, cached = estimate_for_dataset(digits, grid, "cdol", num_samples=512)
    assert cached.parent == cache_dir() / "jstar" and cached.name.startswith(digits.fingerprint)
    path = table.save(tmp_path / "t.json")
    back = OptimalLossTable.load(path, digits.fingerprint, False, grid)
    np.testing.assert_array_equal(back.values, table.values)
    np.testing.assert_array_equal(back.stderr, table.stderr)
    assert back.meta == table.meta
    on_disk = json.loads(path.read_text())
    for key in ("format_version", "dataset", "estimator", "params", "sigmas", "jstar", "stderr", "wall_time_s",
                "edm_opt_version", "num_images", "dim", "class_conditional"):
        assert key in on_disk
    assert on_disk["dataset"]["fingerprint"] == digits.fingerprint
    with pytest.raises(JStarMismatch, match="fingerprint"):
        OptimalLossTable.load(path, "0" * 64)
    with pytest.raises(JStarMismatch, match="unconditional"):
        OptimalLossTable.load(path, class_conditional=True)
    with pytest.raises(JStarMismatch, match="sigma grid"):
        OptimalLossTable.load(path, sigmas=sigma_grid())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(JStarMismatch, match="bad.json"):
        OptimalLossTable.load(tmp_path / "bad.json")


def test_cache_is_reused(digits):
    grid = np.array([1.0])
    first, path = estimate_for_dataset(digits, grid, "cdol", num_samples=256)
    mtime = os.stat(path).st_mtime_ns
    again, path2 = estimate_for_dataset(digits, grid, "cdol", num_samples=256)
    assert path2 == path and os.stat(path).st_mtime_ns == mtime
    assert again.meta["wall_time_s"] == first.meta["wall_time_s"]
    other, path3 = estimate_for_dataset(digits, grid, "cdol", num_samples=256, seed=1)
    assert path3 != path


def test_resolve_jstar_refuses_a_table_of_other_data(tmp_path, digits):
    other = load_dataset("digits", resolution=10)  # padded: other pixels, other fingerprint
    grid = np.array([1.0, 2.0])
    table, _ = estimate_for_dataset(other, grid, "cdol", num_samples=256)
    path = table.save(tmp_path / "other.json")
    with pytest.raises(JStarMismatch, match="other.json"):
        resolve_jstar(str(path), digits, grid, class_conditional=False)


def test_conversions_and_totals():
    sig = sigma_grid(num=8)
    vals = np.linspace(0.0, 0.3, 8)
    t = OptimalLossTable(sig, vals, np.zeros(8), {"data_variance": 0.3})
    np.testing.assert_allclose(t.as_target("eps"), vals / sig ** 2)
    np.testing.assert_allclose(t.as_target("fm"), vals * (1 + sig) ** 2 / sig ** 2)
    np.testing.assert_allclose(t.as_target("v"), vals * (1 + sig ** 2) / sig ** 2)
    np.testing.assert_allclose(t.as_target("F"), vals * edm_weight(sig))
    assert t.total() == pytest.approx(reference_total(sig, vals)) == pytest.approx(t.ref_total())
    np.testing.assert_allclose(t.interpolate(sig[1:]), vals[1:])
    assert t.interpolate(sig[0]) == pytest.approx(1e-6 * 0.3)  # the floor, 1e-6 x data variance
    mid = np.sqrt(sig[2] * sig[3])  # log-linear in between
    assert t.interpolate(mid) == pytest.approx(np.sqrt(vals[2] * vals[3]))
    assert t.sigma_star == sig[0]  # only the first grid value is below 1e-3 x J*_max


# --- J*_up: the linear and leave-one-out bounds (method.md section 4.2) ---------------------------


def test_linear_bound_is_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(3)
    lam = np.array([1.0, 0.3, 0.05, 0.01])
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    x = (torch.randn(50000, 4, generator=g, dtype=torch.float64) * torch.tensor(lam).sqrt()) @ rot.T + 0.7
    sigmas = np.array([0.01, 0.1, 0.5, 1.0, 3.0, 30.0])
    closed = np.array([np.sum(lam * s ** 2 / (lam + s ** 2)) / 4 for s in sigmas])
    np.testing.assert_allclose(linear_optimal_loss(x, sigmas), closed, rtol=0.02)  # population eigenvalues
    sample_lam = np.linalg.eigvalsh(np.cov(x.numpy().T, bias=True))
    exact = np.array([np.sum(sample_lam * s ** 2 / (sample_lam + s ** 2)) / 4 for s in sigmas])
    np.testing.assert_allclose(linear_optimal_loss(x, sigmas), exact, rtol=1e-9)  # the sample covariance's
    # the loss of that linear denoiser, D(x~) = mu + S (S + sigma^2)^-1 (x~ - mu), measured directly at sigma = 1
    mu, cov = x.mean(0), torch.cov(x.T, correction=0)
    noisy = x + torch.randn(x.shape, generator=g, dtype=torch.float64)
    denoised = mu + (noisy - mu) @ torch.linalg.solve(cov + torch.eye(4, dtype=torch.float64), cov)
    assert (denoised - x).square().mean().item() == pytest.approx(exact[3], rel=0.02)


def test_linear_bound_per_class_shrinks_towards_the_pooled_covariance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 16, generator=g, dtype=torch.float64)  # 3 classes of 20 points in 16 dimensions
    labels = torch.arange(60) % 3
    x[labels == 1] *= 2.0
    sigmas = np.array([0.1, 1.0, 10.0])
    got = linear_optimal_loss(x, sigmas, labels)
    covs = [np.cov(x[labels == c].numpy().T, bias=True) for c in range(3)]
    pooled = sum(covs) / 3
    want = np.zeros(3)
    for c in covs:
        lam = np.clip(np.linalg.eigvalsh((20 * c + 16 * pooled) / (20 + 16)), 0, None)
        want += np.array([np.sum(lam * s ** 2 / (lam + s ** 2)) for s in sigmas]) / 16 / 3
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # without shrinkage a class of 20 points in 16 dimensions would be nearly rank-deficient: the bound is higher
    raw = np.mean([[np.sum(np.clip(np.linalg.eigvalsh(c), 0, None) * s ** 2 / (np.clip(np.linalg.eigvalsh(c), 0, None)
                                                                                  + s ** 2)) / 16 for s in sigmas]
                   for c in covs], axis=0)
    assert np.all(got >= raw - 1e-12)


def test_jstar_train_is_below_both_bounds_on_digits(digits, digits_x):
    grid = sigma_grid(0.002, 80, 12)
    train = estimate_optimal_loss(digits_x, grid, "full", num_samples=2048)
    up = estimate_upper_bound(digits_x, grid, num_samples=1024)
    tol = 3 * np.hypot(train.stderr, up.loo_stderr)
    assert np.all(train.values <= up.loo + tol), (train.values - up.loo) / tol
    assert np.all(train.values <= up.lin + 3 * train.stderr + 1e-12), train.values - up.lin
    np.testing.assert_array_equal(up.values, np.minimum(up.lin, up.loo))
    # the bounds are what the data allows a generalising model: far above J*_train below sigma* (~0.24)
    low = grid < 0.1
    assert np.all(up.values[low] > 1e3 * np.maximum(train.values[low], 1e-12))
    assert up.values[-1] == pytest.approx(train.values[-1], rel=2e-3)  # sigma -> inf: the data variance
    cond = estimate_upper_bound(digits_x, grid, labels=digits.labels, num_samples=1024)
    train_c = estimate_optimal_loss(digits_x, grid, "full", labels=digits.labels, num_samples=1024)
    assert np.all(train_c.values <= cond.values + 3 * np.hypot(train_c.stderr, cond.loo_stderr))


def brute_force_loo(x: np.ndarray, sigma: float, m: int, seed: int) -> tuple[float, float]:
    """J*_LOO by definition: the direct error of the posterior mean over the other points, float64, one query at
    a time, own random draws (independent of the estimator's)."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    vals = np.empty(m)
    for q in range(m):
        i = rng.integers(n)
        noisy = x[i] + sigma * rng.standard_normal(d)
        others = np.delete(x, i, axis=0)
        logits = -((others - noisy) ** 2).sum(1) / (2 * sigma ** 2)
        w = np.exp(logits - logits.max())
        vals[q] = ((w @ others / w.sum() - x[i]) ** 2).sum() / d
    return vals.mean(), vals.std(ddof=1) / np.sqrt(m)


def test_leave_one_out_matches_brute_force(digits_x):
    x = digits_x[:300]
    sigmas = np.array([0.1, 0.5, 1.0, 2.0, 5.0])
    up = estimate_upper_bound(x, sigmas, num_samples=6000, seed=2)
    for k, s in enumerate(sigmas):
        mean, se = brute_force_loo(x.reshape(300, -1).double().numpy(), s, 3000, seed=k)
        assert abs(up.loo[k] - mean) <= 4 * np.hypot(se, up.loo_stderr[k]), (s, up.loo[k], mean, se)


def test_upper_bound_round_trip_cache_and_resolve(tmp_path, digits):
    grid = np.array([0.1, 1.0, 10.0])
    table, _ = estimate_for_dataset(digits, grid, "cdol", num_samples=256, upper=True)
    assert table.upper is not None and (cache_dir() / "jstar_up").is_dir()
    path = table.save(tmp_path / "with-up.json")
    back = OptimalLossTable.load(path, digits.fingerprint, False, grid)
    np.testing.assert_array_equal(back.upper.values, table.upper.values)
    assert "J*_LOO" in back.format() and "J*_up" in back.format()
    cached = upper_bound_for_dataset(digits, grid)  # the cache entry, not a new estimate
    assert cached.meta["wall_time_s"] == table.upper.meta["wall_time_s"]
    # a table without J*_up gets it from the cache when a schedule needs it, and says so
    bare, _ = estimate_for_dataset(digits, grid, "cdol", num_samples=256)
    bare.upper = None
    bare.save(tmp_path / "bare.json")
    said = []
    got, _ = resolve_jstar(str(tmp_path / "bare.json"), digits, grid, False, upper=True, echo=said.append)
    np.testing.assert_array_equal(got.upper.values, table.upper.values)
    got, _ = resolve_jstar(str(tmp_path / "bare.json"), digits, grid, False, upper=False)
    assert got.upper is None
    for entry in (cache_dir() / "jstar_up").iterdir():
        entry.unlink()
    resolve_jstar(str(tmp_path / "bare.json"), digits, grid, False, upper=True, echo=said.append)
    assert len(said) == 1 and "bare.json has no J*_up" in said[0]
    d = json.loads(path.read_text())
    d["upper"]["loo"][1] = float("nan")
    (tmp_path / "nan-up.json").write_text(json.dumps(d))
    with pytest.raises(JStarMismatch, match="nan-up.json.*non-finite"):
        OptimalLossTable.load(tmp_path / "nan-up.json")
