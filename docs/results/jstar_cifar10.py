"""J*_sigma of CIFAR-10 (the JPEG copy): the full estimator against DOL, cDOL and SNIS, cDOL over C, convergence.

Issue 21, item 2. For the unconditional and the class-conditional J* of the training set:
  - the full estimator at M0 queries on the 32-sigma grid, then at more queries (up to --full-max) at every sigma
    where J* > 1% of the data variance and the standard error is above --target-rse of J* (the reference);
  - DOL, cDOL with C = N/L, 4N/L, 16N/L and SNIS at L = 256, 1024, 4096, each at M0 queries per sigma;
and for the unconditional J* at ln sigma = 1.25 (the paper's Fig. 1c setting):
  - cDOL's bias, spread and RMSE over C at L = 1024 from --repeats independent seeds, against the reference;
  - convergence of cDOL (C = 4N/L) in L and of full and cDOL in M.
Writes `jstar-cifar10.md` (tables), `jstar-cifar10.csv` (every estimate) and `jstar-cifar10.png` into --out.
Estimates are cached in $EDM_OPT_CACHE/jstar/ one sigma per entry, so a stopped run resumes; the times shown
are those of the run that computed each entry.

Usage: python docs/results/jstar_cifar10.py [--data ../shared/datasets/cifar10-train-jpeg.zip] [--queries 2048]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
from pathlib import Path

import numpy as np
import torch

from edm_opt import EdmOptError
from edm_opt.data import load_dataset
from edm_opt.diffusion import sigma_grid, sigma_key
from edm_opt.fileio import atomic_path
from edm_opt.optimal_loss import OptimalLossTable, estimate_for_dataset
from edm_opt.plots import figure, save_figure

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1].parent / "shared" / "datasets" / "cifar10-train-jpeg.zip"
SIGMA_1C = math.exp(1.25)  # the paper's Fig. 1c noise level, ln sigma = 1.25
SHOWN_SIGMAS = (0.67, 0.94, 1.32, 1.86, 2.62, 5.19, 20.4, 80)  # table columns (nearest grid sigmas)
FIELDS = ("part", "conditioning", "estimator", "L", "C", "M", "seed", "sigma", "jstar", "stderr", "wall_s")


def subset_settings(n: float) -> list[tuple[str, str, int, float | None]]:
    """(label, estimator, L, C): DOL, cDOL at C = N/L, 4N/L, 16N/L and SNIS for L in 256, 1024, 4096.

    n: the points one posterior runs over (class-conditional: N per class, the estimator's own C scale)."""
    out = []
    for L in (256, 1024, 4096):
        out.append((f"DOL L={L}", "dol", L, None))
        out += [(f"cDOL L={L} C={c}N/L", "cdol", L, c * n / L) for c in (1, 4, 16)]
        out.append((f"SNIS L={L}", "snis", L, None))
    return out


class Study:
    """Runs (cached) estimates sigma by sigma and keeps every one as a CSV row."""

    def __init__(self, dataset, progress: bool):
        self.dataset, self.progress, self.rows = dataset, progress, []
        self.data_variance = {}  # per-dimension variance, by class_conditional (pooled within class)
        self.data = dataset.to_float()  # converted once, not per estimate (3 s for CIFAR-10)

    def estimate(self, part: str, cond: bool, estimator: str, sigmas, m: int, L: int | None = None,
                 C: float | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """J*, standard error and wall time (s) at each of `sigmas` (per-dimension x0 MSE, VE sigma)."""
        vals, ses, walls = [], [], []
        for s in np.atleast_1d(sigmas):
            tab, _ = estimate_for_dataset(self.dataset, np.array([s]), estimator, cond, num_samples=m,
                                          subset_size=L, correction=C, seed=seed, progress=self.progress,
                                          data=self.data)
            w = float(tab.meta["wall_time_s"])
            self.data_variance[cond] = tab.data_variance
            vals.append(tab.values[0]), ses.append(tab.stderr[0])
            walls.append(w)
            self.rows.append(dict(part=part, conditioning="class" if cond else "none", estimator=estimator,
                                  L=L or "", C="" if C is None else f"{C:.4g}", M=m, seed=seed,
                                  sigma=f"{s:.6g}", jstar=f"{tab.values[0]:.6g}", stderr=f"{tab.stderr[0]:.3g}",
                                  wall_s=f"{w:.2f}"))
        return np.array(vals), np.array(ses), np.array(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--queries", type=int, default=2048, help="M0: queries per sigma for every estimator")
    ap.add_argument("--target-rse", type=float, default=0.01, help="the reference's relative standard error")
    ap.add_argument("--full-max", type=int, default=65536, help="the most queries per sigma of the reference")
    ap.add_argument("--repeats", type=int, default=8, help="seeds per C in the Fig. 1c study")
    ap.add_argument("--num-sigmas", type=int, default=32)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    dataset = load_dataset(args.data, None, progress=not args.no_progress)
    grid = sigma_grid(num=args.num_sigmas)
    study = Study(dataset, not args.no_progress)
    size = dataset.images.shape[-1]
    n_classes = len(np.unique(dataset.labels)) if dataset.labels is not None else 0
    lines = [f"# J*_sigma of CIFAR-10 train (JPEG copy): full estimator vs DOL, cDOL and SNIS\n",
             f"Generated by `python docs/results/jstar_cifar10.py --queries {args.queries}` on "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; data `{Path(args.data).name}` ({dataset.num_images} images, "
             f"{list(dataset.images.shape[1:])}, fingerprint {dataset.fingerprint[:12]}). Values are per-dimension "
             f"x0 MSE on data in [-1, 1], at {len(grid)} VE sigmas ({grid[0]:.3g}..{grid[-1]:.3g}). Every subset "
             f"estimator sees M0 = {args.queries} queries per sigma (seed 0). The reference is the full "
             f"estimator, rerun with M = M0 (rse / {args.target_rse:g})^2 queries (at most {args.full_max}) "
             f"where J* > 1% of the data variance and its relative standard error at M0 was above "
             f"{args.target_rse:.0%}. `rel` is the mean and `max` the largest |estimate / reference - 1| over "
             f"the sigmas where J* > 1% of the data variance; `time` is the wall time of all sigmas. "
             f"Class-conditional: L and C per class (N = images per class).\n"]
    curves = {}
    conds = (False, True) if n_classes > 1 else (False,)
    for cond in conds:
        name = "class-conditional" if cond else "unconditional"
        v0, se0, walls0 = study.estimate("full-m0", cond, "full", grid, args.queries)
        var = study.data_variance[cond]
        ref, ref_se, ref_m, ref_walls = v0.copy(), se0.copy(), np.full(len(grid), args.queries), walls0.copy()
        for k in np.nonzero((v0 > 0.01 * var) & (se0 > args.target_rse * np.maximum(v0, 1e-30)))[0]:
            m = int(min(args.full_max, math.ceil(args.queries * (se0[k] / v0[k] / args.target_rse) ** 2)))
            ref[k:k + 1], ref_se[k:k + 1], ref_walls[k:k + 1] = study.estimate("full-ref", cond, "full", grid[k], m)
            ref_m[k] = m
        sigma_star = OptimalLossTable(grid, ref, ref_se, {"data_variance": var}).sigma_star
        mask = ref > 0.01 * var
        n = dataset.num_images / (n_classes if cond else 1)
        cols = sorted({int(np.argmin(np.abs(np.log(grid / s)))) for s in SHOWN_SIGMAS})
        lines += [f"\n## {size}x{size}, {name} (N = {dataset.num_images}"
                  f"{f', {n:.0f} per class' if cond else ''}, D = {dataset.images[0].numel()}, data variance "
                  f"{var:.4f}, sigma* = {sigma_star:.3g})\n",
                  f"sigma* (the product's): the largest grid sigma with J* < 1e-3 J*_max. Reference: M = "
                  f"{args.queries} at {int(np.sum(ref_m == args.queries))} sigmas, "
                  f"{'/'.join(str(int(m)) for m in ref_m[ref_m > args.queries])} at the "
                  f"{int(np.sum(ref_m > args.queries))} others; its largest relative standard error where J* > 1% "
                  f"of the variance is {np.max(ref_se[mask] / ref[mask]):.3f}.\n",
                  "| estimator | time (s) | rel | max | " + " | ".join(f"sigma {sigma_key(grid[c])}" for c in cols)
                  + " |", "|---|---|---|---|" + "---|" * len(cols)]

        def row(label, vals, ses, wall):
            rel = np.abs(vals[mask] / ref[mask] - 1)
            cells = " | ".join(f"{vals[c]:.4g} ± {ses[c]:.1g}" for c in cols)
            lines.append(f"| {label} | {wall:.1f} | {rel.mean():.3f} | {rel.max():.3f} | {cells} |")

        row("full (reference)", ref, ref_se, ref_walls.sum())
        row(f"full M={args.queries}", v0, se0, walls0.sum())
        curves[name] = {"full (reference)": ref}
        for label, est, L, C in subset_settings(n):
            vals, ses, walls = study.estimate("estimators", cond, est, grid, args.queries, L, C)
            row(label, vals, ses, walls.sum())
            curves[name][label] = vals
        if cond:
            continue

        # cDOL over C at ln sigma = 1.25 (Fig. 1c), against the reference there.
        r, r_se, _ = study.estimate("fig1c-ref", cond, "full", SIGMA_1C, args.full_max)
        lines += [f"\n### cDOL over C at ln sigma = 1.25 (sigma = {SIGMA_1C:.3f}), L = 1024, unconditional\n",
                  f"Reference: full estimator, M = {args.full_max}: {r[0]:.5g} ± {r_se[0]:.2g}. Each C: "
                  f"{args.repeats} seeds of M0 = {args.queries} queries; bias = mean over seeds / reference - 1, "
                  f"spread = standard deviation over seeds / reference, RMSE = sqrt(bias^2 + spread^2) "
                  f"(relative). C = 1 is DOL and C = inf is SNIS on L - 1 points.\n",
                  "| C | C L / N | mean | bias | spread | RMSE | time per run (s) |", "|---|---|---|---|---|---|---|"]
        over_c = []
        for f in (None, 1 / 16, 1 / 4, 1, 4, 16, 64, math.inf):
            est, C = ("dol", None) if f is None else ("snis", None) if f == math.inf else ("cdol", f * n / 1024)
            runs = [study.estimate("fig1c-C", cond, est, SIGMA_1C, args.queries, 1024, C, seed) for seed in
                    range(args.repeats)]
            v = np.array([x[0][0] for x in runs]) / r[0]
            bias, spread = v.mean() - 1, v.std(ddof=1)
            c_lab = "1 (DOL)" if f is None else "inf (SNIS)" if f == math.inf else f"{C:.4g}"
            cl_lab = f"{1024 / n:.3g}" if f is None else "inf" if f == math.inf else f"{f:.4g}"
            lines.append(f"| {c_lab} | {cl_lab} | {v.mean() * r[0]:.5g} | {bias:+.3f} | {spread:.3f} | "
                         f"{math.hypot(bias, spread):.3f} | {np.mean([x[2][0] for x in runs]):.2f} |")
            over_c.append((1024 / n if f is None else f, bias, spread))

        # Convergence in L (cDOL, C = 4N/L) and in M (full and cDOL L = 4096), same sigma.
        lines += [f"\n### Convergence at ln sigma = 1.25, unconditional\n",
                  f"In L: cDOL with C = 4N/L at M0 = {args.queries} (seed 0). In M: the full estimator and cDOL "
                  f"L = 4096 (seed 0); the standard error should fall as 1/sqrt(M).\n",
                  "| L | J* | rel. error | stderr | time (s) |", "|---|---|---|---|---|"]
        conv_l, conv_m = [], []
        for L in (64, 256, 1024, 4096, 16384):
            v, se, w = study.estimate("conv-L", cond, "cdol", SIGMA_1C, args.queries, L, 4 * n / L)
            lines.append(f"| {L} | {v[0]:.5g} | {v[0] / r[0] - 1:+.3f} | {se[0]:.2g} | {w[0]:.2f} |")
            conv_l.append((L, v[0] / r[0] - 1))
        lines += ["", "| M | full J* | full stderr | full time (s) | cDOL L=4096 J* | cDOL stderr | cDOL time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for m in (256, 1024, 4096, 16384):
            fv, fse, fw = study.estimate("conv-M", cond, "full", SIGMA_1C, m)
            cv, cse, cw = study.estimate("conv-M", cond, "cdol", SIGMA_1C, m, 4096, 4 * n / 4096)
            lines.append(f"| {m} | {fv[0]:.5g} | {fse[0]:.2g} | {fw[0]:.1f} | {cv[0]:.5g} | {cse[0]:.2g} | {cw[0]:.1f} |")
            conv_m.append((m, fse[0] / r[0], cse[0] / r[0]))
        curves["fig1c"] = (over_c, conv_l, conv_m)

    out = Path(args.out)
    with atomic_path(out / "jstar-cifar10.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            w.writeheader()
            w.writerows(study.rows)
    with atomic_path(out / "jstar-cifar10.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    plot(curves, grid, out / "jstar-cifar10.png")
    print((out / "jstar-cifar10.md").read_text())


def plot(curves: dict, grid: np.ndarray, path: Path) -> None:
    tables = [k for k in curves if k != "fig1c"]
    fig, axes = figure(2, 2, figsize=(10, 7.5))
    for ax, name in zip(axes[0], tables):
        ref = curves[name]["full (reference)"]
        ok = ref > 0
        for label, vals in curves[name].items():
            if label == "full (reference)" or "C=4N/L" in label or "DOL L=1024" == label or "SNIS L=1024" == label:
                ax.plot(grid[ok], vals[ok], label=label, lw=1.8 if label.startswith("full") else 1)
        ax.set(xscale="log", yscale="log", title=f"J* of CIFAR-10, {name}", xlabel="sigma", ylabel="J*_sigma")
        ax.legend(fontsize=7)
    if "fig1c" in curves:
        over_c, conv_l, conv_m = curves["fig1c"]
        ax = axes[1, 0]
        cl = np.array([c for c, *_ in over_c[:-1]])
        ax.plot(cl, [b for _, b, _ in over_c[:-1]], "o-", label="bias (relative)")
        ax.plot(cl, [s for *_, s in over_c[:-1]], "s-", label="spread over seeds (relative)")
        ax.axhline(over_c[-1][1], ls="--", color="C0", lw=0.8, label="SNIS bias")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xscale="log", xlabel="C L / N", title="cDOL over C, L = 1024, ln sigma = 1.25")
        ax.legend(fontsize=7)
        ax = axes[1, 1]
        ax.plot([m for m, *_ in conv_m], [f for _, f, _ in conv_m], "o-", label="full: stderr / J*")
        ax.plot([m for m, *_ in conv_m], [c for *_, c in conv_m], "s-", label="cDOL L=4096: stderr / J*")
        ax.plot([L for L, _ in conv_l], [abs(e) for _, e in conv_l], "^-", label="cDOL |error| vs L (x = L)")
        ax.set(xscale="log", yscale="log", xlabel="M (queries) or L (subset)", title="convergence, ln sigma = 1.25")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


if __name__ == "__main__":
    try:
        main()
    except EdmOptError as e:  # bad --data: one line, nothing written (every output goes through atomic_path)
        raise SystemExit(f"jstar_cifar10.py: {e}")
