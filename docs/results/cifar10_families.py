"""Markdown tables of the family diagnosis on CIFAR-10 (docs/results/cifar10.md, issue 21 items 3-4) from the CSVs of
`edm-opt report --csv DIR` and the `diagnose.json` of each run.

    edm-opt report --experiment cifar10-edm2-micro --out cifar10-edm2-micro.pdf --csv cifar10-csv
    for run in runs/cifar10-edm2-micro/edm2-micro-*; do
        edm-opt diagnose $run --test-data data/cifar10-heldout5k.zip --out diagnose/$(basename $run)
    done
    python docs/results/cifar10_families.py cifar10-csv --diagnose diagnose > docs/results/cifar10-families.md

Per series (a family's own loss, or an optimal schedule on one): the final per-sigma gap J_sigma(theta) - J*_sigma
(per-dimension x0 MSE, VE sigma) averaged over seeds, by band of the grid and where it peaks; the paper's two
findings checked by number (the gap is largest at intermediate sigma; eps-prediction models, vp and ve, have large
errors at high sigma); held-out minus training loss per band (the generalisation check, from diagnose.json); and the
correlation of the gap with FID per sigma with its run-resampling 95% interval (gap_fid.csv).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from schedule_tables import BAND_NAMES, Study, fmt, geomean, num, read, table  # noqa: E402

EPS_PREDICTION = ("vp", "ve")  # EDM's VP and VE losses: the network predicts eps (method.md, schedules)
X0_FAMILIES = ("edm", "edm2", "fm")




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv_dirs", type=Path, nargs="+", help="folders of `edm-opt report --csv` (merged)")
    ap.add_argument("--diagnose", type=Path, default=None,
                    help="folder of `edm-opt diagnose --test-data ... --out DIR/<run name>` outputs")
    args = ap.parse_args()
    st = Study(args.csv_dirs)
    masks = st.bands()
    runs_of = {s: [k for k in st.runs if k[1] == s] for s in st.series}  # (preset, series, seed) keys, all seeds
    out = [f"sigma* = {st.sigma_star:.4g} (largest grid sigma with J* < 1e-3 J*_max); seeds {st.seeds}; "
           f"presets {', '.join(st.presets)}.", ""]

    # 1. each series: sample quality and where its gap sits
    gaps = {s: np.nanmean([st.per_sigma_of(k, "gap") for k in runs_of[s]], axis=0) for s in st.series}
    out += ["### Each series (means over seeds): final reference gap, KID, FID, mean gap per band, its peak", ""]
    rows = []
    for s in st.series:
        keys = runs_of[s]
        g = gaps[s]
        peak = int(np.nanargmax(g))
        rows.append([s, str(len(keys)), *[fmt(float(np.mean([st.runs[k][m] for k in keys])), f)
                                          for m, f in (("ref_gap", ".4f"), ("kid", ".5f"), ("fid", ".2f"))],
                     *[fmt(float(np.nanmean(g[m])), ".4f") for m in masks], f"{st.sigmas[peak]:.4g}",
                     fmt(float(g[peak]), ".4f")])
    out += [table(["series", "seeds", "ref gap", "KID", "FID", *[f"gap {b}" for b in BAND_NAMES], "peak sigma",
                   "gap at peak"], rows), ""]

    # 2. the paper's findings, by number
    out += ["### The paper's findings", ""]
    inter = [s for s in st.series if 0.3 <= st.sigmas[int(np.nanargmax(gaps[s]))] < 10.0]
    out.append(f"- The gap peaks at intermediate sigma (0.3 <= sigma < 10) for {len(inter)} of {len(st.series)} "
               f"series" + (f" (not: {', '.join(s for s in st.series if s not in inter)})"
                            if len(inter) < len(st.series) else "") + ".")
    ref = [s for s in X0_FAMILIES if s in gaps]
    high = masks[3]
    for s in EPS_PREDICTION:
        if s in gaps and ref:
            ratios = [geomean(gaps[s][high] / gaps[r][high]) for r in ref]
            out.append(f"- {s} (eps prediction) against " + ", ".join(f"{r} {fmt(v, '.2f')}x" for r, v in
                                                                     zip(ref, ratios))
                       + " in the gap at sigma > 10 (geometric mean over the band's grid sigmas).")
    out.append("")

    # 3. generalisation: held-out against training loss per band
    if args.diagnose is not None:
        rows = []
        for s in st.series:
            rel = []
            for k in runs_of[s]:
                path = args.diagnose / st.runs[k]["name"] / "diagnose.json"
                if not path.is_file():
                    raise SystemExit(f"{path}: missing; run `edm-opt diagnose RUN --test-data ... --out "
                                     f"{args.diagnose}/{st.runs[k]['name']}`")
                d = json.loads(path.read_text())
                if "test_loss_x0" not in d:
                    raise SystemExit(f"{path}: no test_loss_x0; diagnose it with --test-data")
                if not np.allclose(d["sigmas"], st.sigmas, rtol=1e-4):
                    raise SystemExit(f"{path}: its sigma grid is not the report's")
                rel.append(np.array(d["test_loss_x0"]) / np.array(d["loss_x0"]) - 1)
            r = np.mean(rel, axis=0)
            rows.append([s, str(len(rel)), *[fmt(100 * float(np.mean(r[m])), "+.2f") + "%" for m in masks],
                         fmt(100 * float(np.max(np.abs(r))), ".2f") + "%"])
        out += ["### Held-out minus training loss, relative to the training loss (diagnose --test-data)", ""]
        out += [table(["series", "runs", *BAND_NAMES, "largest |difference|"], rows), ""]

    # 4. gap against FID per sigma
    found = [d / "gap_fid.csv" for d in args.csv_dirs if (d / "gap_fid.csv").is_file()]
    if found:
        corr = read(found[-1])
        out += [f"### Gap vs FID per sigma ({found[-1].parent.name}/gap_fid.csv; 95% interval resampling runs)", ""]
        out += [table(["sigma", "Pearson", "95% CI", "Spearman", "points", "runs"],
                      [[f"{num(c['sigma']):.4g}", fmt(num(c["pearson"]), ".3f"),
                        f"[{fmt(num(c['pearson_ci_low']), '.3f')}, {fmt(num(c['pearson_ci_high']), '.3f')}]",
                        fmt(num(c["spearman"]), ".3f"), c["n"], c["runs"]] for c in corr]), ""]
        sig = np.array([num(c["sigma"]) for c in corr])
        rho = np.array([num(c["pearson"]) for c in corr])
        near = st.near_star_mask(sig)
        for name, m in (("left of sigma*", ~near & (sig < st.sigma_star)), ("in [sigma*, 4 sigma*]", near),
                        ("above 4 sigma*", ~near & (sig > st.sigma_star))):
            v = rho[m & np.isfinite(rho)]
            out.append(f"- {name}: {int((v > 0).sum())} of {v.size} grid sigmas positive, mean rho "
                       f"{fmt(float(v.mean()) if v.size else math.nan, '.3f')} (paper: positive left of sigma*, "
                       f"negative near it).")
    print("\n".join(out))


if __name__ == "__main__":
    main()
