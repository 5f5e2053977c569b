"""The report's pages, one function per page (matplotlib on Agg through `edm_opt.plots.figure`).

Every function returns a figure of the A4-landscape page; `reports.build` numbers and saves them. Units:
sigma is the VE noise level, losses and gaps are per-dimension x0 MSE, f is training compute in FLOPs,
nimg counts training images seen. Each schedule keeps one colour on every page.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from edm_opt.diffusion import bin_edges, sigma_key
from edm_opt.optimal_loss import OptimalLossTable
from edm_opt.plots import figure
from edm_opt.contract import BANDS

from .analysis import Analysis, SeriesFit
from .data import ExperimentData, RunData
from .tables import fmt, fmt_int, fmt_r

PAGE_SIZE = (11.69, 8.27)  # A4 landscape, inches
HEATMAPS_PER_PAGE = 12  # 3 x 4 panels
SCHEDULE_COLOURS = {"edm": "tab:blue", "edm2": "tab:orange", "fm": "tab:green", "vp": "tab:gray", "ve": "tab:olive",
                    "optimal": "tab:red",
                    "optimal/edm": "tab:brown", "optimal/edm2": "tab:red", "optimal/fm": "tab:purple"}
OTHER_COLOURS = ("tab:pink", "tab:cyan", "navy", "darkgoldenrod", "teal", "maroon")
MAX_RUN_LEGEND = 12  # more runs than this: the legend names schedules only


# --------------------------------------------------------------------------------------------------
# Shared pieces


def schedule_colours(schedules: list[str]) -> dict[str, str]:
    """Fixed colours for the known schedules, the others in sorted order."""
    others = iter(OTHER_COLOURS * (1 + len(schedules) // len(OTHER_COLOURS)))
    return {s: SCHEDULE_COLOURS.get(s) or next(others) for s in sorted(schedules)}


def new_page(title: str, nrows: int = 1, ncols: int = 1, **kwargs):
    """A landscape page with a title and a grid of axes (always 2-D)."""
    fig, axes = figure(nrows, ncols, figsize=PAGE_SIZE, squeeze=False, **kwargs)
    fig.suptitle(title, fontsize=14, fontweight="bold")
    return fig, axes


def text_page(title: str, lines: list[str], fontsize: float = 8.0):
    """A page of monospace text (tables, summaries)."""
    fig, axes = new_page(title)
    axes[0, 0].set_axis_off()
    fig.text(0.04, 0.91, "\n".join(lines), family="monospace", fontsize=fontsize, va="top")
    return fig


def say_missing(ax, message: str) -> None:
    """Replace a panel by a sentence saying what is missing."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, textwrap.fill(message, 48), ha="center", va="center", transform=ax.transAxes,
            fontsize=10, color="dimgray")


def schedule_legend(ax, colours: dict[str, str], **kwargs) -> None:
    from matplotlib.lines import Line2D

    ax.legend([Line2D([], [], color=c) for c in colours.values()], list(colours), fontsize=7, **kwargs)


def log_axes(ax, y: bool = True) -> None:
    """Log x (and y) with grid; minor x labels dropped where they would crowd (a decade or more shown)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    if y:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    lo, hi = ax.get_xlim()
    if lo > 0 and hi / lo >= 10:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _runs_legend(ax, runs: list[RunData], colours: dict[str, str]) -> None:
    if len(runs) <= MAX_RUN_LEGEND:
        ax.legend(fontsize=6, loc="best")
    else:
        schedule_legend(ax, {s: colours[s] for s in sorted({r.schedule for r in runs})})


def jstar_table_of(exp: ExperimentData) -> OptimalLossTable | None:
    """The J* table: the jstar.json artifact, else the reference run's per-sigma J*."""
    t = exp.jstar_table
    if t and all(k in t for k in ("sigmas", "jstar", "stderr")):
        meta = {k: v for k, v in t.items() if k not in ("sigmas", "jstar", "stderr")}
        return OptimalLossTable(t["sigmas"], t["jstar"], t["stderr"], meta)
    ref = exp.reference
    return None if ref is None else OptimalLossTable(ref.sigmas, ref.jstar, ref.jstar_stderr, {})


# --------------------------------------------------------------------------------------------------
# J*


def draw_jstar_page(exp: ExperimentData):
    """J*_sigma with 2-standard-error bars, sigma* and the data variance; the table beside it."""
    fig, axes = new_page("Optimal loss J*_sigma of the training data", 1, 2, width_ratios=[1.6, 1])
    ax, ax_t = axes[0]
    t = jstar_table_of(exp)
    if t is None:
        say_missing(ax, "No J* table: no run has a jstar.json artifact or per-sigma J* metrics.")
        ax_t.set_axis_off()
        return fig
    var = t.meta.get("data_variance")
    floor = 1e-6 * (var or float(np.nanmax(t.values)) or 1.0)
    err = 2 * np.nan_to_num(t.stderr)
    ax.errorbar(t.sigmas, np.maximum(t.values, floor), yerr=err, marker="o", ms=3, capsize=2, color="black",
                label="J*_sigma (+-2 s.e.)")
    log_axes(ax)
    ax.axvline(t.sigma_star, color="tab:red", ls="--", lw=1, label=f"sigma* = {fmt(t.sigma_star)}")
    if var:
        ax.axhline(var, color="grey", ls=":", lw=1, label=f"data variance {fmt(var)}")
    ax.set(xlabel="sigma (VE)", ylabel="J*_sigma (x0 MSE per dimension)",
           title=f"J*_sigma +- 2 standard errors (values below {fmt(floor)} drawn at {fmt(floor)})")
    ax.legend(fontsize=8)
    ax_t.set_axis_off()
    rows = [f"{'sigma':>9} {'J*_sigma':>12} {'s.e.':>10}"]
    rows += [f"{fmt(s):>9} {v:12.4g} {e:10.2g}" for s, v, e in zip(t.sigmas, t.values, t.stderr)]
    ax_t.text(0.0, 1.0, "\n".join(rows), family="monospace", fontsize=8 if len(rows) < 36 else 5,
              va="top", transform=ax_t.transAxes)
    return fig


# --------------------------------------------------------------------------------------------------
# Per-sigma gap


def draw_final_gap_page(exp: ExperimentData):
    """Each run's per-sigma gap at its last held-out evaluation, absolute and relative to J*."""
    fig, axes = new_page("Per-sigma gap at each run's last evaluation", 1, 2)
    ax, ax_rel = axes[0]
    runs = exp.with_history
    if not runs:
        for a in axes[0]:
            say_missing(a, "No run has a held-out evaluation yet.")
        return fig
    colours = schedule_colours(exp.schedules)
    t = jstar_table_of(exp)
    for r in runs:
        g, c = r.gap[-1], colours[r.schedule]
        label = f"{r.name} ({int(r.nimg[-1]):,} img)"
        pos = g > 0
        ax.plot(r.sigmas[pos], g[pos], marker=".", ms=3, lw=1, color=c, alpha=0.8, label=label)
        above = pos & (r.sigmas >= t.sigma_star) & (r.jstar > 0)
        ax_rel.plot(r.sigmas[above], g[above] / r.jstar[above], marker=".", ms=3, lw=1, color=c, alpha=0.8,
                    label=label)
    for a in (ax, ax_rel):
        log_axes(a)
        a.axvline(t.sigma_star, color="grey", ls="--", lw=1)
    ax.set(xlabel="sigma (VE)", ylabel="J_sigma(theta) - J*_sigma (x0 MSE per dim.)",
           title="gap (positive values; dashed: sigma*)")
    ax_rel.set(xlabel="sigma (VE)", ylabel="(J_sigma - J*_sigma) / J*_sigma",
               title="gap relative to J*, sigma >= sigma*")
    _runs_legend(ax, runs, colours)
    return fig


BAND_EDGES = sorted({lo for lo, _ in BANDS if lo > 0})  # sigma = 0.3, 2, 10: where the grid's bands meet


def draw_share_page(exp: ExperimentData, a: Analysis):
    """Each series' loss share per sigma at the last status (mean over runs), and each series' final gap
    per sigma over its baseline's (method.md section 4.4)."""
    fig, axes = new_page("Loss shares and gaps per sigma", 1, 2)
    fig.subplots_adjust(wspace=0.3, bottom=0.14)
    ax, ax_r = axes[0]
    colours = schedule_colours(exp.schedules)
    if not exp.with_history:
        for x in axes[0]:
            say_missing(x, "No run has a held-out evaluation yet.")
        return fig
    if not a.shares:
        say_missing(ax, "No run has loss shares (sched/share_sigma_<s>, the \"share\" of per_sigma.json): the "
                        "runs were trained before edm-opt logged them.")
    else:
        for p in a.shares:
            pos = p.share > 0
            ax.plot(p.sigmas[pos], p.share[pos], marker=".", ms=3, lw=1.2, color=colours[p.schedule],
                    label=f"{p.schedule} ({p.n_runs} runs)")
        log_axes(ax)
        ax.set(xlabel="sigma (VE)", ylabel="share of the training signal per grid bin",
               title="share at the last status (mean over runs)")
        ax.legend(fontsize=7)
    if not a.gap_ratios:
        say_missing(ax_r, "No series to compare with a baseline: one schedule only, or series on different "
                          "sigma grids.")
    else:
        for g in a.gap_ratios:
            ok = np.isfinite(g.ratio)
            how = f"{g.n_pairs} pairs" if g.n_pairs else "means, no seed pair"
            ax_r.plot(g.sigmas[ok], g.ratio[ok], marker=".", ms=3, lw=1.2, color=colours[g.schedule],
                      label=f"{g.schedule} / {g.baseline} ({how})")
        ax_r.axhline(1, color="grey", lw=1)
        log_axes(ax_r)
        ax_r.set(xlabel="sigma (VE)", ylabel="final gap / final gap of the baseline",
                 title="final gap / baseline's (below 1: closer to J*)")
        ax_r.legend(fontsize=7)
    for x in (ax, ax_r):
        if x.axison:
            for edge in BAND_EDGES:
                x.axvline(edge, color="grey", ls=":", lw=1)
    fig.text(0.5, 0.03, f"dotted: band edges sigma = {', '.join(f'{e:g}' for e in BAND_EDGES)}. share: the bin's "
             "share p w J / sum of the training signal (sched/share_sigma_<s>). gap: held-out EMA loss - J*_sigma; "
             "ratio: geometric mean over pairs of runs\nwith the same preset and seed (else: ratio of the mean gaps "
             "over all runs), each series against its own base schedule (optimal) or the baseline (others)",
             ha="center", va="center", fontsize=8)
    return fig


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around increasing centres (mirrored at the ends)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 1:
        return np.array([0.5 * x[0], 1.5 * x[0]]) if x[0] > 0 else np.array([x[0] - 0.5, x[0] + 0.5])
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def largest_gaps(runs: list[RunData]) -> dict[str, float]:
    """Largest positive gap per sigma key over all runs and evaluations (the heat maps' reference)."""
    out: dict[str, float] = {}
    for r in runs:
        for k, col in zip(r.keys, r.gap.T):
            pos = col[np.isfinite(col) & (col > 0)]
            if pos.size:
                out[k] = max(out.get(k, 0.0), float(pos.max()))
    return out


def relative_log_gap(r: RunData, largest: dict[str, float]) -> np.ndarray:
    """[T, K] log10 of the gap over the largest gap at that sigma (<= 0; NaN where the gap is not positive)."""
    ref = np.array([largest.get(k, np.nan) for k in r.keys])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r.gap > 0, np.log10(r.gap / ref), np.nan)


def heatmap_range(runs: list[RunData], largest: dict[str, float]) -> float:
    """Lower end of the shared colour scale: 1st percentile of all relative log gaps (upper end 0)."""
    logs = np.concatenate([relative_log_gap(r, largest).ravel() for r in runs] + [np.zeros(1)])
    logs = logs[np.isfinite(logs)]
    return min(float(np.percentile(logs, 1)), -0.1)


def draw_heatmap_page(runs: list[RunData], largest: dict[str, float], vmin: float, page: int, pages: int):
    """Gap over training (nimg x sigma) for up to HEATMAPS_PER_PAGE runs, relative per sigma to the largest
    gap of any run there, so runs and noise levels share one scale: 0 = worst, -1 = ten times smaller."""
    title = "Gap over training, per sigma relative to the largest gap" + (f" ({page}/{pages})" if pages > 1 else "")
    fig, axes = new_page(title, 3, 4, sharey=True)
    fig.subplots_adjust(hspace=0.55, right=0.86)
    mesh = None
    for ax, r in zip(axes.flat, runs):
        # log10 sigma on a linear axis: a log axis would build dozens of minor ticks per panel (slow)
        y = bin_edges(r.sigmas) / math.log(10) if r.sigmas.size > 1 else _edges(np.log10(r.sigmas))
        z = np.nan_to_num(relative_log_gap(r, largest), nan=vmin)
        mesh = ax.pcolormesh(_edges(r.nimg), y, z.T, vmin=vmin, vmax=0.0, cmap="magma", shading="flat",
                             rasterized=True)
        ax.set_title(f"{r.name[:34]}\n{r.schedule}, {fmt_int(r.param_count)} params", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.get_offset_text().set_fontsize(6)
    for ax in axes.flat[len(runs):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_ylabel("log10 sigma (VE)", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("images seen", fontsize=7)
    if mesh is not None:
        cax = fig.add_axes([0.89, 0.15, 0.015, 0.7])
        fig.colorbar(mesh, cax=cax, label="log10(gap / largest gap at that sigma); gap <= 0: darkest")
    return fig


# --------------------------------------------------------------------------------------------------
# Scaling


def _positive(f: np.ndarray, y: np.ndarray):
    keep = np.isfinite(y) & (y > 0)
    return f[keep], y[keep]


def _fit_label(name: str, fit) -> str:
    return f"{name}: alpha {fmt(fit.alpha)}, rho {fmt_r(fit.rho)}" if not math.isnan(fit.alpha) else f"{name}: no fit"


def _f_span(exp: ExperimentData, s: SeriesFit) -> np.ndarray:
    """Log-spaced f over all runs' compute (FLOPs), where fitted lines are drawn."""
    f = np.concatenate([r.flops_total[r.flops_total > 0] for r in exp.with_history] + [s.frontier[0]])
    return np.geomspace(f.min(), f.max(), 100)


def draw_reference_scaling_page(exp: ExperimentData, s: SeriesFit, table: list[str]):
    """Reference total vs compute: raw, J*-subtracted and free-floor fits on the frontier, and the table.

    Without a fit (too few points) the runs' curves are still drawn and the panels say why."""
    fig, axes = new_page("Scaling of the reference total: raw vs J* subtracted", 1, 3)
    fig.subplots_adjust(top=0.88, bottom=0.36, wspace=0.32)
    fig.text(0.04, 0.26, "\n".join(table), family="monospace", fontsize=7.5, va="top")
    ax_raw, ax_sub, ax_free = axes[0]
    if s.frontier is None:
        for a in axes[0]:
            say_missing(a, f"Reference total: {s.note}.")
        return fig
    colours = schedule_colours(exp.schedules)
    for r in exp.with_history:
        if (c := r.curve()) is not None:
            ax_raw.plot(*c, lw=0.8, alpha=0.4, color=colours[r.schedule])
            ax_sub.plot(*_positive(c[0], c[1] - s.jstar), lw=0.8, alpha=0.4, color=colours[r.schedule])
    f, J = s.frontier
    dots = dict(ls="none", marker="o", ms=2.5, mfc="none", color="black")
    ax_raw.plot(f, J, label=f"frontier ({s.n_runs} runs)", **dots)
    ax_sub.plot(*_positive(f, J - s.jstar), label="frontier - J*", **dots)
    ax_raw.axhline(s.jstar, color="grey", ls=":", lw=1, label=f"J* = {fmt(s.jstar)}")
    titles = ["raw", "J* subtracted"]
    if s.fits is None:
        titles = [f"{t}: no fit" for t in titles]
        say_missing(ax_free, f"Reference total: {s.note}.")
    else:
        span = _f_span(exp, s)
        raw, sub, free = s.fits
        if not math.isnan(raw.alpha):
            ax_raw.plot(span, raw.predict(span), "-", color="tab:purple", lw=1.6,
                        label=_fit_label("J = beta f^alpha", raw))
        if not math.isnan(sub.alpha):
            ax_sub.plot(span, sub.predict(span) - s.jstar, "-", color="tab:purple", lw=1.6,
                        label=_fit_label("J - J* = beta f^alpha", sub))
        ax_free.plot(f, J, label="frontier", **dots)
        if not math.isnan(free.alpha):
            ax_free.plot(span, free.predict(span), "-", color="tab:purple", lw=1.6,
                         label=f"beta f^alpha + c: alpha {fmt(free.alpha)}")
            ax_free.axhline(free.c, color="tab:purple", ls="--", lw=1,
                            label=f"fitted c = {fmt(free.c)} +- {fmt(free.c_se)}")
        ax_free.axhline(s.jstar, color="grey", ls=":", lw=1.5, label=f"J* = {fmt(s.jstar)} (computed)")
        log_axes(ax_free, y=False)
        ax_free.set(xlabel="training compute f (FLOPs)", ylabel="reference total J (x0 MSE per dim.)",
                    title="free floor c (diagnostic)" + ("" if free.identifiable else ": not identified"))
        ax_free.legend(fontsize=6)
    for a, title, ylabel in ((ax_raw, titles[0], "reference total J"), (ax_sub, titles[1], "J - J*")):
        log_axes(a)
        a.set(xlabel="training compute f (FLOPs)", ylabel=f"{ylabel} (x0 MSE per dim.)", title=title)
        a.legend(fontsize=6)
    return fig


def draw_sigma_scaling_page(fits: list[SeriesFit]):
    """Per-sigma frontiers, raw (grey, dashed fit) and J*-subtracted (red, solid fit), on a 2 x 4 grid."""
    fig, axes = new_page("Scaling per sigma: held-out loss at one noise level, raw vs J* subtracted", 2, 4)
    fig.subplots_adjust(hspace=0.45, wspace=0.45)
    for ax, s in zip(axes.flat, fits):
        if s.frontier is None:
            say_missing(ax, f"{s.label}: {s.note}")
            continue
        f, J = s.frontier
        ax.plot(f, J, "o", mfc="none", ms=2.5, color="tab:gray", label="J")
        ax.plot(*_positive(f, J - s.jstar), "o", mfc="none", ms=2.5, color="tab:red", label="J - J*")
        if s.fits is None:
            second = textwrap.fill(s.note, 40)
        else:
            raw, sub, _ = s.fits
            if not math.isnan(raw.alpha):
                ax.plot(f, raw.predict(f), "--", color="black", lw=1.2, label="fit of J")
            if not math.isnan(sub.alpha):
                ax.plot(f, sub.predict(f) - s.jstar, "-", color="black", lw=1.2, label="fit of J - J*")
            second = f"rho {fmt_r(raw.rho)} -> {fmt_r(sub.rho)}, alpha {fmt(raw.alpha)} -> {fmt(sub.alpha)}"
        log_axes(ax)
        ax.set_title(f"{s.label} (J* {fmt(s.jstar)}, {s.n_runs} runs)\n{second}", fontsize=6.5)
        ax.tick_params(which="both", labelsize=6)
    for ax in axes.flat[len(fits):]:
        ax.set_axis_off()
    if fits and fits[0].frontier is not None:
        axes[0, 0].legend(fontsize=6)
    fig.text(0.5, 0.02, "x: training compute f (FLOPs); y: x0 MSE per dimension; markers: frontier over runs, "
             "lines: power-law fits (raw dashed, J* subtracted solid)", ha="center", fontsize=8)
    return fig


def draw_schedule_page(exp: ExperimentData, a: Analysis, sentences: list[str]):
    """Each schedule's frontier of the reference gap, and its ratio to the baseline at equal compute."""
    fig, axes = new_page("Schedules at equal compute: frontier of the reference gap J - J*", 1, 2)
    fig.subplots_adjust(bottom=0.3)
    fig.text(0.04, 0.2, "\n".join(textwrap.fill(s, 150) for s in sentences), fontsize=8, va="top")
    ax, ax_r = axes[0]
    if not a.frontiers:
        for x in axes[0]:
            say_missing(x, "No run has a held-out evaluation yet.")
        return fig
    colours = schedule_colours(exp.schedules)
    for s, fr in a.frontiers.items():
        ax.plot(*_positive(fr.f, fr.gap), "-", color=colours[s], lw=1.5, label=f"{s} ({fr.n_runs} runs)")
    log_axes(ax)
    ax.set(xlabel="training compute f (FLOPs)", ylabel="reference gap J - J* (x0 MSE per dim.)",
           title="frontier per schedule")
    ax.legend(fontsize=7)
    if not a.comparisons:
        say_missing(ax_r, "Only one schedule: nothing to compare at equal compute.")
        return fig
    bases = sorted({c.baseline for c in a.comparisons})
    base = bases[0] if len(bases) == 1 else "its baseline"
    for c in a.comparisons:
        if c.n_points:
            ax_r.plot(c.f, c.ratio, color=colours[c.schedule], lw=1.5, label=f"{c.schedule} vs {c.baseline}")
    ax_r.axhline(1, color="grey", lw=1)
    log_axes(ax_r)
    ax_r.set(xlabel="training compute f (FLOPs)", ylabel=f"gap / gap of {base}",
             title=f"ratio to {base} (below 1: lower gap at equal compute)")
    ax_r.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------------------------------
# FID / KID


def draw_fid_page(exp: ExperimentData):
    """FID and KID against training compute (every snapshot) and against parameters (last snapshot)."""
    fig, axes = new_page("FID and KID against compute and parameters", 2, 2)
    fig.subplots_adjust(hspace=0.35)
    colours = schedule_colours(exp.schedules)
    for row, (name, get) in enumerate((("FID", lambda r: r.fid), ("KID", lambda r: r.kid))):
        ax_f, ax_p = axes[row]
        runs = [r for r in exp.runs if len(get(r))]
        if not runs:
            msg = (f"No {name} logged for any run: run `edm-opt evaluate` on the snapshots "
                   f"(metric `{name.lower()}`, step = nimg).")
            say_missing(ax_f, msg)
            say_missing(ax_p, msg)
            continue
        for r in runs:
            v = get(r)
            f = v[:, 0] * (r.flops_per_image or math.nan)
            ax_f.plot(f, v[:, 1], marker="o", ms=3, lw=1, color=colours[r.schedule], alpha=0.8)
            if r.param_count:
                ax_p.plot(r.param_count, v[-1, 1], "o", color=colours[r.schedule])
        for ax, xl in ((ax_f, "training compute f (FLOPs) at the snapshot"), (ax_p, "parameters")):
            log_axes(ax, y=False)
            ax.set(xlabel=xl, ylabel=name)
        ax_f.set_title(f"{name} of every evaluated snapshot ({len(runs)} runs)", fontsize=9)
        ax_p.set_title(f"{name} of each run's last evaluated snapshot", fontsize=9)
        schedule_legend(ax_f, {s: colours[s] for s in sorted({r.schedule for r in runs})})
    return fig


# --------------------------------------------------------------------------------------------------
# Gap vs FID


def draw_gap_fid_page(exp: ExperimentData, a: Analysis):
    """Correlation per sigma of the gap with FID across (run, snapshot) points (paper Figure 2b)."""
    fig, axes = new_page("Per-sigma gap vs FID across snapshots (correlation per sigma)", 1, 2)
    ax, ax_s = axes[0]
    ok = [c for c in a.gap_fid if not math.isnan(c.pearson)]
    if not ok:
        msg = (f"{len(a.gap_fid_points)} (run, snapshot) points have FID and a held-out evaluation at the same "
               f"nimg; a correlation needs at least 3." + ("" if a.gap_fid_points else
                                                           " Run `edm-opt evaluate` on the snapshots."))
        say_missing(ax, msg)
        say_missing(ax_s, msg)
        return fig
    s = np.array([c.sigma for c in ok])
    ax.plot(s, [c.pearson for c in ok], "o-", ms=4, label="Pearson rho")
    ax.fill_between(s, [c.pearson_lo for c in ok], [c.pearson_hi for c in ok], alpha=0.2,
                    label="95% CI, runs resampled")  # NaN (fewer runs than a CI needs): no band
    ax.plot(s, [c.spearman for c in ok], "s--", ms=3, label="Spearman rho")
    ax.axhline(0, color="grey", lw=1)
    log_axes(ax, y=False)
    ax.set_ylim(-1.05, 1.05)
    ax.set(xlabel="sigma (VE)", ylabel="correlation of gap_sigma with FID",
           title=f"{len(a.gap_fid_points)} points from {len({p.run_id for p in a.gap_fid_points})} runs")
    ax.legend(fontsize=8)
    best = max(ok, key=lambda c: abs(c.pearson))
    key = sigma_key(best.sigma)
    colours = schedule_colours(exp.schedules)
    schedule_of = {r.run_id: r.schedule for r in exp.runs}
    pts = [p for p in a.gap_fid_points if key in p.gap]
    ax_s.scatter([p.gap[key] for p in pts], [p.fid for p in pts], s=14,
                 c=[colours[schedule_of[p.run_id]] for p in pts])
    ax_s.set(xlabel=f"gap at sigma = {key} (x0 MSE per dim.)", ylabel="FID",
             title=f"strongest: sigma = {key}, Pearson {best.pearson:.3f}, n = {best.n}")
    ax_s.grid(True, alpha=0.3)
    schedule_legend(ax_s, {s: colours[s] for s in sorted({schedule_of[p.run_id] for p in pts})})
    return fig
