"""Writes paper_schedule_golden.json: the `paper` optimal schedule's constants, weights, p and draws on a fixed
tracker state, as computed by the implementation before the variants existed (commit 8854907). The test
`test_paper_variant_is_unchanged` compares today's `--opt-variant paper` with it, bit for bit.

    .venv/bin/python tests/data/make_paper_schedule_golden.py   # only to regenerate, at that commit
"""

import json
from pathlib import Path

import numpy as np
import torch

from edm_opt.diffusion import EDM_DENSITY, FM_DENSITY, bin_index, sigma_grid
from edm_opt.optimal_loss import OptimalLossTable
from edm_opt.schedule import make_schedule

GRID = sigma_grid()


def golden_state():
    """A digits-like J* and tracker losses = J* + a gap profile peaking at sigma ~ 1, from a fixed generator."""
    var = 0.3
    values = var * GRID ** 4 / (GRID ** 4 + 1.0)
    values[GRID < 0.1] = 0.0
    jstar = OptimalLossTable(GRID, values, np.zeros_like(values), {"data_variance": var})
    gap = 0.02 * np.exp(-0.5 * (np.log(GRID) / 1.5) ** 2) + 1e-4
    return jstar, gap


def run(base_schedule):
    jstar, gap = golden_state()
    density = FM_DENSITY if base_schedule == "fm" else EDM_DENSITY
    try:  # today's API; before the variants, make_schedule had no `params` and `optimal` was `paper`
        from edm_opt.schedule import OptimalParams

        kwargs = {"params": OptimalParams(variant="paper")}
    except ImportError:
        kwargs = {}
    s = make_schedule("optimal", GRID, EDM_DENSITY, jstar, base_schedule, **kwargs)
    g = torch.Generator().manual_seed(0)
    target = torch.tensor(np.maximum(jstar.values, 0) + gap)
    for step in range(1, 257):
        sigma = s.sample(64, g)
        s.tracker.observe(sigma, target[bin_index(sigma, GRID)].float())
        s.after_step(step, None)
    probe = torch.tensor(np.exp(np.linspace(np.log(0.002), np.log(80), 101)), dtype=torch.float32)
    return {"a": s.a, "w_max": s.w_max, "sigma_star": s.sigma_star, "p": s.p.tolist(),
            "weight": s.weight(probe).tolist(), "draws": s.sample(16, torch.Generator().manual_seed(1)).tolist(),
            "ema": s.tracker.ema.tolist()}


if __name__ == "__main__":
    out = {b: run(b) for b in ("edm2", "fm")}
    path = Path(__file__).with_name("paper_schedule_golden.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", path)
