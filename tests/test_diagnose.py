"""`edm-opt diagnose`: exact models against J*, target conversions, memorisation, official layouts, runs."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_opt.data import load_dataset
from edm_opt.diagnose import diagnose, memorisation, nearest_neighbour_distances
from edm_opt.loading import LoadedModel
from edm_opt.diffusion import NativeDenoiser, precond_coefficients, sigma_grid
from edm_opt.optimal_loss import estimate_optimal_loss

EDM_OPT = str(Path(sys.executable).with_name("edm-opt"))
SIGMAS = np.array([0.05, 0.2, 0.5, 1.0, 2.0, 10.0])


class PosteriorMean(torch.nn.Module):
    """The exact E[x0 | x] of a finite training set: the optimal denoiser (method.md section 2)."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        self.data = data.reshape(len(data), -1).double()
        self.img_channels, self.img_resolution, self.label_dim = data.shape[1], data.shape[2], 0

    def forward(self, x, sigma, labels=None):
        x = x.reshape(len(x), -1).double()
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(len(x), 1)
        logits = -torch.cdist(x, self.data).square() / (2 * s * s)
        return (logits.softmax(1) @ self.data).float().reshape(len(x), self.img_channels, self.img_resolution, -1)


class Identity(torch.nn.Module):
    def forward(self, x, sigma, labels=None):
        return x


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def jstar(digits):
    return estimate_optimal_loss(digits.to_float(), SIGMAS, "full", num_samples=4096)


def test_exact_posterior_mean_has_zero_gap(digits, jstar):
    r = diagnose(LoadedModel(PosteriorMean(digits.to_float()), "posterior mean"), digits, jstar, per_sigma=64)
    gap, se = np.array(r["gap"]), np.hypot(r["stderr"], jstar.stderr)
    assert np.all(np.abs(gap) <= 4 * se + 1e-7), (gap, se)
    assert r["loss_x0"][0] < 1e-6  # below sigma*: the posterior is one training image


def test_identity_denoiser_has_loss_sigma_squared(digits, jstar):
    r = diagnose(LoadedModel(Identity(), "D = x"), digits, jstar, per_sigma=64)
    loss, se = np.array(r["loss_x0"]), np.array(r["stderr"])
    assert np.all(np.abs(loss - SIGMAS ** 2) <= 4 * se), (loss, SIGMAS ** 2)


def _wrap(base, target, precond):
    """The same denoiser `base` written as a model with another native target and input scaling."""

    class Native(torch.nn.Module):
        def forward(self, x_in, sigma, labels=None):
            s = sigma.reshape(-1, 1, 1, 1)
            _, _, c_in = precond_coefficients(precond, s)
            x = x_in / c_in  # back to VE coordinates x0 + sigma eps
            d = base(x, sigma)
            eps = (x - d) / s
            if target == "x0":
                return d
            if target == "eps":
                return eps
            if target == "fm":
                return eps - d  # velocity u = eps - x0
            if target == "v":
                return (eps - s * d) / (1 + s * s).sqrt()  # v = alpha eps - sigma_t x0
            c_skip, c_out, _ = precond_coefficients(precond, s)
            return (d - c_skip * x) / c_out  # F

    return NativeDenoiser(Native(), target, precond)


def test_targets_give_the_same_x0_losses(digits, jstar):
    base = PosteriorMean(digits.to_float())
    ref = np.array(diagnose(LoadedModel(base, "x0"), digits, jstar, per_sigma=16)["loss_x0"])
    for target, precond in (("eps", "vp"), ("fm", "fm"), ("v", "vp"), ("x0", "edm"), ("F", "edm"), ("eps", "ve")):
        got = np.array(diagnose(LoadedModel(_wrap(base, target, precond), target), digits, jstar, per_sigma=16)["loss_x0"])
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-8, err_msg=f"{target}/{precond}")


def test_memorisation_flags_copies_not_noise(digits):
    g = torch.Generator().manual_seed(0)
    copies = digits.images[torch.randint(len(digits.images), (32,), generator=g)]
    noise = (torch.rand(32, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    m_copy, m_noise = memorisation(copies, digits), memorisation(noise, digits)
    assert m_copy["copy_share"] == 1.0 and m_copy["ratio_median"] == 0.0
    assert m_noise["copy_share"] == 0.0 and m_noise["ratio_median"] > 0.8
    d = nearest_neighbour_distances(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    assert d.tolist() == [[1.0, 2.0]]


def test_diagnose_of_a_snapshot_reproduces_the_runs_losses(trained, tmp_path):
    run = trained
    p = subprocess.run([EDM_OPT, "diagnose", str(run), "--out", "d", "--samples", "8", "--steps", "4"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    for key in ("sigmas", "loss_x0", "stderr", "jstar", "gap", "sigma_star", "ref_total", "memorisation"):
        assert key in r
    hist = json.loads((run / "per_sigma.json").read_text())
    np.testing.assert_array_equal(r["loss_x0"], hist["loss_x0"][-1])  # same held-out set, same EMA weights
    np.testing.assert_array_equal(r["jstar"], hist["jstar"])
    assert (tmp_path / "d" / "diagnose.png").stat().st_size > 1000
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (mr,) = c.search_runs([c.get_experiment_by_name("diagnose").experiment_id])
    assert mr.info.status == "FINISHED" and mr.data.metrics["gap/ref_total"] == pytest.approx(r["ref_total"]["gap"])


@pytest.mark.parametrize("preset", ["edm2-nano", "ddpmpp-tiny"])
def test_official_layout_state_dict_loads_and_runs(tmp_path, preset):
    from edm_opt.networks import build_network

    torch.manual_seed(0)
    sd = build_network(preset, img_resolution=8, img_channels=1, label_dim=0).state_dict()
    torch.save(sd, tmp_path / "weights.pt")

    def command(p):
        return [EDM_OPT, "diagnose", str(tmp_path / "weights.pt"), "--data", "digits", "--preset", p,
                "--sigmas", "0.5,1,2", "--images", "8", "--out", "d"]

    p = subprocess.run(command(preset), cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(json.loads((tmp_path / "d" / "diagnose.json").read_text())["loss_x0"]) == 3
    p = subprocess.run(command("edm2-base"), cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "'edm2-base'" in p.stderr and "Traceback" not in p.stderr


def test_test_split_is_measured_next_to_training(tmp_path, monkeypatch):
    """An IDX directory with a t10k split: the test images' per-sigma loss is measured beside the training one."""
    d = load_dataset("digits")
    for name, images in (("train", d.images[:400, 0].numpy()), ("t10k", d.images[400:500, 0].numpy())):
        raw = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in images.shape) + images.tobytes()
        (tmp_path / f"{name}-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "copy_model.py").write_text("import torch\n\n\nclass Copy(torch.nn.Module):\n"
                                            "    def forward(self, x, sigma, labels=None):\n        return x\n\n\n"
                                            "def make():\n    return Copy()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from edm_opt.diagnose import run_diagnosis

    r = run_diagnosis("copy_model:make", str(tmp_path), tmp_path / "out", sigmas="0.5,1,2", per_sigma=16, precond="ve",
                      echo=lambda *a: None)
    assert len(r["test_loss_x0"]) == 3 and r["test_data"] == str(tmp_path)
    np.testing.assert_allclose(r["test_loss_x0"], [0.25, 1.0, 4.0], rtol=0.5)  # D = x: loss sigma^2 on any images
    assert (tmp_path / "out" / "diagnose.json").exists()


def test_runs_mode_correlates_gap_with_fid(tmp_path, monkeypatch):
    from reports.synthetic import SyntheticRun, log_synthetic_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for i, amp in enumerate((1.0, 0.8, 1.2, 0.9, 1.1)):  # 5 runs: enough for the run-resampling CI
        log_synthetic_run(uri, "exp", SyntheticRun(name=f"r{i}", amplitude=amp, steps=8, fid_every=2), seed=i)
    p = subprocess.run([EDM_OPT, "diagnose", "--runs", "exp", "--out", "g"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "pearson" in p.stdout and (tmp_path / "g" / "gap_fid.png").exists()
    corr = json.loads((tmp_path / "g" / "gap_fid.json").read_text())["correlation"]
    driver = sigma_grid(num=8)[SyntheticRun("x").fid_sigma]  # the sigma whose gap the synthetic FID follows
    (at_driver,) = [c for c in corr if c["sigma"] == pytest.approx(driver, rel=1e-3)]
    assert at_driver["pearson"] > 0.98 and at_driver["n"] == 5 * 4 and at_driver["runs"] == 5
    assert at_driver["pearson_lo"] <= at_driver["pearson"] <= at_driver["pearson_hi"] <= 1
    assert "95% CI" in p.stdout
    p = subprocess.run([EDM_OPT, "diagnose", "--runs", "nope"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "nope" in p.stderr
