"""The sigma grid, process maps, target factors, preconditioning and base densities (method.md section 1)."""

import math

import numpy as np
import pytest
import torch

from edm_opt.diffusion import (EDM_DENSITY, FM_DENSITY, bin_edges, bin_index, edm_weight, fm_sigma, fm_t,
                               parse_sigmas, precond_coefficients, reference_total, sigma_grid, sigma_key,
                               target_factor, vp_sigma, vp_t)


def test_grid_keys_and_bins():
    s = sigma_grid()
    assert len(s) == 32 and s[0] == 0.002 and s[-1] == 80.0
    np.testing.assert_allclose(np.diff(np.log(s)), np.log(80 / 0.002) / 31)
    assert [sigma_key(v) for v in s[:3]] == ["0.002", "0.002815", "0.003962"]
    assert sigma_key(s[-1]) == "80" and float(sigma_key(s[5])) == pytest.approx(s[5], rel=1e-3)
    np.testing.assert_array_equal(parse_sigmas("0.002:80:32"), s)
    np.testing.assert_array_equal(parse_sigmas("0.5, 1,2"), [0.5, 1.0, 2.0])
    for bad in ("1:2", "2,1", "-1,1", "a,b"):
        with pytest.raises(ValueError):
            parse_sigmas(bad)
    e = bin_edges(s)
    ln = np.log(s)
    np.testing.assert_allclose(e[1:-1], (ln[1:] + ln[:-1]) / 2)
    assert e[0] - ln[0] == pytest.approx(ln[0] - e[1]) and e[-1] - ln[-1] == pytest.approx(ln[-1] - e[-2])
    assert torch.equal(bin_index(torch.tensor(s), s), torch.arange(32))
    assert bin_index(torch.tensor([1e-5, 1e5]), s).tolist() == [0, 31]


def test_process_maps_are_inverse():
    t = np.linspace(0.01, 0.99, 50)
    np.testing.assert_allclose(vp_t(vp_sigma(t)), t, rtol=1e-10)
    np.testing.assert_allclose(fm_t(fm_sigma(t)), t, rtol=1e-12)
    assert vp_sigma(1.0) == pytest.approx(math.sqrt(math.exp(19.9 / 2 + 0.1) - 1))


@pytest.mark.parametrize("precond,target", [("edm", "F"), ("vp", "eps"), ("ve", "eps"), ("fm", "fm")])
def test_native_loss_factor_is_one_over_c_out_squared(precond, target):
    """Training F on its own target is the x0 loss times 1/c_out^2 = k(sigma) (method.md section 1)."""
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    _, c_out, _ = precond_coefficients(precond, sigma)
    torch.testing.assert_close(target_factor(target, sigma), 1 / c_out ** 2)


def test_precond_hand_values():
    s = torch.tensor([2.0])
    c_skip, c_out, c_in = precond_coefficients("edm", s)
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((0.25 / 4.25, 1 / math.sqrt(4.25),
                                                                         1 / math.sqrt(4.25)))
    assert [c.item() for c in precond_coefficients("vp", s)] == pytest.approx([1, -2, 1 / math.sqrt(5)])
    assert [c.item() for c in precond_coefficients("ve", s)] == pytest.approx([1, 2, 1])
    assert [c.item() for c in precond_coefficients("fm", s)] == pytest.approx([1 / 3, -2 / 3, 1 / 3])
    # FM: D = c_skip x + c_out F with x = x0 + sigma eps and F = eps - x0 (velocity) recovers x0
    x0, eps = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    c_skip, c_out, _ = precond_coefficients("fm", torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(c_skip * (x0 + 2 * eps) + c_out * (eps - x0), x0)
    with pytest.raises(ValueError, match="unknown preconditioning"):
        precond_coefficients("ddim", s)


def test_target_factors_by_hand():
    assert target_factor("eps", 2.0) == 0.25
    assert target_factor("v", 2.0) == 5 / 4
    assert target_factor("fm", 2.0) == 9 / 4
    assert target_factor("x0", 2.0) == 1
    assert edm_weight(0.5) == pytest.approx(2 * 0.25 / 0.0625)
    with pytest.raises(ValueError):
        target_factor("score", 1.0)


def test_densities_and_reference_total():
    s = sigma_grid()
    q = EDM_DENSITY.bin_mass(s)
    assert q.sum() == pytest.approx(1.0, abs=2e-3) and np.all(q > 0)
    g = torch.Generator().manual_seed(0)
    draws = EDM_DENSITY.sample(200000, g).double()
    assert draws.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert draws.min().item() >= 0.002 and draws.max().item() <= 80
    # flow matching's logit-normal t is a log-normal sigma: ln sigma = logit(t)
    t = fm_t(FM_DENSITY.sample(100000, g).double().numpy())
    logit = np.log(t / (1 - t))
    assert logit.mean() == pytest.approx(0, abs=0.02) and logit.std() == pytest.approx(1, abs=0.02)
    ones = np.ones_like(s)
    assert reference_total(s, ones) == pytest.approx(np.sum(q * edm_weight(s)))
