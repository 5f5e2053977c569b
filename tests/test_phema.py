"""Post-hoc EMA (EDM2 section 3.2): the power profile in closed form, the least-squares reconstruction, and
`edm-opt phema` on a real run."""

import subprocess

import numpy as np
import pytest
import torch

from conftest import EDM_OPT, TINY, cli_args
from edm_opt.ema import EMA, power_gamma, power_profile
from edm_opt.loading import load_snapshot_network
from edm_opt.phema import solve_coefficients
from edm_opt.rundir import load_snapshot


def test_power_profile_is_what_the_ema_updates_compute():
    """theta_tau = e_tau (one-hot): the EMA's average at step t is its weighting of the training steps."""
    T = 200
    net = torch.nn.Linear(T, 1, bias=False)
    ema = EMA(net, "power", 0.10)
    for t in range(1, T + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, t - 1] = 1.0
        ema.update(net, t, t * 8, 8)
        if t in (37, T):
            want = power_profile(t, power_gamma(0.10), T)
            np.testing.assert_allclose(ema.net.weight[0].double().numpy(), want, atol=1e-6)
            assert want.sum() == pytest.approx(1.0) and want[t:].sum() == 0


def random_walk(T: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(T, dim, generator=g, dtype=torch.float64), 0) / T ** 0.5


@pytest.mark.parametrize("every,max_err", [(100, 0.05), (25, 0.01)])
def test_reconstructs_a_tracked_profile_better_with_more_snapshots(every, max_err):
    """Weights on a random walk, power EMAs 0.05 and 0.15 stored every `every` steps, 0.10 tracked directly: the
    reconstruction of 0.10 from the stored averages matches it, closer with denser snapshots."""
    T, dim = 2000, 64
    theta = random_walk(T, dim)
    nets = {std: torch.nn.Linear(dim, 1, bias=False).double() for std in (0.05, 0.10, 0.15)}
    emas = {std: EMA(nets[std], "power", std) for std in nets}
    stored = []
    for t in range(1, T + 1):
        for std, ema in emas.items():
            nets[std].weight.data[0] = theta[t - 1]
            ema.update(nets[std], t, t, 1)
        if t % every == 0:
            stored += [(t, power_gamma(std), emas[std].net.weight[0].clone()) for std in (0.05, 0.15)]
    x, residual = solve_coefficients([(t, g) for t, g, _ in stored], (T, power_gamma(0.10)))
    rebuilt = sum(xi * w for xi, (_, _, w) in zip(x, stored))
    direct = emas[0.10].net.weight[0]
    err = float((rebuilt - direct).norm() / (direct - theta.mean(0)).norm())
    assert err < max_err and residual < 5 * max_err, (err, residual)
    assert sum(x) == pytest.approx(1.0, abs=1e-3)  # profiles sum to 1, so does their best combination


def test_phema_command_writes_a_normal_snapshot(tmp_path):
    args = cli_args({**TINY, "status_every": 512, "snapshot_every": 128, "checkpoint_every": 512,
                     "ema": "power:0.05,power:0.15"})
    p = subprocess.run([EDM_OPT, "train", *args], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = list((tmp_path / "runs" / "edm-opt").iterdir())
    snap = load_snapshot(run / "snapshot-000000512.pt")
    assert snap["ema"] == "power:0.05" and list(snap["ema_profiles"]) == ["power:0.15"]  # every profile stored
    other = load_snapshot_network(run / "snapshot-000000512.pt", ema="power:0.15").net.state_dict()
    assert all(torch.equal(other[k], v) for k, v in snap["ema_profiles"]["power:0.15"].items())
    p = subprocess.run([EDM_OPT, "phema", str(run), "--std", "0.10"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "from 8 stored averages" in p.stdout and "residual" in p.stdout
    out = run / "phema" / "snapshot-000000512-power0.100.pt"
    phema = load_snapshot(out)
    assert phema["ema"] == "power:0.1" and phema["nimg"] == 512 and len(phema["phema"]["coefficients"]) == 8
    # the combination of the stored averages, key by key
    stored = [load_snapshot(run / f"snapshot-{n:09d}.pt") for n in (128, 256, 384, 512)]
    states = [s for snap in stored for s in (snap["net"], snap["ema_profiles"]["power:0.15"])]
    for key, value in phema["net"].items():
        if value.is_floating_point():
            want = sum(c * s[key].double() for c, s in zip(phema["phema"]["coefficients"], states))
            torch.testing.assert_close(value.double(), want.to(value.dtype).double(), rtol=1e-5, atol=1e-7)
    p = subprocess.run([EDM_OPT, "sample", str(run), "--snapshot", str(out), "--seeds", "0-3", "--steps", "4",
                        "--out", "g.png"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and (tmp_path / "g.png").is_file(), p.stderr[-2000:]
    for bad, needle in ((["--std", "0.5"], "--std"), (["--std", "0.1", "--at", "64"], "at least two")):
        p = subprocess.run([EDM_OPT, "phema", str(run), *bad], cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode != 0 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    p = subprocess.run([EDM_OPT, "sample", str(run), "--ema", "power:0.3", "--out", "h.png"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "power:0.05, power:0.15" in p.stderr
    p = subprocess.run([EDM_OPT, "sample", str(run), "--class", "3", "--out", "h.png"], cwd=tmp_path,
                       capture_output=True, text=True)  # an unconditional net asked for labels
    assert p.returncode == 1 and "unconditional" in p.stderr and "Traceback" not in p.stderr
