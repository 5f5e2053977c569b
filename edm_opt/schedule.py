"""Training objectives: a sigma sampler and an x0-loss weight each (method.md sections 1, 4 and 6).

Every schedule writes its loss on the per-sample x0 error m_i = ||D(x_i; sigma_i) - x0_i||^2 / D (per
dimension, VE coordinates):

- `edm`:  ln sigma ~ N(P_mean, P_std^2), loss lambda(sigma) m with lambda = 1/c_out^2 (EDM's F loss);
- `edm2`: the same density, loss lambda(sigma) m / exp(u(sigma)) + u(sigma) with the network's learned
  log-variance u (EDM2's uncertainty weighting);
- `fm`:   t logit-normal(0, 1), i.e. ln sigma ~ N(0, 1), loss (1+sigma)^2/sigma^2 m (unit-weight velocity loss);
- `vp`, `ve`: EDM's VP and VE losses, m / sigma^2 (unit-weight eps loss), with t ~ U(1e-5, 1), sigma = sigma_vp(t)
  and ln sigma ~ U(ln 0.02, ln 100);
- `optimal`: the optimal-loss schedule (method.md section 4), sigma drawn from p over the grid's bins with
  p following the gap J_sigma(theta) - J*_sigma tracked per bin, in one of four variants (`--opt-variant`):
  `paper` (4.1: w = a min(1/J*, w_max), p ~ the weighted gap mixed with the base) and the three of 4.3 that
  tilt the base density instead: `floor` (w = a / max(J*_train, J*_up)), `base-below` (a / J* above sigma_j,
  the base schedule's shape below it) and `edm2-tilt` (EDM2's learned weight).

All schedules feed a `BinLossTracker`, whose per-bin EMAs are logged as `loss_x0_batch/sigma_<s>`, and report
each bin's share of the training signal, s_b = p_b w_b EMA_b / sum (`sched/share_sigma_<s>`, method.md 4.4).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .config import DEFAULT_VARIANT, OPT_VARIANTS, VARIANT_DEFAULTS
from . import contract as C
from .contract import BANDS, band_name, band_shares, normalised_share
from .diffusion import (FM_DENSITY, SIGMA_MAX, SIGMA_MIN, VE_DENSITY, VP_DENSITY, LogNormal, bin_edges, bin_index,
                        edm_weight, target_factor)

AllReduce = Callable[[torch.Tensor], None]  # in-place sum over ranks (None: one process)


class BinLossTracker:
    """Per-bin exponential moving average of the training-batch per-dim x0 loss (the gap tracker).

    Each optimiser step contributes one update per bin it sampled: ema <- decay ema + (1 - decay) mean.
    Per-step sums and counts are buffered and all-reduced only when `flush` is called (before each refresh
    of p, each status line and each checkpoint), then applied in step order, so every rank holds the same
    EMA and the result does not depend on when flushes happen.
    """

    def __init__(self, sigmas: np.ndarray, decay: float = 0.99):
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.decay = decay
        k = len(self.sigmas)
        self.ema = torch.full((k,), math.nan, dtype=torch.float64)
        self.count = torch.zeros(k, dtype=torch.float64)  # samples seen per bin, all ranks
        self._sums: list[torch.Tensor] = []
        self._counts: list[torch.Tensor] = []

    def observe(self, sigma: torch.Tensor, loss_x0: torch.Tensor) -> None:
        """Record one optimiser step's samples on this rank (all its micro-batches, concatenated)."""
        k = len(self.sigmas)
        idx = bin_index(sigma.detach().cpu(), self.sigmas)
        self._sums.append(torch.bincount(idx, loss_x0.detach().double().cpu(), minlength=k))
        self._counts.append(torch.bincount(idx, minlength=k).double())

    def flush(self, all_reduce: AllReduce | None = None) -> None:
        """Apply the buffered steps. Every rank calls it at the same steps with as many buffered."""
        if not self._sums:
            return
        sums, counts = torch.stack(self._sums), torch.stack(self._counts)
        if all_reduce is not None:
            both = torch.stack([sums, counts])
            all_reduce(both)
            sums, counts = both[0], both[1]
        for s, c in zip(sums, counts):
            seen = c > 0
            mean = s[seen] / c[seen]
            old = self.ema[seen]
            self.ema[seen] = torch.where(torch.isnan(old), mean, self.decay * old + (1 - self.decay) * mean)
            self.count += c
        self._sums, self._counts = [], []

    def metrics(self) -> dict[str, float]:
        return C.sigma_metrics(C.LOSS_X0_BATCH, self.sigmas, self.ema.tolist(), skip_nan=True)

    def state_dict(self) -> dict:
        return {"ema": self.ema.clone(), "count": self.count.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.ema, self.count = d["ema"].clone().double(), d["count"].clone().double()
        self._sums, self._counts = [], []


class Schedule:
    """A sigma density and an x0-loss weight. Subclasses override what differs."""

    name = "edm"
    uses_logvar = False
    p: torch.Tensor | None = None  # the sampling probability per grid bin, for schedules that sample the grid

    def __init__(self, sigmas: np.ndarray, density: LogNormal, sigma_data: float = 0.5, decay: float = 0.99):
        self.sigmas = np.asarray(sigmas, dtype=np.float64)
        self.density = density
        self.sigma_data = sigma_data
        self.tracker = BinLossTracker(self.sigmas, decay)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n VE noise levels (float32, CPU)."""
        return self.density.sample(n, generator)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Weight of the per-dim x0 error: EDM's lambda(sigma) = 1 / c_out^2."""
        return edm_weight(sigma, self.sigma_data)

    def loss(self, err: torch.Tensor, sigma: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample training loss from the per-sample per-dim x0 error `err`."""
        return self.weight(sigma) * err

    def after_step(self, step: int, all_reduce: AllReduce | None) -> None:
        """Called once after every optimiser step (step counts from 1)."""

    # what the training loop hands the schedule and reads back --------------------------------------
    def observe(self, sigma: torch.Tensor, loss_x0: torch.Tensor) -> None:
        """One optimiser step's noise levels and per-sample per-dim x0 errors on this rank (the gap tracker)."""
        self.tracker.observe(sigma, loss_x0)

    def flush(self, all_reduce: AllReduce | None = None) -> None:
        """Apply the buffered steps to the tracker (every rank at the same steps: statuses, checkpoints)."""
        self.tracker.flush(all_reduce)

    def history_row(self, logvar_grid: np.ndarray | None = None) -> dict:
        """The schedule's rows of a per-sigma history status (contract.PerSigmaHistory)."""
        return {"loss_x0_batch": self.tracker.ema.numpy(), "share": self.shares(logvar_grid),
                "p_sigma": None if self.p is None else self.p.numpy()}

    def status_metrics(self, logvar_grid: np.ndarray | None = None) -> dict[str, float]:
        """The schedule's metrics at a status: the tracker's per-bin EMAs and `metrics` (shares, p)."""
        return {**self.tracker.metrics(), **self.metrics(logvar_grid)}

    def starved(self, logvar_grid: np.ndarray | None = None) -> list[str]:
        """Bands of the grid with less than half their base schedule's share (method.md 4.4); none for a base
        schedule, or before an optimal schedule's warm-up is over."""
        return []

    # loss shares (method.md section 4.4) ----------------------------------------------------------
    def sampling_mass(self) -> np.ndarray:
        """Probability of each grid bin under the sampler."""
        m = self.density.bin_mass(self.sigmas)
        return m / m.sum()

    def base_mass(self) -> np.ndarray:
        """The same under the base schedule (for base schedules: the sampler itself)."""
        return self.sampling_mass()

    def grid_weight(self, logvar_grid: np.ndarray | None = None) -> np.ndarray:
        """x0 weight at the grid points (`logvar_grid`: a learned log-variance u there, for EDM2's loss)."""
        return self.weight(torch.tensor(self.sigmas)).numpy()

    def base_grid_weight(self) -> np.ndarray:
        """x0 weight at the grid points of the base schedule this one is compared with."""
        return self.grid_weight()

    def shares(self, logvar_grid: np.ndarray | None = None) -> np.ndarray:
        """s_b = p_b w_b EMA_b / sum: each bin's share of the training signal (Adam removes the scale)."""
        return normalised_share(self.sampling_mass(), self.grid_weight(logvar_grid), self.tracker.ema.numpy())

    def base_shares(self) -> np.ndarray:
        """The shares the base schedule would give at the same per-bin losses."""
        return normalised_share(self.base_mass(), self.base_grid_weight(), self.tracker.ema.numpy())

    def metrics(self, logvar_grid: np.ndarray | None = None) -> dict[str, float]:
        return C.sigma_metrics(C.SHARE, self.sigmas, self.shares(logvar_grid))

    def describe(self) -> dict:
        return {"density": f"lognormal({self.density.p_mean}, {self.density.p_std})"}

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.tracker.load_state_dict(d["tracker"])


class EDM2Schedule(Schedule):
    """EDM2: lambda(sigma) m / exp(u) + u with the learned log-variance u(sigma) (method.md section 6)."""

    name = "edm2"
    uses_logvar = True

    def loss(self, err, sigma, logvar=None):
        if logvar is None:
            raise ValueError("the edm2 schedule needs a network with a log-variance head (an EDM2 preset)")
        return self.weight(sigma) / logvar.exp() * err + logvar

    def grid_weight(self, logvar_grid=None):
        return learned_weight(super().grid_weight(), logvar_grid)

    def base_grid_weight(self):
        return 1.0 / self.tracker.ema.numpy()  # lambda / exp(u) at u's optimum exp(u) = lambda J_sigma (method.md 4.2)


class FMSchedule(Schedule):
    """Flow matching: ln sigma = logit(t) ~ N(0, 1), unit-weight velocity loss = (1+sigma)^2/sigma^2 m."""

    name = "fm"

    def weight(self, sigma):
        return (1 + sigma) ** 2 / sigma ** 2


class EpsSchedule(Schedule):
    """EDM's VP and VE losses (Table 1): the unit-weight eps loss, i.e. weight 1/sigma^2 on the x0 error, under the
    original's own sigma density (`vp`: t ~ U(1e-5, 1), sigma = sigma_vp(t); `ve`: ln sigma ~ U(ln 0.02, ln 100))."""

    def __init__(self, name: str, sigmas, sigma_data: float = 0.5, decay: float = 0.99):
        super().__init__(sigmas, VP_DENSITY if name == "vp" else VE_DENSITY, sigma_data, decay)
        self.name = name

    def weight(self, sigma):
        return target_factor("eps", sigma)  # native eps loss = x0 loss / sigma^2

    def describe(self):
        d = self.density
        return {"density": f"t ~ U({d.eps_t:g}, 1), sigma = sigma_vp(t)" if self.name == "vp" else
                f"ln sigma ~ U(ln {d.lo:g}, ln {d.hi:g})"}


def clipped_expectation(density: LogNormal, fn: Callable[[np.ndarray], np.ndarray], points: int = 4001) -> float:
    """E[fn(sigma)] for ln sigma ~ N(m, s^2) clipped to [SIGMA_MIN, SIGMA_MAX] (trapezoid in ln sigma)."""
    from scipy.special import ndtr

    ln = np.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), points)
    z = (ln - density.p_mean) / density.p_std
    pdf = np.exp(-0.5 * z * z) / (density.p_std * math.sqrt(2 * math.pi))
    inner = np.trapezoid(pdf * fn(np.exp(ln)), ln)
    return float(inner + ndtr(z[0]) * fn(np.array([SIGMA_MIN]))[0] + (1 - ndtr(z[-1])) * fn(np.array([SIGMA_MAX]))[0])


class GridSampledSchedule(Schedule):
    """Sigma drawn from p over the grid's bins (a density in ln sigma, sigma uniform in ln sigma inside a bin),
    p recomputed every `refresh` optimiser steps from the gap tracker (method.md sections 4.1 and 4.3).

    p = base until every bin with base mass > warmup_mass has warmup_count samples (the warm-up); subclasses
    say what p is after it (`_moved_p`) and what the x0 weight is (`weight`, `grid_weight`).
    """

    name = "optimal"

    def __init__(self, sigmas, base: LogNormal, base_schedule: str, sigma_data: float = 0.5, decay: float = 0.99,
                 refresh: int = 64, mix: float = 0.2, warmup_count: int = 16, warmup_mass: float = 0.01,
                 importance_correction: bool = False):
        super().__init__(sigmas, base, sigma_data, decay)
        self.base_schedule = base_schedule
        self.base_weight = base_x0_weight(base_schedule, sigma_data)  # lambda_base
        self.base_learned = base_schedule == "edm2"
        self.refresh, self.mix = refresh, mix
        self.warmup_count, self.importance_correction = warmup_count, importance_correction
        edges = bin_edges(self.sigmas)
        self._lo = torch.tensor(edges[:-1])
        self._width = torch.tensor(np.diff(edges))
        mass = base.bin_mass(self.sigmas)
        self.base = torch.tensor(mass / mass.sum())
        self._needs_warmup = self.base > warmup_mass
        self.p = self.base.clone()
        self.warm = False  # True once the warm-up condition held at a refresh

    def sample(self, n, generator):
        bins = torch.multinomial(self.p, n, replacement=True, generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        sigma = (self._lo[bins] + u * self._width[bins]).exp()
        return sigma.clamp(SIGMA_MIN, SIGMA_MAX).float()

    def loss(self, err, sigma, logvar=None):
        w = self.weight(sigma)
        if self.importance_correction:  # ablation only: undo the change of sampling density
            b = bin_index(sigma.detach().cpu(), self.sigmas)
            w = w * (self.base[b] / self.p[b]).to(w)
        return w * err

    def after_step(self, step, all_reduce):
        if step % self.refresh == 0:
            self.tracker.flush(all_reduce)
            self.p = self.compute_p()

    def compute_p(self) -> torch.Tensor:
        """p from the tracker's EMAs: the base during the warm-up, then the subclass's rule."""
        if not self.warm:
            self.warm = bool(torch.all(self.tracker.count[self._needs_warmup] >= self.warmup_count))
            if not self.warm:
                return self.base.clone()
        return self._moved_p()

    def _moved_p(self) -> torch.Tensor:
        raise NotImplementedError

    def sampling_mass(self) -> np.ndarray:
        return self.p.numpy()

    def base_mass(self) -> np.ndarray:
        return self.base.numpy()

    def starved(self, logvar_grid=None):
        return starved_bands(self.sigmas, self.shares(logvar_grid), self.base_shares()) if self.warm else []

    def base_grid_weight(self) -> np.ndarray:
        if self.base_learned:
            return 1.0 / self.tracker.ema.numpy()  # EDM2's learned weight at its optimum (method.md 4.2)
        return self.base_weight(self.sigmas)

    def metrics(self, logvar_grid=None):
        return {**super().metrics(logvar_grid),
                **C.sigma_metrics(C.P_SIGMA, self.sigmas, self.p.tolist())}

    def state_dict(self):
        return {**super().state_dict(), "p": self.p.clone(), "warm": self.warm}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.p, self.warm = d["p"].clone().double(), bool(d["warm"])


class OptimalSchedule(GridSampledSchedule):
    """The literal optimal-loss schedule, variant `paper` (method.md section 4.1; every constant an argument).

    weight  w(sigma) = a min(1/J*(sigma), w_max) [+ bump], J* interpolated log-linearly with a floor,
            w_max = 1/J*(sigma*), a such that E_base[w] = 1;
    sampler after the warm-up, every `refresh` optimiser steps
            p = (1 - mix) normalise(max(w_b (EMA_b - J*_b), 0) + floor mean) + mix base.
    """

    variant = "paper"

    def __init__(self, sigmas, base: LogNormal, jstar, sigma_data: float = 0.5, decay: float = 0.99,
                 refresh: int = 64, mix: float = 0.2, floor: float = 0.01, warmup_count: int = 16,
                 warmup_mass: float = 0.01, jstar_floor: float = 1e-6, sigma_star_fraction: float = 1e-3,
                 bump: bool = False, bump_height: float = 1.0, importance_correction: bool = False,
                 base_schedule: str = "edm"):
        super().__init__(sigmas, base, base_schedule, sigma_data, decay, refresh, mix, warmup_count, warmup_mass,
                         importance_correction)
        self.floor = floor
        self.jstar_floor = jstar_floor * jstar.data_variance
        self.jstar = np.maximum(jstar.values, self.jstar_floor)  # J* at the grid points, floored
        self._ln_grid = np.log(self.sigmas)
        self._ln_jstar = np.log(self.jstar)
        below = np.nonzero(jstar.values < sigma_star_fraction * jstar.values[-1])[0]
        self.sigma_star = float(self.sigmas[below[-1]]) if below.size else float(self.sigmas[0])
        self.w_max = 1.0 / float(self._interp_jstar(np.array([self.sigma_star]))[0])
        self.bump, self.bump_height = bump, bump_height
        # a: the capped weight a min(1/J*, w_max) has mean 1 under the base density (learning rates carry over)
        self.a = 1.0 / clipped_expectation(base, lambda s: np.minimum(1.0 / self._interp_jstar(s), self.w_max))
        self.w_grid = torch.tensor(self._weight_np(self.sigmas))

    def _interp_jstar(self, sigma: np.ndarray) -> np.ndarray:
        return np.exp(np.interp(np.log(sigma), self._ln_grid, self._ln_jstar))

    def _weight_np(self, sigma: np.ndarray) -> np.ndarray:
        w = self.a * np.minimum(1.0 / self._interp_jstar(sigma), self.w_max)
        if self.bump:  # ICLR version: Gaussian bump in ln sigma centred one e-fold below sigma*
            z = (np.log(sigma) - (math.log(self.sigma_star) - 1.0)) / 0.5
            w = w + np.where(sigma < self.sigma_star, self.bump_height * np.exp(-0.5 * z * z), 0.0)
        return w

    def weight(self, sigma):
        w = torch.as_tensor(self._weight_np(sigma.detach().double().cpu().numpy()), dtype=sigma.dtype)
        return w.to(sigma.device)

    def grid_weight(self, logvar_grid=None):
        return self.w_grid.numpy()

    def _moved_p(self) -> torch.Tensor:
        t = self.tracker
        seen = ~torch.isnan(t.ema)
        gap = torch.zeros_like(self.base)
        gap[seen] = (self.w_grid[seen] * (t.ema[seen] - torch.tensor(self.jstar)[seen])).clamp_min(0)
        mean = gap[seen].mean() if seen.any() else torch.tensor(0.0, dtype=torch.float64)
        if mean <= 0:
            return self.base.clone()
        g = gap + self.floor * mean
        unseen_share = self.base[~seen].sum()  # a bin without data keeps the base schedule's share
        u = torch.where(seen, g / g[seen].sum() * (1 - unseen_share), self.base)
        return (1 - self.mix) * u + self.mix * self.base

    def describe(self):
        return {**super().describe(), "variant": self.variant, "a": self.a, "w_max": self.w_max,
                "sigma_star": self.sigma_star, "jstar_floor": self.jstar_floor}


class TiltedSchedule(GridSampledSchedule):
    """The variants of method.md section 4.3: a weight from J*_train and J*_up, and a tilt of the base density,

        p_b = (1 - m) base_b clip(T_b / T_bar, c_lo, c_hi)^gamma / Z + m base_b,   T_bar = sum_b base_b T_b,

    with Z normalising the first term. Bins the tracker has not seen keep T_b / T_bar = 1.

    | variant      | x0 weight w(sigma)                                   | tilt T_b                         |
    | `floor`      | a / max(J*_train, J*_up)                             | w_b (EMA_b - J*_b)_+             |
    | `base-below` | a / J*_train for sigma >= sigma_j, below it          | as `floor`                       |
    |              | a lambda_base(sigma) / (J*(sigma_j) lambda_base(sigma_j)); sigma_j = smallest grid sigma with   |
    |              | J* >= tau J*_max                                     |                                  |
    | `edm2-tilt`  | learned: loss lambda_base m / exp(u) + u (EDM2's)    | (EMA_b - J*_b)_+ / EMA_b         |

    a makes E_base[w] = 1; J* is interpolated log-linearly between grid points (floored at jstar_floor x the
    data variance). lambda_base is the base schedule's x0 weight (`base_weight`).
    """

    def __init__(self, sigmas, base: LogNormal, jstar, variant: str, base_schedule: str = "edm",
                 sigma_data: float = 0.5, decay: float = 0.99, refresh: int = 64, mix: float = 0.2,
                 gamma: float = 1.0, clip_lo: float = 0.25, clip_hi: float = 4.0, tau: float = 0.25,
                 warmup_count: int = 16, warmup_mass: float = 0.01, jstar_floor: float = 1e-6,
                 importance_correction: bool = False):
        super().__init__(sigmas, base, base_schedule, sigma_data, decay, refresh, mix, warmup_count, warmup_mass,
                         importance_correction)
        if variant not in TILTED_VARIANTS:
            raise ValueError(f"unknown optimal-schedule variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.gamma, self.clip_lo, self.clip_hi, self.tau = gamma, clip_lo, clip_hi, tau
        self.uses_logvar = variant == "edm2-tilt"
        self.jstar_floor = jstar_floor * jstar.data_variance
        self.jstar = np.maximum(jstar.values, self.jstar_floor)  # J*_train at the grid points, floored
        self._ln_grid = np.log(self.sigmas)
        self.sigma_j = None
        self.a = 1.0
        if variant == "floor":
            if jstar.upper is None:
                raise ValueError("the floor variant needs J*_up in its J* table (resolve_jstar(upper=True))")
            self._ln_level = np.log(np.maximum(self.jstar, jstar.upper.values))  # max(J*_train, J*_up)
        elif variant == "base-below":
            j = int(np.nonzero(jstar.values >= tau * jstar.values.max())[0][0])
            self.sigma_j = float(self.sigmas[j])
            self._j = j
            self._ln_level = np.log(self.jstar)
        if variant != "edm2-tilt":
            self.a = 1.0 / clipped_expectation(base, self._unscaled_weight)
        self.w_grid = torch.tensor(self._unscaled_weight(self.sigmas) * self.a) if variant != "edm2-tilt" else None

    def _unscaled_weight(self, sigma: np.ndarray) -> np.ndarray:
        """w / a: 1 / (the interpolated level), and the base schedule's shape below sigma_j for `base-below`."""
        sigma = np.asarray(sigma, dtype=np.float64)
        inv = np.exp(-np.interp(np.log(sigma), self._ln_grid, self._ln_level))
        if self.variant != "base-below":
            return inv
        lam = self.base_weight(sigma)
        below = lam / (self.jstar[self._j] * float(self.base_weight(np.array([self.sigma_j]))[0]))
        return np.where(sigma < self.sigma_j, below, inv)

    def weight(self, sigma):
        w = torch.as_tensor(self.a * self._unscaled_weight(sigma.detach().double().cpu().numpy()), dtype=sigma.dtype)
        return w.to(sigma.device)

    def loss(self, err, sigma, logvar=None):
        if not self.uses_logvar:
            return super().loss(err, sigma, logvar)
        if logvar is None:
            raise ValueError("the edm2-tilt variant needs a network with a log-variance head (an EDM2 preset)")
        lam = torch.as_tensor(self.base_weight(sigma.detach().double().cpu().numpy()), dtype=err.dtype)
        w = lam.to(err.device)
        if self.importance_correction:
            b = bin_index(sigma.detach().cpu(), self.sigmas)
            w = w * (self.base[b] / self.p[b]).to(w)
        return w / logvar.exp() * err + logvar

    def grid_weight(self, logvar_grid=None):
        if self.uses_logvar:
            return learned_weight(self.base_weight(self.sigmas), logvar_grid)
        return self.w_grid.numpy()

    def tilt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """T_b (zero where unseen) and which bins the tracker has seen."""
        ema = self.tracker.ema
        seen = ~torch.isnan(ema)
        excess = torch.zeros_like(self.base)
        excess[seen] = (ema[seen] - torch.tensor(self.jstar)[seen]).clamp_min(0)
        if self.variant == "edm2-tilt":
            t = torch.zeros_like(self.base)
            t[seen] = excess[seen] / ema[seen].clamp_min(1e-30)  # the reducible fraction of the loss
            return t, seen
        return self.w_grid * excess, seen

    def _moved_p(self) -> torch.Tensor:
        t, seen = self.tilt()
        mass = self.base[seen].sum()
        t_bar = (self.base[seen] * t[seen]).sum() / mass if mass > 0 else torch.tensor(0.0, dtype=torch.float64)
        if t_bar <= 0:
            return self.base.clone()
        ratio = torch.ones_like(self.base)
        ratio[seen] = (t[seen] / t_bar).clamp(self.clip_lo, self.clip_hi)
        tilted = self.base * ratio ** self.gamma
        return (1 - self.mix) * tilted / tilted.sum() + self.mix * self.base

    def describe(self):
        d = {**super().describe(), "variant": self.variant, "gamma": self.gamma, "clip": [self.clip_lo, self.clip_hi],
             "mix": self.mix, "jstar_floor": self.jstar_floor}
        if self.variant != "edm2-tilt":
            d["a"] = self.a
        if self.sigma_j is not None:
            d.update({"tau": self.tau, "sigma_j": self.sigma_j})
        return d


def learned_weight(lam: np.ndarray, logvar_grid: np.ndarray | None) -> np.ndarray:
    """lambda / exp(u): the x0 weight of EDM2's loss with a learned log-variance u (lambda alone if u is unknown)."""
    if logvar_grid is None:
        return lam
    return lam / np.exp(np.asarray(logvar_grid, dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# Loss shares (method.md section 4.4)

def starved_bands(sigmas: np.ndarray, share: np.ndarray, base_share: np.ndarray, ratio: float = 0.5) -> list[str]:
    """Bands whose share is below `ratio` x the base schedule's share, as 'sigma 2-10: 0.012 (base 0.083)'."""
    out = []
    for (lo, hi), own, base in zip(BANDS, band_shares(sigmas, share), band_shares(sigmas, base_share)):
        if base > 0 and own < ratio * base:
            out.append(f"{band_name(lo, hi)}: {own:.3g} (base {base:.3g})")
    return out


# --------------------------------------------------------------------------------------------------
# Construction

VARIANTS = OPT_VARIANTS
TILTED_VARIANTS = VARIANTS[1:]


def base_x0_weight(base_schedule: str, sigma_data: float = 0.5) -> Callable[[np.ndarray], np.ndarray]:
    """lambda_base(sigma): the x0 weight of the base schedule's loss (EDM's lambda for edm and edm2, the
    unit-weight velocity loss's (1 + sigma)^2 / sigma^2 for fm), on float64 arrays."""
    target = "fm" if base_schedule == "fm" else "F"
    return lambda s: target_factor(target, np.asarray(s, dtype=np.float64), sigma_data)


@dataclass(frozen=True)
class OptimalParams:
    """The optimal schedule's constants (method.md 4.1 and 4.3), one place for what `TrainConfig` calls opt_*.
    gamma, clip_lo, clip_hi and tau of None take the variant's defaults (config.VARIANT_DEFAULTS)."""

    variant: str = DEFAULT_VARIANT
    refresh: int = 64  # optimiser steps between recomputations of p
    mix: float = 0.2  # m: the base density's share of p
    warmup_count: int = 16
    warmup_mass: float = 0.01
    jstar_floor: float = 1e-6  # x the data variance
    importance_correction: bool = False
    floor: float = 0.01  # paper only: floor of the weighted gaps, x their mean
    sigma_star_fraction: float = 1e-3  # paper only: sigma* threshold, w_max = 1 / J*(sigma*)
    bump: bool = False  # paper only
    bump_height: float = 1.0
    gamma: float | None = None  # tilted variants
    clip_lo: float | None = None
    clip_hi: float | None = None
    tau: float | None = None  # base-below

    PAPER_ONLY = ("floor", "sigma_star_fraction", "bump", "bump_height")
    TILT_ONLY = ("gamma", "clip_lo", "clip_hi", "tau")

    @classmethod
    def from_config(cls, r) -> "OptimalParams":
        """From a resolved TrainConfig's opt_* options."""
        return cls(variant=r.opt_variant or DEFAULT_VARIANT, refresh=r.opt_refresh, mix=r.opt_mix,
                   warmup_count=r.opt_warmup_count, warmup_mass=r.opt_warmup_mass, jstar_floor=r.opt_jstar_floor,
                   importance_correction=r.importance_correction, floor=r.opt_floor,
                   sigma_star_fraction=r.opt_sigma_star, bump=r.opt_bump, bump_height=r.opt_bump_height,
                   gamma=r.opt_gamma, clip_lo=r.opt_clip_lo, clip_hi=r.opt_clip_hi, tau=r.opt_tau)

    def kwargs(self) -> dict:
        """Constructor keywords of the variant's class: what it uses, defaults filled in."""
        unused = ("variant",) + (self.TILT_ONLY if self.variant == "paper" else self.PAPER_ONLY)
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in unused and v is not None}
        return d if self.variant == "paper" else {**VARIANT_DEFAULTS[self.variant], **d}


def make_schedule(name: str, sigmas: np.ndarray, preset_density: LogNormal, jstar=None,
                  base_schedule: str | None = None, sigma_data: float = 0.5, decay: float = 0.99,
                  params: OptimalParams | None = None) -> Schedule:
    """Build a schedule. `preset_density` is the preset's (or the user's) P_mean/P_std log-normal; `decay` the gap
    tracker's per-step EMA decay; `params` the optimal schedule's constants (default OptimalParams())."""
    if name == "edm":
        return Schedule(sigmas, preset_density, sigma_data, decay)
    if name == "edm2":
        return EDM2Schedule(sigmas, preset_density, sigma_data, decay)
    if name == "fm":
        return FMSchedule(sigmas, FM_DENSITY, sigma_data, decay)
    if name in ("vp", "ve"):
        return EpsSchedule(name, sigmas, sigma_data, decay)
    if name == "optimal":
        if jstar is None:
            raise ValueError("the optimal schedule needs a J* table")
        params = params or OptimalParams()
        base_schedule = base_schedule or "edm"
        base = FM_DENSITY if base_schedule == "fm" else preset_density
        if params.variant == "paper":
            return OptimalSchedule(sigmas, base, jstar, sigma_data, decay, base_schedule=base_schedule,
                                   **params.kwargs())
        if params.variant not in TILTED_VARIANTS:
            raise ValueError(f"unknown optimal-schedule variant {params.variant!r}; expected one of "
                             f"{', '.join(VARIANTS)}")
        return TiltedSchedule(sigmas, base, jstar, params.variant, base_schedule, sigma_data, decay, **params.kwargs())
    raise ValueError(f"unknown schedule {name!r}")
