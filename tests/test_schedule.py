"""Schedules (method.md sections 4 and 6), the gap tracker, the lr schedule and EMA profiles."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from edm_opt.config import ConfigError, TrainConfig, resolve_config
from edm_opt.diffusion import (EDM_DENSITY, FM_DENSITY, LogNormal, bin_edges, bin_index, edm_weight, sigma_grid, vp_sigma,
                               vp_t)
from edm_opt.ema import EMA, parse_profiles, power_gamma
from edm_opt.optimal_loss import OptimalLossTable, UpperBound
from edm_opt.schedule import (DEFAULT_VARIANT, BinLossTracker, OptimalParams, OptimalSchedule, clipped_expectation,
                              make_schedule, starved_bands)
from edm_opt.training import lr_at

GRID = sigma_grid()


def fake_jstar() -> OptimalLossTable:
    """A J* shaped like digits': ~0 below sigma ~0.2, rising to the data variance 0.3."""
    var = 0.3
    values = var * GRID ** 4 / (GRID ** 4 + 1.0)
    values[GRID < 0.1] = 0.0
    return OptimalLossTable(GRID, values, np.zeros_like(values), {"data_variance": var})


def feed(schedule, gap_of_bin, steps, n=128, seed=0):
    """Train-batch losses = J* + gap profile for `steps` optimiser steps, with the schedule's own sampler."""
    g = torch.Generator().manual_seed(seed)
    jstar = torch.tensor(schedule.jstar if hasattr(schedule, "jstar") else fake_jstar().values)
    for step in range(1, steps + 1):
        sigma = schedule.sample(n, g)
        b = bin_index(sigma, GRID)
        schedule.tracker.observe(sigma, (jstar[b] + gap_of_bin[b]).float())
        schedule.after_step(step, None)


def test_optimal_weight_normalisation_and_cap():
    s = OptimalSchedule(GRID, EDM_DENSITY, fake_jstar())
    g = torch.Generator().manual_seed(0)
    draws = EDM_DENSITY.sample(400000, g)
    base_w = np.minimum(1 / s._interp_jstar(draws.double().numpy()), s.w_max)
    assert s.a * base_w.mean() == pytest.approx(1.0, rel=0.01)  # E_base[w] = 1 (Monte Carlo check)
    j = fake_jstar().values
    assert s.sigma_star == GRID[np.nonzero(j < 1e-3 * j[-1])[0][-1]]
    w = s.weight(torch.tensor(GRID, dtype=torch.float32)).double().numpy()
    assert w.max() == pytest.approx(s.a * s.w_max, rel=1e-5)  # capped: dynamic range ~1000
    assert w[-1] == pytest.approx(s.a / fake_jstar().values[-1], rel=1e-5)
    assert w.max() / w[-1] == pytest.approx(fake_jstar().values[-1] * s.w_max, rel=1e-5)
    assert 300 < w.max() / w[-1] < 3000


def test_optimal_stays_on_base_during_warmup_then_follows_the_gap():
    s = OptimalSchedule(GRID, EDM_DENSITY, fake_jstar(), warmup_count=16)
    # the weight is a/J*, so what matters is the gap relative to J* (capped where J* ~ 0): 0.1% of J*
    # everywhere, 30% of J* around sigma ~ 1
    jstar = torch.tensor(s.jstar)
    gap = 1e-3 * jstar
    gap[18:21] = 0.3 * jstar[18:21]
    feed(s, gap, steps=64, n=2)  # 128 samples: far too few for 16 in every bin with 1% base mass
    assert not s.warm and torch.equal(s.p, s.base)
    feed(s, gap, steps=64 * 8, n=128, seed=1)
    assert s.warm
    assert s.p[18:21].sum() > 0.5 > s.base[18:21].sum()  # concentrated where the gap is
    assert torch.all(s.p >= 0.2 * s.base - 1e-12)  # mixing keeps at least 20% of the base everywhere
    assert s.p.sum().item() == pytest.approx(1.0)
    sig = s.sample(20000, torch.Generator().manual_seed(3))
    share = (bin_index(sig, GRID) >= 18) & (bin_index(sig, GRID) <= 20)
    assert share.double().mean().item() == pytest.approx(s.p[18:21].sum().item(), abs=0.02)
    metrics = s.metrics()
    for family in ("sched/p_sigma_", "sched/share_sigma_"):  # p and the loss shares, each a distribution
        values = [v for k, v in metrics.items() if k.startswith(family)]
        assert len(values) == 32 and math.isclose(sum(values), 1.0, rel_tol=1e-9)
    assert len(metrics) == 64


def test_importance_correction_undoes_the_sampling_change():
    s = OptimalSchedule(GRID, EDM_DENSITY, fake_jstar(), importance_correction=True)
    s.p = torch.linspace(1, 2, 32, dtype=torch.float64)
    s.p /= s.p.sum()
    sigma = torch.tensor(GRID, dtype=torch.float32)
    err = torch.ones(32)
    np.testing.assert_allclose(s.loss(err, sigma).numpy(), (s.weight(sigma) * s.base / s.p).numpy(), rtol=1e-5)


def test_tracker_flush_timing_does_not_change_the_ema():
    a, b = BinLossTracker(GRID), BinLossTracker(GRID)
    g = torch.Generator().manual_seed(0)
    for step in range(50):
        sigma = EDM_DENSITY.sample(64, g)
        loss = torch.rand(64, generator=g)
        a.observe(sigma, loss)
        b.observe(sigma, loss)
        a.flush()
        if step % 7 == 6:
            b.flush()
    b.flush()
    torch.testing.assert_close(a.ema, b.ema, equal_nan=True)
    assert a.count.sum() == 50 * 64
    t = BinLossTracker(GRID, decay=0.5)
    one = torch.tensor([GRID[3]], dtype=torch.float32)
    for v in (1.0, 3.0, 5.0):
        t.observe(one, torch.tensor([v]))
    t.flush()
    assert t.ema[3].item() == pytest.approx(0.5 * (0.5 * 1 + 0.5 * 3) + 0.5 * 5)  # first value, then EMA


def _rank_worker(rank, world, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    s = OptimalSchedule(GRID, EDM_DENSITY, fake_jstar(), refresh=8, warmup_count=2)
    gap = torch.linspace(0, 0.02, 32, dtype=torch.float64) * (rank + 1)  # each rank sees other losses
    g = torch.Generator().manual_seed(100 + rank)
    jstar = torch.tensor(s.jstar)

    def all_reduce(t):
        dist.all_reduce(t)

    for step in range(1, 65):
        sigma = s.sample(64, g)
        b = bin_index(sigma, GRID)
        s.tracker.observe(sigma, (jstar[b] + gap[b]).float())
        s.after_step(step, all_reduce)
    torch.save(s.p, os.path.join(out, f"p{rank}.pt"))
    dist.destroy_process_group()


def test_same_p_on_every_rank(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "p0.pt"), torch.load(tmp_path / "p1.pt")
    assert torch.equal(p0, p1)
    assert not torch.allclose(p0, OptimalSchedule(GRID, EDM_DENSITY, fake_jstar()).base)  # it moved


def test_loss_forms():
    sigma = torch.tensor([0.1, 1.0, 10.0])
    err = torch.tensor([0.01, 0.1, 0.3])
    edm = make_schedule("edm", GRID, EDM_DENSITY)
    torch.testing.assert_close(edm.loss(err, sigma), edm_weight(sigma) * err)
    fm = make_schedule("fm", GRID, EDM_DENSITY)
    assert fm.density == FM_DENSITY
    torch.testing.assert_close(fm.loss(err, sigma), (1 + sigma) ** 2 / sigma ** 2 * err)
    edm2 = make_schedule("edm2", GRID, LogNormal(-0.8, 1.6))
    u = torch.zeros(3, requires_grad=True)
    loss = edm2.loss(err, sigma, u).sum()
    (grad,) = torch.autograd.grad(loss, u)
    torch.testing.assert_close(grad, 1 - edm_weight(sigma) * err)  # optimum at exp(u) = lambda x err
    with pytest.raises(ValueError, match="log-variance"):
        edm2.loss(err, sigma, None)


def test_vp_and_ve_losses_follow_edm_table_1():
    """EDM's VP and VE training losses: weight 1/sigma^2 on the x0 error (their unit-weight eps loss) under
    t ~ U(1e-5, 1), sigma = sqrt(exp(19.9 t^2 / 2 + 0.1 t) - 1), and ln sigma ~ U(ln 0.02, ln 100)."""
    sigma = torch.tensor([0.01, 0.5, 20.0])
    err = torch.tensor([1e-5, 0.01, 0.5])
    g = torch.Generator().manual_seed(0)
    for name in ("vp", "ve"):
        sched = make_schedule(name, GRID, EDM_DENSITY)  # the preset's log-normal is not theirs
        assert sched.name == name and not sched.uses_logvar
        torch.testing.assert_close(sched.loss(err, sigma), err / sigma ** 2)
        draws = sched.sample(200_000, g).double().numpy()
        if name == "vp":  # t(sigma) is uniform on [1e-5, 1]
            u = (vp_t(draws) - 1e-5) / (1 - 1e-5)
            assert draws.min() >= 0.99e-3 and draws.max() == pytest.approx(152.0, rel=0.01)
            assert vp_sigma(1.0) == pytest.approx(math.sqrt(math.expm1(19.9 / 2 + 0.1)))
        else:  # ln sigma is uniform on [ln 0.02, ln 100]
            u = np.log(draws / 0.02) / np.log(100 / 0.02)
        assert u.min() >= -1e-6 and u.max() <= 1 + 1e-6
        np.testing.assert_allclose(np.quantile(u, [0.1, 0.25, 0.5, 0.75, 0.9]), [0.1, 0.25, 0.5, 0.75, 0.9],
                                   atol=0.005)
        # bin masses: the empirical frequency of each grid bin; mass beyond the outer edges is left out
        counts = np.bincount(bin_index(torch.from_numpy(draws), GRID).numpy(), minlength=len(GRID))
        edges = np.exp(bin_edges(GRID))
        inside = (draws >= edges[0]) & (draws < edges[-1])
        counts[0] -= np.sum(draws < edges[0])
        counts[-1] -= np.sum(draws >= edges[-1])
        np.testing.assert_allclose(sched.density.bin_mass(GRID), counts / len(draws), atol=0.004)
        assert sched.density.bin_mass(GRID).sum() == pytest.approx(inside.mean(), abs=0.004)
    assert resolve_config(TrainConfig(schedule="vp", preset="edm2-nano"), 1).precond == "vp"
    assert resolve_config(TrainConfig(schedule="ve", preset="edm2-nano"), 1).precond == "ve"


def test_clipped_expectation_matches_monte_carlo():
    d = LogNormal(-0.8, 1.6)
    draws = d.sample(400000, torch.Generator().manual_seed(1)).double().numpy()
    fn = lambda s: np.log(s) ** 2 + s  # noqa: E731
    assert clipped_expectation(d, fn) == pytest.approx(fn(draws).mean(), rel=0.01)


def test_lr_schedule():
    cfg = TrainConfig(lr=0.01, lr_tref=1000.0, lr_warmup=100.0, duration=10000)
    assert lr_at(cfg, 50) == pytest.approx(0.005)
    assert lr_at(cfg, 500) == pytest.approx(0.01)
    assert lr_at(cfg, 4000) == pytest.approx(0.01 / 2)
    short = TrainConfig(lr=0.01, lr_tref=None, lr_warmup=1e6, duration=1000)
    assert lr_at(short, 25) == pytest.approx(0.01 * 25 / 50)  # warm-up capped at 5% of the run


def test_ema_profiles():
    assert power_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's published pairs
    assert power_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert parse_profiles("power:0.05, halflife:0.5Mi") == [("power", 0.05), ("halflife", 524288.0)]
    net = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(net, "power", 0.10)
    gamma = ema.gamma
    for t in range(1, 201):
        with torch.no_grad():
            net.weight.fill_(float(t))
        ema.update(net, t, t * 10, 10)
    # theta_hat(t) = sum_i w_i theta_i with w_i proportional to the product form of beta: check numerically
    w = np.zeros(200)
    for t in range(1, 201):
        beta = (1 - 1 / t) ** (gamma + 1)
        w *= beta
        w[t - 1] = 1 - beta
    assert ema.net.weight.item() == pytest.approx(float(np.dot(w, np.arange(1, 201))), rel=1e-5)
    assert w.sum() == pytest.approx(1.0)
    h = EMA(net, "halflife", 1000.0)
    assert h.beta(step=10, nimg=10 ** 6, batch=1000) == pytest.approx(0.5)
    assert h.beta(step=1, nimg=10000, batch=1000) == pytest.approx(0.5 ** 2)  # half-life ramped to 5% of nimg


# --- the variants of method.md section 4.3 ---------------------------------------------------------


def golden_schedule(base_schedule="edm2", **kw):
    """The golden file's J* and tracker state, with a J*_up, fed through the schedule's own sampler."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from make_paper_schedule_golden import golden_state

    jstar, gap = golden_state()
    lin = 0.3 * GRID ** 2 / (0.3 + GRID ** 2)
    jstar.upper = UpperBound(GRID, lin, np.maximum(jstar.values, 0) + 0.05, np.zeros(32))
    s = make_schedule("optimal", GRID, LogNormal(-0.8, 1.6), jstar, base_schedule, params=OptimalParams(**kw))
    g = torch.Generator().manual_seed(0)
    target = torch.tensor(np.maximum(jstar.values, 0) + gap)
    for step in range(1, 257):
        sigma = s.sample(64, g)
        s.tracker.observe(sigma, target[bin_index(sigma, GRID)].float())
        s.after_step(step, None)
    return s, jstar


def test_paper_variant_is_unchanged():
    """`--opt-variant paper` gives the p, weights, constants and draws of the implementation before the
    variants existed (tests/data/make_paper_schedule_golden.py, run at commit 8854907), bit for bit."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "data"))
    from make_paper_schedule_golden import run

    gold = json.loads((Path(__file__).parent / "data" / "paper_schedule_golden.json").read_text())
    for base in ("edm2", "fm"):
        now = run(base)
        for key, value in gold[base].items():
            assert json.dumps(now[key]) == json.dumps(value), (base, key)


def tilt_by_hand(base, t, seen, gamma, lo, hi, m):
    """method.md 4.3's sampler written out in numpy: p = (1-m) base clip(T/T_bar)^gamma / Z + m base."""
    base, t, seen = np.asarray(base), np.asarray(t), np.asarray(seen)
    t_bar = (base[seen] * t[seen]).sum() / base[seen].sum()
    ratio = np.where(seen, np.clip(t / t_bar, lo, hi), 1.0)
    tilted = base * ratio ** gamma
    return (1 - m) * tilted / tilted.sum() + m * base


@pytest.mark.parametrize("variant,gamma", [("floor", 1.0), ("floor", 0.5), ("base-below", 1.0), ("edm2-tilt", None)])
def test_tilted_sampler_follows_the_formula(variant, gamma):
    s, jstar = golden_schedule(variant=variant, gamma=gamma)
    assert s.warm
    ema = s.tracker.ema.numpy()
    seen = ~np.isnan(ema)
    excess = np.where(seen, np.maximum(np.nan_to_num(ema) - np.maximum(jstar.values, s.jstar_floor), 0), 0)
    t = excess / np.where(seen, ema, 1) if variant == "edm2-tilt" else s.grid_weight() * excess
    want = tilt_by_hand(s.base.numpy(), t, seen, s.gamma, 0.25, 4.0, 0.2)
    np.testing.assert_allclose(s.p.numpy(), want, rtol=1e-12)
    assert s.p.sum().item() == pytest.approx(1.0)
    ratio = s.p / s.base
    assert ratio.min() >= 0.2 + 0.8 * 0.25 ** s.gamma / 4 ** s.gamma - 1e-9 and ratio.max() <= 0.2 + 0.8 * 16  # clip
    assert s.gamma == (0.5 if variant == "edm2-tilt" else gamma)  # edm2-tilt's own default


def test_gamma_zero_samples_from_the_base():
    s, _ = golden_schedule(variant="floor", gamma=0.0)
    assert s.warm and torch.allclose(s.p, s.base, rtol=1e-12, atol=0)


def base_mean(s, p_mean=-0.8, p_std=1.6) -> float:
    """E[w(sigma)] for ln sigma ~ N(p_mean, p_std^2) clipped to [0.002, 80], by adaptive quadrature (the weights are
    too heavy-tailed at small sigma for a Monte-Carlo check at 1%)."""
    from scipy import integrate
    from scipy.stats import norm

    lo, hi = np.log(0.002), np.log(80.0)
    w = lambda z: s.weight(torch.tensor([np.exp(z)], dtype=torch.float64)).item()  # noqa: E731
    knots = np.log(GRID)  # w is log-linear between grid points: integrate piece by piece
    inner = sum(integrate.quad(lambda z: norm.pdf(z, p_mean, p_std) * w(z), a, b)[0]
                for a, b in zip(knots[:-1], knots[1:]))
    return inner + norm.cdf(lo, p_mean, p_std) * w(lo) + norm.sf(hi, p_mean, p_std) * w(hi)


def test_floor_and_base_below_weights():
    s, jstar = golden_schedule(variant="floor")
    level = np.maximum(np.maximum(jstar.values, s.jstar_floor), jstar.upper.values)
    np.testing.assert_allclose(s.grid_weight(), s.a / level, rtol=1e-12)  # a / max(J*_train, J*_up)
    assert base_mean(s) == pytest.approx(1.0, rel=1e-4)  # E_base[w] = 1
    b, jstar = golden_schedule(variant="base-below", tau=0.25)
    j = int(np.nonzero(jstar.values >= 0.25 * jstar.values.max())[0][0])
    assert b.sigma_j == GRID[j]
    w = b.grid_weight()
    np.testing.assert_allclose(w[j:], b.a / jstar.values[j:], rtol=1e-12)  # a / J* from sigma_j up
    lam = edm_weight(GRID)
    np.testing.assert_allclose(w[:j], b.a * lam[:j] / (jstar.values[j] * lam[j]), rtol=1e-12)  # lambda's shape below
    just_below = torch.tensor([GRID[j] * (1 - 1e-9)], dtype=torch.float64)
    assert b.weight(just_below).item() == pytest.approx(w[j], rel=1e-6)  # continuous at sigma_j
    assert base_mean(b) == pytest.approx(1.0, rel=1e-4)
    fm, _ = golden_schedule("fm", variant="base-below")
    lam_fm = (1 + GRID) ** 2 / GRID ** 2
    wf = fm.grid_weight()
    np.testing.assert_allclose(wf[:j] / wf[0], lam_fm[:j] / lam_fm[0], rtol=1e-12)  # the fm weight's shape


def test_edm2_tilt_learns_the_weight():
    s, _ = golden_schedule(variant="edm2-tilt")
    assert s.uses_logvar
    sigma = torch.tensor([0.1, 1.0, 10.0])
    err = torch.tensor([0.01, 0.1, 0.3])
    u = torch.zeros(3, requires_grad=True)
    (grad,) = torch.autograd.grad(s.loss(err, sigma, u).sum(), u)
    torch.testing.assert_close(grad, 1 - edm_weight(sigma) * err)  # optimum at exp(u) = lambda x err: EDM2's
    with pytest.raises(ValueError, match="log-variance"):
        s.loss(err, sigma, None)


def test_loss_shares_of_every_schedule():
    edm = make_schedule("edm", GRID, EDM_DENSITY)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sigma = EDM_DENSITY.sample(256, g)
        edm.tracker.observe(sigma, 0.1 * sigma.clamp(max=1) ** 2)
    edm.tracker.flush()
    ema = edm.tracker.ema.numpy()
    mass = EDM_DENSITY.bin_mass(GRID) / EDM_DENSITY.bin_mass(GRID).sum()
    want = np.nan_to_num(mass * edm_weight(GRID) * ema)
    np.testing.assert_allclose(edm.shares(), want / want.sum(), rtol=1e-12)
    assert len(edm.metrics()) == 32 and sum(edm.metrics().values()) == pytest.approx(1.0)
    # EDM2 at the optimum of its log-variance, exp(u) = lambda J: the share is the sampling density itself
    edm2 = make_schedule("edm2", GRID, EDM_DENSITY)
    edm2.tracker.load_state_dict(edm.tracker.state_dict())
    u = np.log(edm_weight(GRID) * ema)
    seen = ~np.isnan(ema)
    np.testing.assert_allclose(edm2.shares(u)[seen], mass[seen] / mass[seen].sum(), rtol=1e-9)
    np.testing.assert_allclose(edm2.base_shares()[seen], mass[seen] / mass[seen].sum(), rtol=1e-9)


def test_starved_bands():
    share = np.where(GRID < 0.3, 0.5, 0.0) + np.where(GRID > 10, 0.001, 0.0)
    base = np.where(GRID < 2, 0.2, 0.3)
    bad = starved_bands(GRID, share / share.sum(), base / base.sum())
    assert [b.split(":")[0] for b in bad] == ["sigma 0.3-2", "sigma 2-10", "sigma > 10"]
    assert starved_bands(GRID, base / base.sum(), base / base.sum()) == []
    # paper, fed the golden state, starves sigma >= 2 against edm2 (method.md 4.1); floor does not starve 0.3-2
    paper, _ = golden_schedule(variant="paper")
    names = [b.split(":")[0] for b in starved_bands(GRID, paper.shares(), paper.base_shares())]
    assert "sigma 2-10" in names and "sigma > 10" in names


def test_variant_options_are_checked():
    for cfg, needle in [({"opt_variant": "best"}, "opt_variant"), ({"opt_gamma": -1}, "opt_gamma"),
                        ({"opt_clip_lo": 4, "opt_clip_hi": 0.25}, "opt_clip_lo"), ({"opt_gamma": "big"}, "opt_gamma"),
                        ({"opt_tau": 0}, "opt_tau"), ({"opt_clip_lo": 0}, "opt_clip_lo")]:
        with pytest.raises(ConfigError, match=needle):
            TrainConfig.from_dict({"schedule": "optimal", **cfg})
    for cfg, needle in [({"schedule": "edm2", "opt_variant": "floor"}, "opt_variant"),
                        ({"schedule": "optimal", "opt_variant": "paper", "opt_gamma": 1}, "opt_gamma"),
                        ({"schedule": "optimal", "opt_variant": "floor", "opt_tau": 0.5}, "opt_tau"),
                        ({"schedule": "optimal", "opt_variant": "floor", "opt_clip_lo": 5.0}, "opt_clip_lo"),
                        ({"schedule": "optimal", "opt_variant": "floor", "opt_bump": True}, "opt_bump"),
                        ({"schedule": "optimal", "opt_variant": "edm2-tilt", "preset": "ddpmpp-tiny"}, "edm2-tilt")]:
        with pytest.raises(ConfigError, match=needle):
            resolve_config(TrainConfig.from_dict(cfg))
    # the default variant: edm2-tilt on EDM2's schedule (EDM2 presets), floor on the others
    r = resolve_config(TrainConfig.from_dict({"schedule": "optimal"}))
    assert (r.base_schedule, r.opt_variant, r.opt_gamma, r.opt_clip_lo, r.opt_clip_hi) == ("edm2", "edm2-tilt", 0.5,
                                                                                           0.25, 4.0)
    for given in ({"base_schedule": "fm"}, {"base_schedule": "edm"}, {"preset": "ddpmpp-tiny"}):
        r = resolve_config(TrainConfig.from_dict({"schedule": "optimal", **given}))
        assert (r.opt_variant, r.opt_gamma, r.opt_clip_lo, r.opt_clip_hi, r.opt_tau) == (DEFAULT_VARIANT, 1.0, 0.25,
                                                                                         4.0, None)
    r = resolve_config(TrainConfig.from_dict({"schedule": "optimal", "opt_variant": "base-below"}))
    assert r.opt_tau == 0.25


def test_runs_from_before_the_variants_keep_their_names_and_resume():
    old = resolve_config(TrainConfig.from_dict({"schedule": "optimal", "opt_variant": "paper"}))
    stored = {k: v for k, v in old.to_dict().items() if k not in TrainConfig.ADDED}  # a run.json of before
    assert not set(TrainConfig.ADDED) & set(old.hashed())
    assert old.resume_conflicts(stored) == []
    floor = resolve_config(TrainConfig.from_dict({"schedule": "optimal"}))
    assert floor.resume_conflicts(stored) == ["opt_clip_hi", "opt_clip_lo", "opt_gamma", "opt_variant"]
    assert floor.config_hash() != old.config_hash()
    edm2 = resolve_config(TrainConfig.from_dict({"schedule": "edm2"}))
    assert not set(TrainConfig.ADDED) & set(edm2.hashed())
