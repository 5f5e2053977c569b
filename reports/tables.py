"""Text of a report: number formats, the fit and run tables, the summary (plain lines, monospace pages).

The same formats appear in the PDF and in what tests look for: `fmt` (4 significant digits, as
`edm_opt.scaling` summaries print alpha and beta) and `fmt_r` (4 decimals, for rho and R^2).
"""

from __future__ import annotations

import datetime as _dt
import math
import textwrap

from edm_opt import contract as C

from .analysis import Analysis, SeriesFit
from .data import ExperimentData, RunData

NA = "n/a"


def fmt(v: float | None) -> str:
    """4 significant digits; n/a for None or NaN."""
    return NA if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, ".4g")


def fmt_r(v: float) -> str:
    """rho, R^2: 4 decimals."""
    return NA if math.isnan(v) else f"{v:.4f}"


def fmt_ci(ci: tuple[float, float]) -> str:
    return NA if any(math.isnan(c) for c in ci) else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_int(v: int | None) -> str:
    return NA if v is None else f"{v:,}"


def fmt_date(ms: int | None) -> str:
    """A run time (ms since the epoch) in UTC."""
    if ms is None:
        return NA
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------------------------------
# Fit table


FIT_HEADER = (f"{'series':<16} {'form':<11} {'alpha':>9} {'95% CI':<22} {'beta':>10} {'95% CI':<22} "
              f"{'rho':>8} {'R^2':>7} {'n':>4}")


def fit_rows(s: SeriesFit) -> list[str]:
    """Rows of one series: raw, J*-subtracted, free floor, then notes (indented)."""
    if s.fits is None:
        return [f"{s.label:<16} {'':<11} {s.note}"]
    rows, notes = [], []
    for name, form, fit in (("raw", "J", s.fits.raw), ("subtracted", "J - J*", s.fits.subtracted)):
        rows.append(f"{s.label if not rows else '':<16} {form:<11} {fmt(fit.alpha):>9} {fmt_ci(fit.alpha_ci):<22} "
                    f"{fmt(fit.beta):>10} {fmt_ci(fit.beta_ci):<22} {fmt_r(fit.rho):>8} {fmt_r(fit.r2):>7} "
                    f"{fit.n_used:>4}")
        if fit.note:
            notes.append(f"{name}: {fit.note}")
    ff = s.fits.free_floor
    state = "floor identified" if ff.identifiable else "floor NOT identified"
    rows.append(f"{'':<16} {'free floor':<11} {fmt(ff.alpha):>9} {'+-' + fmt(ff.alpha_se):<22} {fmt(ff.beta):>10} "
                f"{'+-' + fmt(ff.beta_se):<22} c = {fmt(ff.c)} +- {fmt(ff.c_se)} vs J* = {fmt(s.jstar)} ({state})")
    if ff.note:
        notes.append(f"free floor: {ff.note}")
    return rows + [f"{'':<16}   note, {n}" for n in notes]


def fit_table(series: list[SeriesFit]) -> list[str]:
    lines = [FIT_HEADER, "-" * len(FIT_HEADER)]
    for s in series:
        lines += fit_rows(s)
    return lines


# --------------------------------------------------------------------------------------------------
# Run table


RUN_HEADER = (f"{'run':<32} {'schedule':<32} {'preset':<14} {'params':>12} {'images':>11} {'ref gap':>10} "
              f"{'FID':>8} {'KID':>9} {'status':<9} {'data from':<16}")


def run_row(r: RunData) -> str:
    gap = fmt(float(r.ref_gap[-1])) if r.has_history else NA
    nimg = fmt_int(int(r.nimg[-1])) if r.has_history else NA
    return (f"{r.name[:32]:<32} {r.schedule[:32]:<32} {r.preset[:14]:<14} {fmt_int(r.param_count):>12} {nimg:>11} "
            f"{gap:>10} {fmt(r.final(r.fid)):>8} {fmt(r.final(r.kid)):>9} {r.status[:9]:<9} {r.source[:16]:<16}")


# --------------------------------------------------------------------------------------------------
# Summary


def _with_ci(v: float, ci: tuple[float, float]) -> str:
    """`v [lo, hi]`, or `v` alone when there is no interval."""
    return fmt(v) if any(math.isnan(c) for c in ci) else f"{fmt(v)} {fmt_ci(ci)}"


def _fit_sentence(s: SeriesFit) -> str:
    raw, sub = s.fits.raw, s.fits.subtracted
    if math.isnan(raw.alpha) or math.isnan(sub.alpha):
        return (f"The {s.label} cannot be fitted yet: {sub.note or raw.note}.")
    better = "raises" if abs(sub.rho) > abs(raw.rho) else "does not raise"
    return (f"{s.label.capitalize()} on the frontier of {s.n_runs} runs: raw J = beta f^alpha gives alpha = "
            f"{_with_ci(raw.alpha, raw.alpha_ci)}, rho = {fmt_r(raw.rho)}, R^2 = {fmt_r(raw.r2)}; with "
            f"J* = {fmt(s.jstar)} subtracted, alpha = {_with_ci(sub.alpha, sub.alpha_ci)}, rho = "
            f"{fmt_r(sub.rho)}, R^2 = {fmt_r(sub.r2)}. Subtracting J* makes the exponent "
            f"{abs(sub.alpha / raw.alpha):.3g} times as steep and {better} |rho|.")


def _floor_sentence(s: SeriesFit) -> str:
    ff = s.fits.free_floor
    if ff.identifiable:
        return (f"The free-floor fit J = beta f^alpha + c identifies a floor c = {fmt(ff.c)} +- {fmt(ff.c_se)}, "
                f"{ff.c / s.jstar - 1:+.1%} from the computed J* = {fmt(s.jstar)}." if s.jstar > 0 else
                f"The free-floor fit identifies a floor c = {fmt(ff.c)} +- {fmt(ff.c_se)} (J* = {fmt(s.jstar)}).")
    return (f"The free-floor fit J = beta f^alpha + c does not identify the floor ({ff.note or 'no fit'}): "
            f"the curve alone does not determine it, J* = {fmt(s.jstar)} computed from the data does.")


def _sigma_sentence(fits: list[SeriesFit]) -> str:
    ok = [s for s in fits if s.fits and not math.isnan(s.fits.raw.rho) and not math.isnan(s.fits.subtracted.rho)]
    if not ok:
        return "No per-sigma fit is available yet (fewer than 3 frontier points)."
    up = [s for s in ok if abs(s.fits.subtracted.rho) > abs(s.fits.raw.rho)]
    big = max(ok, key=lambda s: abs(s.fits.subtracted.rho) - abs(s.fits.raw.rho))
    return (f"Per sigma, subtracting J*_sigma raises |rho| at {len(up)} of {len(ok)} fitted sigmas; the largest "
            f"change is at {big.label}: |rho| {abs(big.fits.raw.rho):.4f} -> {abs(big.fits.subtracted.rho):.4f}, "
            f"alpha {fmt(big.fits.raw.alpha)} -> {fmt(big.fits.subtracted.alpha)}.")


def schedule_sentences(a: Analysis) -> list[str]:
    if len(a.frontiers) < 2:
        return [f"Only one schedule ({', '.join(a.frontiers) or 'none with data'}): no comparison at equal compute."]
    out = []
    for c in a.comparisons:
        if c.n_points == 0:
            out.append(f"{c.schedule} vs {c.baseline}: {c.note}.")
            continue
        verdict = "lower" if c.gap_ratio < 1 else "higher"
        out.append(f"At equal compute ({fmt(c.f_range[0])} to {fmt(c.f_range[1])} FLOPs), the {c.schedule} "
                   f"frontier reaches a {verdict} reference gap than {c.baseline}: gap ratio "
                   f"({c.schedule}) / ({c.baseline}) = {c.gap_ratio:.3g} (geometric mean), lower at "
                   f"{c.fraction_lower:.0%} of the compute grid.")
    return out


def _gap_fid_sentence(a: Analysis) -> str:
    ok = [c for c in a.gap_fid if not math.isnan(c.pearson)]
    if not ok:
        return (f"Gap vs FID: {len(a.gap_fid_points)} (run, snapshot) points with FID and a matching evaluation; "
                f"at least 3 are needed for a correlation.")
    best = max(ok, key=lambda c: abs(c.pearson))
    return (f"Gap vs FID across {len(a.gap_fid_points)} (run, snapshot) points: the gap correlates most with "
            f"FID at sigma = {fmt(best.sigma)} (Pearson rho = {best.pearson:.3f}"
            + ("" if math.isnan(best.pearson_lo) else f", 95% CI [{best.pearson_lo:.3f}, {best.pearson_hi:.3f}] "
               f"resampling runs") + f", Spearman = {best.spearman:.3f}, n = {best.n} from {best.runs} runs).")


def summary_lines(exp: ExperimentData, a: Analysis, missing: list[str]) -> list[str]:
    """Paragraphs of the summary page: what the fits say, then what is missing."""
    n_fid = sum(1 for r in exp.runs if len(r.fid))
    paras = [f"{len(exp.runs)} training runs ({len(exp.with_history)} with held-out evaluations, {n_fid} with FID); "
             f"schedules: {', '.join(exp.schedules)}."]
    if a.reference.fits is None:
        paras.append(f"Reference total: {a.reference.note}.")
    else:
        paras.append(_fit_sentence(a.reference))
        paras.append(_floor_sentence(a.reference))
    paras.append(_sigma_sentence(a.sigma_fits))
    paras += schedule_sentences(a)
    paras.append(_gap_fid_sentence(a))
    paras += [f"Missing: {m}" for m in missing]
    return paras


def wrap(paragraphs: list[str], width: int = 130) -> list[str]:
    """Paragraphs wrapped to `width` characters, a blank line between them."""
    lines: list[str] = []
    for p in paragraphs:
        lines += textwrap.wrap(p, width, subsequent_indent="  ", break_on_hyphens=False) + [""]
    return lines


# --------------------------------------------------------------------------------------------------
# Title page


def _counts(values: list[str]) -> str:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in sorted(counts.items()))


def title_lines(exp: ExperimentData, sigma_star: float | None, environment: dict[str, str],
                contents: list[str]) -> list[str]:
    """Experiment, dataset, J* table, runs, versions, environment, notes, then the `contents` lines."""
    t = exp.jstar_table or {}
    ds = t.get("dataset", {})
    ref = exp.reference
    fingerprint = ds.get("fingerprint") or (ref.fingerprint if ref else None) or NA
    scope = f"sweep {exp.sweep_run_id}: its child runs" if exp.sweep_run_id else "all runs of the experiment"
    lines = [f"{'Experiment':<18}{exp.experiment}   ({scope})", f"{'Tracking store':<18}{exp.uri}", ""]
    lines.append(f"{'Dataset':<18}{ds.get('source', NA)}  (resolution {ds.get('resolution')}, "
                 f"xflip {ds.get('xflip')}, preprocessing {ds.get('preprocessing', NA)})" if ds else
                 f"{'Dataset':<18}{NA} (no jstar.json artifact)")
    lines.append(f"{'':<18}fingerprint {fingerprint}")
    if t:
        lines.append(f"{'':<18}{fmt_int(t.get('num_images'))} images, dimension {t.get('dim', NA)}, data variance "
                     f"per dimension {fmt(t.get('data_variance'))}, "
                     f"{'class-conditional' if t.get('class_conditional') else 'unconditional'}")
        params = ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}"
                           for k, v in sorted(t.get("params", {}).items()))
        lines.append(f"{'J* table':<18}estimator {t.get('estimator', NA)} ({params}), "
                     f"wall time {fmt(t.get('wall_time_s'))} s")
    else:
        est = ref.tags.get(C.TAG_JSTAR_SHA, NA)[:16] if ref else NA
        lines.append(f"{'J* table':<18}metadata missing (no jstar.json artifact); J* sha256 {est}...")
    if ref is not None:
        grid = f"{fmt(ref.sigmas[0])}:{fmt(ref.sigmas[-1])}:{len(ref.sigmas)}"
        lines.append(f"{'':<18}reference total J* = {fmt(ref.jstar_ref)}; sigma grid {grid}; "
                     f"sigma* = {fmt(sigma_star)}")
    n_fid = sum(1 for r in exp.runs if len(r.fid))
    lines += ["", f"{'Runs':<18}{len(exp.runs)} training runs: {_counts([r.status for r in exp.runs])}",
              f"{'':<18}{len(exp.with_history)} with held-out evaluations, {n_fid} with FID",
              f"{'':<18}schedules: {_counts([r.schedule for r in exp.runs])}"]
    if exp.skipped:
        lines.append(f"{'':<18}not training runs, skipped: {', '.join(exp.skipped[:6])}"
                     + (" ..." if len(exp.skipped) > 6 else ""))
    latest = max((r.time_ms for r in exp.runs if r.time_ms), default=None)
    lines.append(f"{'Data as of':<18}{fmt_date(latest)} (latest run end or start time)")
    versions = _counts([r.tags.get(C.TAG_VERSION, NA) for r in exp.runs])
    commits = _counts([r.tags.get(C.TAG_GIT_COMMIT, NA)[:12] for r in exp.runs])
    lines += ["", f"{'edm-opt':<18}{environment['edm-opt']} (this report); runs: {versions}",
              f"{'':<18}runs' git commits: {commits}",
              f"{'Environment':<18}" + ", ".join(f"{k} {v}" for k, v in environment.items() if k != "edm-opt")]
    if exp.notes:
        lines += ["", "Notes"] + [f"  - {n}" for n in exp.notes]
    lines += ["", "Contents"] + [f"  {c}" for c in contents]
    return lines
