"""Post-hoc EMA (EDM2, Karras et al. 2024, section 3.2): the weights of a power-function EMA of any relative
standard deviation, reconstructed after training from the snapshots of the tracked power profiles.

Each stored average is an exact weighting of the training weights theta_1..theta_T (`ema.power_profile`), so a
target profile r (sigma_rel, at step t_r) is approximated by the least-squares combination of the stored ones,
    x = argmin_x || r - sum_i x_i p_i ||^2,   A x = b,  A_ij = <p_i, p_j>,  b_i = <p_i, r>,
and theta_r = sum_i x_i theta_hat_i. The relative residual ||r - sum x_i p_i|| / ||r|| says how well the stored
snapshots span the target: it falls as snapshots get denser and the stored sigma_rel bracket the target.
Steps are optimiser steps (images / batch), as in EMA.update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import EdmOptError
from .ema import power_gamma, power_profile
from .rundir import RunDir, load_snapshot, save_atomic

CHUNK = 1 << 16  # steps per block of the Gram sums (K x CHUNK float64 at a time)


class PhemaError(EdmOptError, ValueError):
    """No power-EMA snapshots to reconstruct from, or a target they cannot reach."""


@dataclass
class Stored:
    """One stored power-EMA average: optimiser step t, exponent gamma, its weights."""

    step: int
    gamma: float
    state: dict
    source: str


def solve_coefficients(sources: list[tuple[int, float]], target: tuple[int, float]) -> tuple[np.ndarray, float]:
    """x with sum_i x_i p_i closest to the target profile (least squares over steps 1..T), and the relative
    residual ||r - sum_i x_i p_i|| / ||r||. `sources` and `target` are (step, gamma) pairs."""
    T = max(t for t, _ in [*sources, target])
    K = len(sources)
    A, b, rr = np.zeros((K, K)), np.zeros(K), 0.0
    for lo in range(0, T, CHUNK):
        hi = min(lo + CHUNK, T)
        P = np.stack([power_profile(t, g, hi, lo) for t, g in sources])  # K x chunk
        r = power_profile(*target, hi, lo)
        A += P @ P.T
        b += P @ r
        rr += r @ r
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    residual = max(rr - 2 * x @ b + x @ A @ x, 0.0)
    return x, float(np.sqrt(residual / rr))


def stored_averages(run: RunDir, batch: int, upto: int) -> list[Stored]:
    """Every power-EMA average in the run's snapshots at or before image count `upto`."""
    out = []
    for nimg, path in run.snapshots():
        if nimg > upto:
            continue
        snap = load_snapshot(path)
        for name, state in {snap["ema"]: snap["net"], **snap.get("ema_profiles", {})}.items():
            kind, _, value = name.partition(":")
            if kind == "power":
                out.append(Stored(nimg // batch, power_gamma(float(value)), state, f"{path.name}[{name}]"))
    return out


def reconstruct(run_dir: str | Path, stds: list[float], at: int | None = None, echo=print) -> list[Path]:
    """`edm-opt phema`: for each sigma_rel in `stds`, the power EMA at image count `at` (default: the last
    snapshot's) as `phema/snapshot-<nimg>-power<std>.pt`, a normal snapshot for evaluate, sample and diagnose."""
    run = RunDir(run_dir)
    info = run.read_info()
    snaps = run.snapshots()
    if not snaps:
        raise PhemaError(f"{run.path}: no snapshots to reconstruct from")
    at = snaps[-1][0] if at is None else int(at)
    batch = int(info.config["batch"])
    stored = stored_averages(run, batch, at)
    if len(stored) < 2:
        raise PhemaError(f"{run.path}: post-hoc EMA needs at least two stored power-EMA averages at or before "
                         f"{at} images, found {len(stored)} (train with --ema power:0.05,power:0.10 and snapshots "
                         f"every few percent of the run)")
    template = load_snapshot(snaps[-1][1])
    out = []
    for std in stds:
        x, residual = solve_coefficients([(s.step, s.gamma) for s in stored], (at // batch, power_gamma(std)))
        state = {k: sum(xi * s.state[k].double() for xi, s in zip(x, stored)).to(v.dtype) if v.is_floating_point()
                 else v for k, v in stored[-1].state.items()}
        name = f"power:{std:g}"
        snap = {**template, "net": state, "ema": name, "nimg": at, "ema_profiles": {},
                "phema": {"sources": [s.source for s in stored], "coefficients": x.tolist(), "residual": residual}}
        path = run.path / "phema" / f"snapshot-{at:09d}-power{std:.3f}.pt"
        path.parent.mkdir(exist_ok=True)
        save_atomic(snap, path)
        echo(f"{name} at {at:,} images from {len(stored)} stored averages: relative profile residual "
             f"{residual:.2e}; wrote {path}")
        out.append(path)
    return out
