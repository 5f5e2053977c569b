"""`build_report`: an experiment's runs from MLflow -> fits -> one multi-page PDF (and CSV tables).

The PDF is deterministic: no creation or modification date in its metadata and the title page's date is
the runs' own latest time, so the same store gives the same bytes (on the same machine and library
versions: the title page names the environment). It is written atomically and, with a sweep, logged as
an artifact of the sweep run.
"""

from __future__ import annotations

import csv
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edm_opt import __version__
from edm_opt.gap_fid import GapFidCorrelation
from edm_opt.fileio import atomic_path
from edm_opt.tracking import default_tracking_uri, log_now

from . import pages as P
from .analysis import Analysis, ScheduleComparison, SeriesFit, analyse
from .data import ExperimentData, collect_experiment
from .tables import RUN_HEADER, fit_table, run_row, summary_lines, title_lines, wrap, schedule_sentences

RUN_ROWS_PER_PAGE = 40
CSV_FOLDER = "report-csv"  # artifact folder of the CSV tables on the sweep run


@dataclass
class ReportSummary:
    """What a report contains. pages: page titles in order; missing: what the report says is missing;
    summary: the summary page's paragraphs; logged_to: the sweep run the PDF was logged to."""

    out: Path
    experiment: str
    pages: list[str]
    runs: int
    runs_with_data: int
    runs_with_fid: int
    reference: SeriesFit
    sigma_fits: list[SeriesFit]
    comparisons: list[ScheduleComparison]
    gap_fid: list[GapFidCorrelation]
    gap_fid_points: int
    missing: list[str]
    summary: list[str]
    csv_files: list[Path]
    logged_to: str | None


def environment() -> dict[str, str]:
    """Versions and device of the machine building the report."""
    from importlib.metadata import version

    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return {"edm-opt": __version__, "Python": platform.python_version(), "torch": torch.__version__,
            "CUDA": torch.version.cuda or "none (CPU build)", "device": device,
            "mlflow": version("mlflow"), "matplotlib": version("matplotlib")}


def missing_data(exp: ExperimentData, a: Analysis) -> list[str]:
    """Sentences for what a reader might expect and the report could not show."""
    out = list(exp.notes)
    if exp.jstar_table is None:
        out.append("no jstar.json artifact: J* metadata (estimator, dataset) unknown, J* values from the runs")
    running = [r.name for r in exp.runs if r.status == "RUNNING"]
    if running:
        out.append(f"{len(running)} runs still RUNNING (read from their metric histories, up to their last status)")
    if not any(len(r.fid) for r in exp.runs):
        out.append("no run has FID (run `edm-opt evaluate` on the snapshots): FID/KID and gap-vs-FID pages empty")
    elif not any(len(r.kid) for r in exp.runs):
        out.append("no run has KID")
    by_reason: dict[str, list[str]] = {}  # one line per reason, naming the series
    for s in [a.reference] + a.sigma_fits:
        if s.fits is None:
            by_reason.setdefault(s.note, []).append(s.label)
        elif math.isnan(s.fits.subtracted.alpha):
            by_reason.setdefault(f"no fit ({s.fits.subtracted.note})", []).append(s.label)
    return out + [f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items()]


def _contents(titles: list[str]) -> list[str]:
    """Consecutive pages with the same title collapse into one line."""
    lines, i = [], 0
    while i < len(titles):
        j = i
        while j + 1 < len(titles) and titles[j + 1] == titles[i]:
            j += 1
        lines.append(f"{i + 1:>3}{'-' + str(j + 1) if j > i else '':<5} {titles[i]}"
                     + (f" ({j - i + 1} pages)" if j > i else ""))
        i = j + 1
    return lines


def report_pages(exp: ExperimentData, a: Analysis, summary: list[str]) -> list[tuple[str, Callable]]:
    """(title, draw) of every page in order; draw() returns the page's figure."""
    t = P.jstar_table_of(exp)
    runs = exp.with_history
    chunks = [runs[i:i + P.HEATMAPS_PER_PAGE] for i in range(0, len(runs), P.HEATMAPS_PER_PAGE)] or [[]]
    largest = P.largest_gaps(runs)
    vmin = P.heatmap_range(runs, largest)
    boot = wrap(["Fits on the frontier over runs (edm_opt.scaling.fit_frontier); 95% CIs resample runs "
                 "(at least 5 runs needed). free floor: J = beta f^alpha + c with c fitted, +- standard errors."], 150)
    table = fit_table([a.reference]) + [""] + boot
    sigma_table = boot + fit_table(a.sigma_fits)
    run_chunks = [exp.runs[i:i + RUN_ROWS_PER_PAGE] for i in range(0, len(exp.runs), RUN_ROWS_PER_PAGE)]

    pages: list[tuple[str, Callable]] = [("Title", None)]
    pages.append(("Optimal loss J*_sigma", lambda: P.draw_jstar_page(exp)))
    pages.append(("Per-sigma gap at each run's last evaluation", lambda: P.draw_final_gap_page(exp)))
    for i, chunk in enumerate(chunks):
        pages.append(("Gap over training (heat maps)",
                      lambda chunk=chunk, i=i: P.draw_heatmap_page(chunk, largest, vmin, i + 1, len(chunks))
                      if chunk else P.text_page("Gap over training", ["No run has a held-out evaluation yet."])))
    pages.append(("Loss shares and gaps per sigma", lambda: P.draw_share_page(exp, a)))
    pages.append(("Scaling of the reference total", lambda: P.draw_reference_scaling_page(exp, a.reference, table)))
    pages.append(("Scaling per sigma", lambda: P.draw_sigma_scaling_page(a.sigma_fits)))
    pages.append(("Fit table per sigma", lambda: P.text_page("Fits per sigma: raw, J* subtracted, free floor",
                                                             sigma_table, fontsize=7.5)))
    pages.append(("Schedules at equal compute", lambda: P.draw_schedule_page(exp, a, schedule_sentences(a))))
    pages.append(("FID and KID", lambda: P.draw_fid_page(exp)))
    pages.append(("Per-sigma gap vs FID", lambda: P.draw_gap_fid_page(exp, a)))
    for i, chunk in enumerate(run_chunks):
        title = "Runs" + (f" ({i + 1}/{len(run_chunks)})" if len(run_chunks) > 1 else "")
        pages.append(("Runs", lambda chunk=chunk, title=title: P.text_page(
            title, [RUN_HEADER, "-" * len(RUN_HEADER)] + [run_row(r) for r in chunk], fontsize=7)))
    pages.append(("Summary", lambda: P.text_page("Summary: what the fits say", wrap(summary), fontsize=9)))
    lines = title_lines(exp, None if t is None else t.sigma_star, environment(), _contents([p[0] for p in pages]))
    pages[0] = ("Title", lambda: P.text_page(f"edm-opt report: {exp.experiment}", lines, fontsize=8.5))
    return pages


def write_pdf(path: Path, pages: list[tuple[str, Callable]], experiment: str) -> None:
    """Draw and save every page into one PDF, with page numbers and no dates in its metadata."""
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    metadata = {"Title": f"edm-opt report: {experiment}", "Creator": f"edm-opt {__version__}",
                "CreationDate": None, "ModDate": None}
    with PdfPages(path, metadata=metadata) as pdf:
        for i, (_, draw) in enumerate(pages, 1):
            fig = draw()
            fig.text(0.99, 0.01, f"edm-opt report: {experiment}  -  page {i}/{len(pages)}", ha="right",
                     fontsize=7, color="grey")
            pdf.savefig(fig, dpi=150)
            plt.close(fig)


# --------------------------------------------------------------------------------------------------
# CSV


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header)
            w.writerows([[_cell(v) for v in row] for row in rows])
    return path


def write_csv(csv_dir: Path, exp: ExperimentData, a: Analysis) -> list[Path]:
    """per_sigma_final.csv (each run's last evaluation per sigma, with its loss share there; empty when not
    logged), fits.csv, runs.csv (with the optimal variant and the seed param), gap_fid.csv."""
    csv_dir = Path(csv_dir)
    per_sigma = [[r.run_id, r.name, r.schedule, r.preset, r.param_count, r.status, int(r.nimg[-1]),
                  float(r.flops_total[-1]), float(s), float(j), float(l), float(l - j), float(sh)]
                 for r in exp.with_history for s, j, l, sh in zip(r.sigmas, r.jstar, r.loss_x0[-1], r.share[-1])]
    fits = []
    for s in [a.reference] + a.sigma_fits:
        if s.fits is None:
            fits.append([s.label, s.sigma, "", *[None] * 14, s.jstar, "", s.note])
            continue
        for form, f in (("raw", s.fits.raw), ("subtracted", s.fits.subtracted)):
            fits.append([s.label, s.sigma, form, f.alpha, *f.alpha_ci, None, f.beta, *f.beta_ci, None, None, None,
                         f.rho, f.r2, f.n_used, f.n_dropped, s.jstar, "", f.note])
        ff = s.fits.free_floor
        fits.append([s.label, s.sigma, "free floor", ff.alpha, None, None, ff.alpha_se, ff.beta, None, None,
                     ff.beta_se, ff.c, ff.c_se, None, None, ff.n_used, None, s.jstar, ff.identifiable, ff.note])
    runs = [[r.run_id, r.name, r.schedule, r.preset, r.param_count, r.status, r.source,
             int(r.nimg[-1]) if r.has_history else None, float(r.flops_total[-1]) if r.has_history else None,
             float(r.ref_gap[-1]) if r.has_history else None, r.final(r.fid), r.final(r.kid), r.variant,
             r.params.get("seed")] for r in exp.runs]
    return [
        _write_csv(csv_dir / "per_sigma_final.csv", ["run_id", "run_name", "schedule", "preset", "param_count",
                   "status", "nimg", "flops_total", "sigma", "jstar", "loss_x0", "gap", "share"], per_sigma),
        _write_csv(csv_dir / "fits.csv", ["series", "sigma", "form", "alpha", "alpha_ci_low", "alpha_ci_high",
                   "alpha_se", "beta", "beta_ci_low", "beta_ci_high", "beta_se", "c", "c_se", "rho", "r2", "n_used",
                   "n_dropped", "jstar", "floor_identifiable", "note"], fits),
        _write_csv(csv_dir / "runs.csv", ["run_id", "run_name", "schedule", "preset", "param_count", "status",
                   "source", "nimg", "flops_total", "ref_gap", "fid", "kid", "variant", "seed"], runs),
        _write_csv(csv_dir / "gap_fid.csv", ["sigma", "pearson", "pearson_ci_low", "pearson_ci_high", "spearman", "n",
                                             "runs"],
                   [[c.sigma, c.pearson, c.pearson_lo, c.pearson_hi, c.spearman, c.n, c.runs] for c in a.gap_fid]),
    ]


# --------------------------------------------------------------------------------------------------
# The entry point


def build_report(experiment: str, out: str | os.PathLike, sweep_run_id: str | None = None,
                 csv_dir: str | os.PathLike | None = None, uri: str | None = None, bootstrap: int = 1000,
                 sigma_bootstrap: int = 200) -> ReportSummary:
    """Write the PDF report of `experiment` (children of `sweep_run_id` only, when given) to `out`.

    uri: tracking store (default `edm_opt.tracking.default_tracking_uri()`). csv_dir: also write the
    tables as CSV there. bootstrap / sigma_bootstrap: run resamples for the CIs of the reference-total
    and of the per-sigma fits. With a sweep, the PDF (and CSVs) are logged as artifacts of the sweep run.
    Raises NoRunsError / TrackingError (EdmOptError) when there is nothing to report on.
    """
    uri = uri or default_tracking_uri()
    out = Path(out)
    exp = collect_experiment(uri, experiment, sweep_run_id)
    a = analyse(exp, bootstrap, sigma_bootstrap)
    missing = missing_data(exp, a)
    summary = summary_lines(exp, a, missing)
    pages = report_pages(exp, a, summary)
    with atomic_path(out) as tmp:
        write_pdf(tmp, pages, experiment)
    csv_files = write_csv(Path(csv_dir), exp, a) if csv_dir is not None else []
    if sweep_run_id:
        log_now(uri, sweep_run_id, artifacts=[out] + [(p, CSV_FOLDER) for p in csv_files])
    return ReportSummary(out=out, experiment=experiment, pages=[p[0] for p in pages], runs=len(exp.runs),
                         runs_with_data=len(exp.with_history), runs_with_fid=sum(1 for r in exp.runs if len(r.fid)),
                         reference=a.reference, sigma_fits=a.sigma_fits, comparisons=a.comparisons, gap_fid=a.gap_fid,
                         gap_fid_points=len(a.gap_fid_points), missing=missing, summary=summary,
                         csv_files=csv_files, logged_to=sweep_run_id)
