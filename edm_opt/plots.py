"""Figures shared by the CLI, training artifacts, diagnose and the reports (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .diffusion import sigma_key
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
    if ref.upper is not None:  # what a model that generalises can reach (method.md 4.2)
        up = ref.upper
        ax.loglog(up.sigmas, np.maximum(up.lin, floor), color="tab:purple", ls=":", lw=1, label="J*_lin")
        ax.loglog(up.sigmas, np.maximum(up.loo, floor), color="tab:brown", ls=":", lw=1, label="J*_LOO")
        ax.loglog(up.sigmas, np.maximum(up.values, floor), color="k", lw=1.5, alpha=0.6, label="J*_up = min")
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


def plot_gap(history: dict, path: str | os.PathLike, title: str | None = None, max_curves: int = 6) -> Path:
    """A run's held-out x0 loss against J* (latest evaluation) and its gap over training (per_sigma.json)."""
    sigmas = np.asarray(history["sigmas"])
    jstar = np.asarray(history["jstar"])
    nimg = history["nimg"]
    loss = np.asarray(history["loss_x0"])
    stderr = np.asarray(history["stderr"])
    fig, (ax, ax2) = figure(1, 2, figsize=(11, 4.2))
    floor = 1e-7
    ax.loglog(sigmas, np.maximum(jstar, floor), "k--", lw=1.2, label="J* (optimal)")
    ax.errorbar(sigmas, np.maximum(loss[-1], floor), yerr=2 * stderr[-1], marker=".", capsize=2,
                label=f"held-out, EMA ({nimg[-1]:,} img)")
    if history.get("loss_x0_raw"):
        ax.loglog(sigmas, np.maximum(np.asarray(history["loss_x0_raw"][-1]), floor), ":", label="held-out, raw")
    ax.set(xlabel="sigma (VE)", ylabel="x0 MSE per dimension", title=title or "loss against the optimum")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    import matplotlib

    picks = np.unique(np.linspace(0, len(nimg) - 1, min(max_curves, len(nimg))).round().astype(int))
    cmap = matplotlib.colormaps["viridis"]
    for k, i in enumerate(picks):
        ax2.loglog(sigmas, np.maximum(loss[i] - jstar, floor), color=cmap(k / max(len(picks) - 1, 1)),
                   label=f"{nimg[i]:,} img")
    ax2.set(xlabel="sigma (VE)", ylabel="gap J_sigma(theta) - J*_sigma", title="gap over training")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    return save_figure(fig, path)


def plot_gap_curve(sigmas, jstar, loss, stderr, nimg: int, path: str | os.PathLike) -> Path:
    """One status's held-out gap per sigma on fixed axes (so the MLflow image slider shows it move)."""
    fig, ax = figure(figsize=(6, 3.6))
    gap = np.asarray(loss) - np.asarray(jstar)
    ax.errorbar(sigmas, np.maximum(gap, 1e-7), yerr=2 * np.asarray(stderr), marker=".", capsize=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="sigma (VE)", ylabel="gap J_sigma(theta) - J*_sigma", ylim=(1e-6, 2.0),
           title=f"held-out gap at {nimg:,} images")
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path, dpi=80)


def save_image_grid(images, path: str | os.PathLike, columns: int | None = None) -> Path:
    """uint8 N x C x H x W images (C = 1 or 3) tiled into one PNG, written atomically."""
    from PIL import Image

    x = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
    n, c, h, w = x.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    scale = max(1, 64 // h)  # small images: scale up with nearest neighbour so the grid is readable
    x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w, gap = h * scale, w * scale, 2
    canvas = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, c), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = gap + r * (h + gap), gap + col * (w + gap)
        canvas[top:top + h, left:left + w] = x[i].transpose(1, 2, 0)
    im = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    path = Path(path)
    with atomic_path(path) as tmp:
        im.save(tmp, format="png")
    return path


def plot_diagnosis(r: dict, path: str | os.PathLike) -> Path:
    """`edm-opt diagnose`: held-out loss (train, and test if any) against J*, and the gap, per sigma."""
    s = np.asarray(r["sigmas"])
    loss, se, jstar = np.asarray(r["loss_x0"]), np.asarray(r["stderr"]), np.asarray(r["jstar"])
    fig, (ax, ax2) = figure(1, 2, figsize=(11, 4.2))
    floor = 1e-7
    ax.loglog(s, np.maximum(jstar, floor), "k--", lw=1.2, label="J* (optimal, training set)")
    ax.errorbar(s, np.maximum(loss, floor), yerr=2 * se, marker=".", capsize=2, label="held-out training images")
    if "test_loss_x0" in r:
        ax.loglog(s, np.maximum(np.asarray(r["test_loss_x0"]), floor), marker="x", ls=":", label="test images")
    ax.axvline(r["sigma_star"], color="grey", ls=":", lw=1)
    ax.set(xlabel="sigma (VE)", ylabel="x0 MSE per dimension", title=r["model"][:60])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax2.semilogx(s, loss - jstar, marker=".", label="gap J_sigma - J*_sigma")
    ax2.fill_between(s, loss - jstar - 2 * se, loss - jstar + 2 * se, alpha=0.2, lw=0)
    ax2.axhline(0, color="k", lw=0.8)
    ax2.set(xlabel="sigma (VE)", ylabel="gap (x0 MSE per dimension)",
            title=f"largest gap at sigma = {r['largest_gap']['sigma']:.3g}")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def plot_gap_fid(points, corr, path: str | os.PathLike) -> Path:
    """Per-sigma correlation of gap and FID across snapshots, and the scatter at the strongest sigma."""
    fig, (ax, ax2) = figure(1, 2, figsize=(11, 4.2))
    s = [c.sigma for c in corr]
    ax.semilogx(s, [c.pearson for c in corr], marker=".", label="Pearson")
    ax.fill_between(s, [c.pearson_lo for c in corr], [c.pearson_hi for c in corr], alpha=0.2,
                    label="95% CI, runs resampled")
    ax.semilogx(s, [c.spearman for c in corr], marker="x", ls=":", label="Spearman")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="sigma (VE)", ylabel="correlation of gap_sigma with FID", ylim=(-1.05, 1.05),
           title=f"{len(points)} snapshots")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    finite = [c for c in corr if np.isfinite(c.pearson)]
    if finite:
        best = max(finite, key=lambda c: abs(c.pearson))
        k = sigma_key(best.sigma)
        ax2.scatter([p.gap[k] for p in points if k in p.gap], [p.fid for p in points if k in p.gap], s=12)
        ax2.set(xlabel=f"gap at sigma = {k}", ylabel="FID", title=f"strongest: Pearson {best.pearson:.3f}")
        ax2.grid(True, alpha=0.3)
    return save_figure(fig, path)
