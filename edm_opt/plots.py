"""Figures shared by the CLI, training artifacts, diagnose and the reports (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .fileio import atomic_path


def figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save atomically (format from the suffix) and close the figure."""
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight",
                    metadata={"Software": None} if path.suffix == ".png" else None)
    plt.close(fig)
    return path


def plot_jstar(tables: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """J*_sigma per dimension of one or more tables (log-log, +-2 standard errors), sigma* and the data variance.

    With several tables, a second panel shows each one relative to the first (the reference).
    """
    items = list(tables.items())
    fig, axes = figure(1, 2 if len(items) > 1 else 1, figsize=(11 if len(items) > 1 else 6, 4.2), squeeze=False)
    ax = axes[0, 0]
    ref_label, ref = items[0]
    floor = 1e-6 * ref.meta.get("data_variance", 1.0)
    for label, t in items:
        v = np.maximum(t.values, floor)
        line, = ax.loglog(t.sigmas, v, marker=".", label=label)
        ax.fill_between(t.sigmas, np.maximum(t.values - 2 * t.stderr, floor), t.values + 2 * t.stderr,
                        color=line.get_color(), alpha=0.2, lw=0)
    if "data_variance" in ref.meta:
        ax.axhline(ref.data_variance, color="grey", ls=":", lw=1, label="data variance")
    ax.axvline(ref.sigma_star, color="grey", ls="--", lw=1, label=f"sigma* = {ref.sigma_star:.3g}")
    ax.set(xlabel="sigma (VE)", ylabel="J*_sigma (x0 MSE per dimension)", title=title or "optimal loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if len(items) > 1:
        ax2 = axes[0, 1]
        keep = ref.values > 1e-3 * ref.values[-1]  # relative errors are meaningless where J* ~ 0
        for label, t in items[1:]:
            ax2.semilogx(t.sigmas[keep], t.values[keep] / ref.values[keep] - 1, marker=".", label=label)
        ax2.axhline(0, color="grey", lw=1)
        ax2.set(xlabel="sigma (VE)", ylabel=f"relative to {ref_label}", title=f"bias against {ref_label}")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    return save_figure(fig, path)
