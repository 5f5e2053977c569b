"""Exponential moving averages of the weights: EDM2's power-function profile and EDM's half-life EMA.

Profiles are strings (config is plain data):
- `power:0.10`: EDM2 (Karras et al. 2024, section 3.1) power-function EMA with relative standard
  deviation sigma_rel; theta_hat(t) = beta(t) theta_hat(t-1) + (1 - beta(t)) theta(t),
  beta(t) = (1 - 1/t)^(gamma + 1), t the optimiser step (t = 1: the average is the weights), where
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
- `halflife:500000` (images, also `halflife:0.5Mi`): EDM's traditional EMA, beta = 0.5^(batch / h) with
  the half-life ramped up as h = min(h, 0.05 nimg) early in training.

The product of the power EMA's betas makes its average at step t an exact, closed-form weighting of the
training weights theta_1..theta_t (`power_profile`), the basis of post-hoc EMA (`edm_opt.phema`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

EMA_RAMPUP = 0.05  # EDM: the half-life never exceeds 5% of the images seen so far


def power_gamma(sigma_rel: float) -> float:
    """gamma of the power-function EMA with relative standard deviation sigma_rel (EDM2 eq. for sigma_rel)."""
    if not 0 < sigma_rel < (1 / 12) ** 0.5:
        raise ValueError(f"sigma_rel must be in (0, {(1 / 12) ** 0.5:.4f}) (gamma > 0), got {sigma_rel}")
    s2 = sigma_rel ** 2
    # (gamma+1) = s2 (gamma+2)^2 (gamma+3)  <=>  s2 g^3 + 7 s2 g^2 + (16 s2 - 1) g + (12 s2 - 1) = 0
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_profile(t: int, gamma: float, T: int, start: int = 0) -> np.ndarray:
    """Weight of each step's weights theta_tau (tau = start+1..T) in the power EMA at step t, zero after t:
    w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1), the product (1 - beta_tau) prod_{k > tau} beta_k of
    EMA.update's betas beta_k = (1 - 1/k)^(gamma+1) (telescoping; sums to 1 over tau = 1..t)."""
    tau = np.arange(start + 1, T + 1, dtype=np.float64)
    w = (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1)
    w[tau > t] = 0.0
    return w


def parse_profiles(spec: str) -> list[tuple[str, float]]:
    """'power:0.10,halflife:0.5Mi' -> [('power', 0.1), ('halflife', 524288.0)]."""
    from .config import ConfigError, parse_nimg  # config imports this module: a top-level import would cycle

    out = []
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        kind, _, value = item.partition(":")
        try:
            if kind == "power":
                power_gamma(float(value))
                out.append((kind, float(value)))
            elif kind == "halflife":
                out.append((kind, float(parse_nimg(value))))
            else:
                raise ValueError(f"unknown kind {kind!r}")
        except ValueError as e:
            raise ConfigError(f"ema profile {item!r}: {e}; use e.g. power:0.10 or halflife:500000") from None
    if not out:
        raise ConfigError("ema: at least one profile is needed (e.g. power:0.10)")
    return out


class EMA:
    """One averaged copy of a network, updated after every optimiser step."""

    def __init__(self, net: torch.nn.Module, kind: str, value: float):
        self.kind, self.value = kind, value
        self.gamma = power_gamma(value) if kind == "power" else None
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def beta(self, step: int, nimg: int, batch: int) -> float:
        """Decay for the update after optimiser step `step` (from 1), with `nimg` images seen after it."""
        if self.kind == "power":
            return (1 - 1 / step) ** (self.gamma + 1)
        halflife = min(self.value, nimg * EMA_RAMPUP)
        return 0.5 ** (batch / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int, nimg: int, batch: int) -> None:
        beta = self.beta(step, nimg, batch)
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"name": self.name, "net": self.net.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        if d["name"] != self.name:
            raise ValueError(f"EMA profile {d['name']} in the checkpoint, {self.name} configured")
        self.net.load_state_dict(d["net"])
