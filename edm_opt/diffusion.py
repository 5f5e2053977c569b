"""The unified formulation: every process, target and loss in VE x0 coordinates (method.md section 1).

A noisy sample is x = x0 + sigma * eps with sigma the VE noise level; a denoiser is
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise). Every per-sigma loss edm-opt reports is the x0 mean
squared error per dimension on data in [-1, 1]; a native loss is k(sigma) times it.

This module also owns the sigma grid of DESIGN.md (log-spaced points, bins in ln sigma, metric keys)
and the base sigma densities that the schedules draw from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5

# --------------------------------------------------------------------------------------------------
# The sigma grid (DESIGN.md "sigma grid" and "sigma keys").


def sigma_grid(sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, num: int = 32) -> np.ndarray:
    """`num` VE noise levels log-spaced over [sigma_min, sigma_max], both ends included exactly."""
    if num < 2 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"a sigma grid needs 0 < sigma_min < sigma_max and at least 2 points, got "
                         f"{sigma_min}:{sigma_max}:{num}")
    s = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), num))
    s[0], s[-1] = sigma_min, sigma_max
    return s


def parse_sigmas(spec: str) -> np.ndarray:
    """`"0.002:80:32"` (min:max:count, log-spaced) or an increasing list `"0.1,0.5,2"`."""
    try:
        if ":" in spec:
            lo, hi, num = spec.split(":")
            return sigma_grid(float(lo), float(hi), int(num))
        s = np.array([float(v) for v in spec.split(",") if v.strip()], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"cannot parse sigmas {spec!r}: expected MIN:MAX:COUNT or a comma list ({e})") from None
    if s.size == 0 or np.any(s <= 0) or np.any(np.diff(s) <= 0):
        raise ValueError(f"sigmas {spec!r} must be positive and strictly increasing")
    return s


def sigma_key(sigma: float) -> str:
    """The metric-key form of a grid value: `format(s, ".4g")` (`0.002`, `0.0028`, ..., `80`)."""
    return format(float(sigma), ".4g")


def bin_edges(sigmas: np.ndarray) -> np.ndarray:
    """Edges in ln sigma of the bins centred on the grid points (K + 1 values).

    Inner edges are the geometric midpoints of neighbours; the outer edges mirror the inner ones.
    """
    ln = np.log(np.asarray(sigmas, dtype=np.float64))
    if ln.size < 2:
        raise ValueError("bins need at least two sigmas")
    mid = 0.5 * (ln[1:] + ln[:-1])
    return np.concatenate([[2 * ln[0] - mid[0]], mid, [2 * ln[-1] - mid[-1]]])


def bin_index(sigma: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Index of the grid bin holding each sigma (values outside the grid go to the end bins)."""
    inner = torch.as_tensor(bin_edges(sigmas)[1:-1], dtype=torch.float64, device=sigma.device)
    return torch.bucketize(sigma.double().log(), inner)


# --------------------------------------------------------------------------------------------------
# Processes -> VE sigma (method.md section 1, first table).

VP_BETA_D, VP_BETA_MIN = 19.9, 0.1


def vp_sigma(t):
    """VE sigma of the VP (DDPM) process at time t: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return np.sqrt(np.expm1(0.5 * VP_BETA_D * np.square(t) + VP_BETA_MIN * np.asarray(t)))


def vp_t(sigma):
    """Inverse of `vp_sigma`."""
    log1p_s2 = np.log1p(np.square(sigma))
    return (np.sqrt(VP_BETA_MIN ** 2 + 2 * VP_BETA_D * log1p_s2) - VP_BETA_MIN) / VP_BETA_D


def fm_sigma(t):
    """VE sigma of flow matching x_t = (1 - t) x0 + t eps: sigma = t / (1 - t)."""
    return np.asarray(t) / (1 - np.asarray(t))


def fm_t(sigma):
    """Inverse of `fm_sigma`: t = sigma / (1 + sigma)."""
    return np.asarray(sigma) / (1 + np.asarray(sigma))


# --------------------------------------------------------------------------------------------------
# Targets: native loss = k(sigma) x (x0 loss) (method.md section 1, second table).

TARGETS = ("x0", "eps", "fm", "v", "F")


def target_factor(target: str, sigma, sigma_data: float = SIGMA_DATA):
    """k(sigma) = native loss / x0 loss for a model trained on `target` (VE sigma, any array type).

    x0: 1; eps: 1/sigma^2; fm (velocity eps - x0): (1+sigma)^2/sigma^2; v (VP): (1+sigma^2)/sigma^2;
    F (EDM's raw network output): 1/c_out^2 = (sigma^2 + sigma_data^2)/(sigma sigma_data)^2.
    """
    s2 = sigma * sigma
    if target == "x0":
        return sigma * 0 + 1
    if target == "eps":
        return 1 / s2
    if target == "fm":
        return (1 + sigma) ** 2 / s2
    if target == "v":
        return (1 + s2) / s2
    if target == "F":
        return edm_weight(sigma, sigma_data)
    raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")


def edm_weight(sigma, sigma_data: float = SIGMA_DATA):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma * sigma + sigma_data ** 2) / (sigma * sigma_data) ** 2


# --------------------------------------------------------------------------------------------------
# Preconditioning in D(x; sigma) form (method.md section 1, third table; EDM paper Table 1).

PRECONDS = ("edm", "ve", "vp", "fm")
PRECOND_TARGET = {"edm": "F", "ve": "eps", "vp": "eps", "fm": "fm"}


def precond_coefficients(precond: str, sigma: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in) for a preconditioning, elementwise in sigma's dtype.

    `edm` follows the EDM2 release's float32 operation order (architectures.md 1.5) so that official
    weights reproduce their outputs bit for bit. The noise conditioning c_noise is not here: it stays
    the backbone's own function of sigma (ln(sigma)/4 for EDM2 and DDPM++).
    """
    if precond == "edm":
        sd2 = sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
    elif precond == "ve":
        c_skip, c_out, c_in = torch.ones_like(sigma), sigma, torch.ones_like(sigma)
    elif precond == "vp":
        c_skip, c_out, c_in = torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt()
    elif precond == "fm":
        c_skip = 1 / (1 + sigma)
        c_out, c_in = -sigma / (1 + sigma), 1 / (1 + sigma)
    else:
        raise ValueError(f"unknown preconditioning {precond!r}; expected one of {', '.join(PRECONDS)}")
    return c_skip, c_out, c_in


# --------------------------------------------------------------------------------------------------
# Base sigma densities. Flow matching's logit-normal t is a log-normal sigma: ln sigma = logit(t).


@dataclass(frozen=True)
class LogNormal:
    """ln sigma ~ N(p_mean, p_std^2); draws are clipped to [SIGMA_MIN, SIGMA_MAX] (method.md section 4)."""

    p_mean: float
    p_std: float

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (z * self.p_std + self.p_mean).exp().clamp(SIGMA_MIN, SIGMA_MAX).float().to(device)

    def bin_mass(self, sigmas: np.ndarray) -> np.ndarray:
        """Probability of each grid bin (unnormalised: mass beyond the outer edges is left out)."""
        from scipy.special import ndtr

        cdf = ndtr((bin_edges(sigmas) - self.p_mean) / self.p_std)
        return np.diff(cdf)


@dataclass(frozen=True)
class LogUniform:
    """ln sigma ~ U(ln lo, ln hi): VE (NCSN) training as in EDM's Table 1 (lo 0.02, hi 100); not clipped."""

    lo: float = 0.02
    hi: float = 100.0

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (math.log(self.lo) + u * math.log(self.hi / self.lo)).exp().float().to(device)

    def bin_mass(self, sigmas: np.ndarray) -> np.ndarray:
        """Probability of each grid bin (unnormalised: mass beyond the outer edges is left out)."""
        cdf = np.clip((bin_edges(sigmas) - math.log(self.lo)) / math.log(self.hi / self.lo), 0.0, 1.0)
        return np.diff(cdf)


@dataclass(frozen=True)
class VPTime:
    """t ~ U(eps_t, 1), sigma = vp_sigma(t): VP (DDPM) training as in EDM's Table 1 (eps_t 1e-5, so sigma runs
    from 0.001 to 152); not clipped."""

    eps_t: float = 1e-5

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = self.eps_t + (1 - self.eps_t) * torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.expm1(0.5 * VP_BETA_D * t ** 2 + VP_BETA_MIN * t).sqrt().float().to(device)

    def bin_mass(self, sigmas: np.ndarray) -> np.ndarray:
        """Probability of each grid bin (unnormalised: mass beyond the outer edges is left out)."""
        t = vp_t(np.exp(bin_edges(sigmas)))
        return np.diff(np.clip((t - self.eps_t) / (1 - self.eps_t), 0.0, 1.0))


EDM_DENSITY = LogNormal(-1.2, 1.2)
FM_DENSITY = LogNormal(0.0, 1.0)
VE_DENSITY = LogUniform(0.02, 100.0)
VP_DENSITY = VPTime(1e-5)


def reference_total(sigmas: np.ndarray, per_sigma: np.ndarray) -> float:
    """DESIGN.md's reference total sum_i q_i lambda(s_i) L_i of per-sigma x0 losses (per dimension).

    q_i is the EDM log-normal (P_mean -1.2, P_std 1.2) mass of bin i and lambda the EDM weight, so the
    number is comparable across schedules. Applied to J* it gives `jstar/ref_total`.
    """
    sigmas = np.asarray(sigmas, dtype=np.float64)
    q = EDM_DENSITY.bin_mass(sigmas)
    return float(np.sum(q * edm_weight(sigmas) * np.asarray(per_sigma, dtype=np.float64)))


# --------------------------------------------------------------------------------------------------
# Any model as a VE x0 denoiser (what `edm-opt diagnose` measures): input scaled by the preconditioning's
# c_in, output converted from its native target to D(x; sigma) (method.md section 1).


class NativeDenoiser(torch.nn.Module):
    """Wrap `module(x_in, sigma, labels) -> native output` as D(x; sigma, labels) in VE x0 coordinates.

    x = x0 + sigma eps (VE); the module sees x_in = c_in(sigma) x of `precond` (edm: 1/sqrt(sigma^2 +
    sigma_data^2); vp: 1/sqrt(1 + sigma^2), i.e. the VP process's x_t; fm: 1/(1 + sigma), flow matching's
    x_t; ve: 1) and the VE sigma (convert with `vp_t` / `fm_t` inside if it wants its own time). Its output
    is converted by `target`:
      x0: D = out;  eps: D = x - sigma out;  fm (u = eps - x0): D = (x - sigma out) / (1 + sigma);
      v (VP): D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) out;  F: D = c_skip x + c_out out.
    """

    def __init__(self, module: torch.nn.Module, target: str = "x0", precond: str = "edm",
                 sigma_data: float = SIGMA_DATA):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
        if precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {precond!r}; expected one of {', '.join(PRECONDS)}")
        self.module, self.target, self.precond, self.sigma_data = module, target, precond, sigma_data
        for attr in ("img_resolution", "img_channels", "label_dim"):
            if hasattr(module, attr):
                setattr(self, attr, getattr(module, attr))

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        x = x.float()
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = precond_coefficients(self.precond, s, self.sigma_data)
        out = self.module(c_in * x, s.reshape(-1).expand(x.shape[0]), class_labels).float()
        if self.target == "x0":
            return out
        if self.target == "eps":
            return x - s * out
        if self.target == "fm":
            return (x - s * out) / (1 + s)
        if self.target == "v":
            return x / (1 + s * s) - s / (1 + s * s).sqrt() * out
        return c_skip * x + c_out * out  # F
