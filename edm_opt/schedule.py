"""Training objectives: a sigma sampler and an x0-loss weight each (method.md sections 1, 4 and 6).

Every schedule writes its loss on the per-sample x0 error m_i = ||D(x_i; sigma_i) - x0_i||^2 / D (per
dimension, VE coordinates):

- `edm`:  ln sigma ~ N(P_mean, P_std^2), loss lambda(sigma) m with lambda = 1/c_out^2 (EDM's F loss);
- `edm2`: the same density, loss lambda(sigma) m / exp(u(sigma)) + u(sigma) with the network's learned
  log-variance u (EDM2's uncertainty weighting);
- `fm`:   t logit-normal(0, 1), i.e. ln sigma ~ N(0, 1), loss (1+sigma)^2/sigma^2 m (unit-weight velocity loss);
- `optimal`: the paper's schedule (method.md section 4): weight w = a min(1/J*(sigma), w_max), sigma drawn
  from p over the grid's bins, p proportional to the weighted gap w (J_sigma(theta) - J*_sigma) tracked
  per bin, mixed with the base density, no importance correction by default.

All schedules feed a `BinLossTracker`, whose per-bin EMAs are logged as `loss_x0_batch/sigma_<s>`.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .diffusion import FM_DENSITY, SIGMA_MAX, SIGMA_MIN, LogNormal, bin_edges, bin_index, edm_weight, sigma_key

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
        return {f"loss_x0_batch/sigma_{sigma_key(s)}": float(v)
                for s, v in zip(self.sigmas, self.ema) if not math.isnan(v)}

    def state_dict(self) -> dict:
        return {"ema": self.ema.clone(), "count": self.count.clone()}

    def load_state_dict(self, d: dict) -> None:
        self.ema, self.count = d["ema"].clone().double(), d["count"].clone().double()
        self._sums, self._counts = [], []


class Schedule:
    """A sigma density and an x0-loss weight. Subclasses override what differs."""

    name = "edm"
    uses_logvar = False

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

    def metrics(self) -> dict[str, float]:
        return {}

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


class FMSchedule(Schedule):
    """Flow matching: ln sigma = logit(t) ~ N(0, 1), unit-weight velocity loss = (1+sigma)^2/sigma^2 m."""

    name = "fm"

    def weight(self, sigma):
        return (1 + sigma) ** 2 / sigma ** 2


def clipped_expectation(density: LogNormal, fn: Callable[[np.ndarray], np.ndarray], points: int = 4001) -> float:
    """E[fn(sigma)] for ln sigma ~ N(m, s^2) clipped to [SIGMA_MIN, SIGMA_MAX] (trapezoid in ln sigma)."""
    from scipy.special import ndtr

    ln = np.linspace(math.log(SIGMA_MIN), math.log(SIGMA_MAX), points)
    z = (ln - density.p_mean) / density.p_std
    pdf = np.exp(-0.5 * z * z) / (density.p_std * math.sqrt(2 * math.pi))
    inner = np.trapezoid(pdf * fn(np.exp(ln)), ln)
    return float(inner + ndtr(z[0]) * fn(np.array([SIGMA_MIN]))[0] + (1 - ndtr(z[-1])) * fn(np.array([SIGMA_MAX]))[0])


class OptimalSchedule(Schedule):
    """The optimal-loss schedule of method.md section 4 (every constant is a constructor argument).

    weight  w(sigma) = a min(1/J*(sigma), w_max) [+ bump], J* interpolated log-linearly with a floor,
            w_max = 1/J*(sigma*), a such that E_base[w] = 1;
    sampler p over the grid's bins, sigma uniform in ln sigma inside a bin; every `refresh` optimiser steps
            p = (1 - mix) normalise(max(w_b (EMA_b - J*_b), 0) + floor mean) + mix base;
            p = base until every bin with base mass > warmup_mass has warmup_count samples.
    """

    name = "optimal"

    def __init__(self, sigmas, base: LogNormal, jstar, sigma_data: float = 0.5, decay: float = 0.99,
                 refresh: int = 64, mix: float = 0.2, floor: float = 0.01, warmup_count: int = 16,
                 warmup_mass: float = 0.01, jstar_floor: float = 1e-6, sigma_star_fraction: float = 1e-3,
                 bump: bool = False, bump_height: float = 1.0, importance_correction: bool = False):
        super().__init__(sigmas, base, sigma_data, decay)
        self.refresh, self.mix, self.floor = refresh, mix, floor
        self.warmup_count, self.importance_correction = warmup_count, importance_correction
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
        edges = bin_edges(self.sigmas)
        self._lo = torch.tensor(edges[:-1])
        self._width = torch.tensor(np.diff(edges))
        mass = base.bin_mass(self.sigmas)
        self.base = torch.tensor(mass / mass.sum())
        self._needs_warmup = self.base > warmup_mass
        self.p = self.base.clone()
        self.warm = False  # True once the warm-up condition held at a refresh
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
        """p from the tracker's EMAs (method.md section 4): warm-up, weighted gap, floor, mixing."""
        t = self.tracker
        if not self.warm:
            self.warm = bool(torch.all(t.count[self._needs_warmup] >= self.warmup_count))
            if not self.warm:
                return self.base.clone()
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

    def metrics(self):
        return {f"sched/p_sigma_{sigma_key(s)}": float(v) for s, v in zip(self.sigmas, self.p)}

    def describe(self):
        return {**super().describe(), "a": self.a, "w_max": self.w_max, "sigma_star": self.sigma_star,
                "jstar_floor": self.jstar_floor}

    def state_dict(self):
        return {**super().state_dict(), "p": self.p.clone(), "warm": self.warm}

    def load_state_dict(self, d):
        super().load_state_dict(d)
        self.p, self.warm = d["p"].clone().double(), bool(d["warm"])


def make_schedule(name: str, sigmas: np.ndarray, preset_density: LogNormal, jstar=None,
                  base_schedule: str | None = None, sigma_data: float = 0.5, decay: float = 0.99,
                  **optimal_kwargs) -> Schedule:
    """Build a schedule. `preset_density` is the preset's (or the user's) P_mean/P_std log-normal;
    `optimal_kwargs` (refresh, mix, floor, ...) are the optimal schedule's constants, unused by the others."""
    if name == "edm":
        return Schedule(sigmas, preset_density, sigma_data, decay)
    if name == "edm2":
        return EDM2Schedule(sigmas, preset_density, sigma_data, decay)
    if name == "fm":
        return FMSchedule(sigmas, FM_DENSITY, sigma_data, decay)
    if name == "optimal":
        if jstar is None:
            raise ValueError("the optimal schedule needs a J* table")
        base = FM_DENSITY if base_schedule == "fm" else preset_density
        return OptimalSchedule(sigmas, base, jstar, sigma_data, decay, **optimal_kwargs)
    raise ValueError(f"unknown schedule {name!r}")
