"""Markdown tables of the claims sweep from the CSV files that `edm-opt report --csv DIR` writes.

    edm-opt report --experiment claims-fashion-mnist --out docs/results/claims-fashion-mnist.pdf \
        --csv docs/results/claims-csv
    python docs/results/claims_tables.py docs/results/claims-csv > docs/results/claims-tables.md

Four tables: every run (final reference gap, KID, FID); each (size, schedule) over seeds (mean and
run-to-run spread); each optimal run against its base schedule at the same size and seed; the held-out gap
per sigma at the last evaluation (mean over seeds). Plus the reference-total scaling fits, raw and with J*
subtracted. Gaps are per-dimension x0 MSE above J*_sigma (VE sigma), as everywhere in edm-opt.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

SIGMAS = (0.04336, 0.1209, 0.3372, 0.9401, 1.863, 3.69, 7.31, 20.38, 80.0)  # a spread of the default 32-point grid
SCHEDULES = ("edm2", "optimal/edm2", "fm", "optimal/fm")


def read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(v: str) -> float:
    return float(v) if v not in ("", "None", None) else math.nan


def seed_of(name: str) -> int:
    m = re.search(r"-s(\d+)-", name)
    return int(m.group(1)) if m else -1


def model(r: dict) -> tuple[str, int]:
    """(preset, parameter count): one network size."""
    return r["preset"], int(r["param_count"])


def fmt(v: float, spec: str = ".4f") -> str:
    return "n/a" if math.isnan(v) else format(v, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv_dir", type=Path, help="the folder of `edm-opt report --csv`")
    args = ap.parse_args()
    missing = [n for n in ("runs.csv", "per_sigma_final.csv", "fits.csv") if not (args.csv_dir / n).is_file()]
    if missing:
        ap.error(f"{args.csv_dir}: no {', '.join(missing)} (write them with `edm-opt report --csv {args.csv_dir}`)")
    every = read(args.csv_dir / "runs.csv")
    runs = [r for r in every if r["nimg"] and r["status"] == "FINISHED"]
    names = {r["run_name"] for r in runs}
    order = {s: i for i, s in enumerate(SCHEDULES)}
    runs.sort(key=lambda r: (seed_of(r["run_name"]), int(r["param_count"]), order.get(r["schedule"], 9)))
    models = sorted({model(r) for r in runs}, key=lambda m: (m[1], m[0]))  # by size
    schedules = sorted({r["schedule"] for r in runs}, key=lambda s: (order.get(s, len(order)), s))
    seeds = sorted({seed_of(r["run_name"]) for r in runs})
    out = [f"{len(runs)} finished runs (unfinished runs left out: {len(every) - len(runs)}). KID and FID: 256 "
           "generated images against 1,000 training images (small N: KID is the more reliable, FID is biased high).",
           ""]

    out += ["### Every run", "", table(
        ["run", "params", "schedule", "seed", "images", "final reference gap", "KID", "FID"],
        [[r["run_name"], f"{int(r['param_count']):,}", r["schedule"], str(seed_of(r["run_name"])),
          f"{int(r['nimg']):,}", fmt(num(r["ref_gap"])), fmt(num(r["kid"])), fmt(num(r["fid"]), ".1f")]
         for r in runs]), ""]

    cell = defaultdict(list)  # (model, schedule) -> runs over seeds
    for r in runs:
        cell[model(r), r["schedule"]].append(r)

    def stats(rs: list[dict], key: str) -> tuple[float, float, int]:
        v = np.array([num(r[key]) for r in rs])
        v = v[np.isfinite(v)]
        if not len(v):
            return math.nan, math.nan, 0
        return float(v.mean()), float(np.ptp(v) / v.mean()) if len(v) > 1 else math.nan, len(v)

    rows = []
    for m in models:
        for s in schedules:
            if (m, s) not in cell:
                continue
            g, gs, n = stats(cell[m, s], "ref_gap")
            k, ks, nk = stats(cell[m, s], "kid")
            rows.append([m[0], f"{m[1]:,}", s, str(n), fmt(g), fmt(gs, ".1%"), fmt(k), fmt(ks, ".1%"), str(nk)])
    out += ["### Over seeds: mean and run-to-run spread (max - min) / mean", "", table(
        ["preset", "params", "schedule", "seeds", "ref gap, mean", "ref gap spread", "KID, mean", "KID spread",
         "seeds with KID"], rows), ""]

    by = {(model(r), r["schedule"], seed_of(r["run_name"])): r for r in runs}
    rows = []
    optimal = [s for s in schedules if s.startswith("optimal/")]
    for m in models:
        for s in optimal:
            for seed in seeds:
                r, b = by.get((m, s, seed)), by.get((m, s.split("/", 1)[1], seed))
                if r and b:
                    rows.append([m[0], s, str(seed), fmt(num(r["ref_gap"]) / num(b["ref_gap"]), ".2f"),
                                 fmt(num(r["kid"]) / num(b["kid"]), ".2f")])
    out += ["### Optimal schedule against its own base (same size, seed and training images; < 1: optimal better)",
            "", table(["preset", "schedule", "seed", "ref gap ratio", "KID ratio"], rows), ""]

    per = defaultdict(list)  # (model, schedule, sigma) -> gaps over seeds
    jstar = {}
    for r in read(args.csv_dir / "per_sigma_final.csv"):
        if r["run_name"] not in names:
            continue
        s = float(r["sigma"])
        near = min(SIGMAS, key=lambda x: abs(math.log(x / s)))
        if abs(math.log(near / s)) < 0.01:
            per[model(r), r["schedule"], near].append(float(r["gap"]))
            jstar[near] = float(r["jstar"])
    for m in models:
        cols = [s for s in schedules if (m, s) in cell]
        rows = [[f"{s:g}", "< 1e-6" if abs(jstar.get(s, 1.0)) < 1e-6 else fmt(jstar.get(s, math.nan), ".3g")]
                + [fmt(float(np.mean(per[m, c, s])) if per[m, c, s] else math.nan) for c in cols] for s in SIGMAS]
        out += [f"### {m[0]} ({m[1]:,} parameters): held-out gap per sigma at the last evaluation "
                "(EMA weights, mean over seeds)", "", table(["sigma", "J*"] + cols, rows), ""]

    fits = defaultdict(dict)  # series -> form -> row
    for r in read(args.csv_dir / "fits.csv"):
        if r["form"] in ("raw", "subtracted"):
            fits[r["series"]][r["form"]] = r

    def fit(r: dict) -> list[str]:
        return [f"{fmt(num(r['alpha']))} [{fmt(num(r['alpha_ci_low']))}, {fmt(num(r['alpha_ci_high']))}]",
                fmt(num(r["rho"]))]

    rows = [[k, f"{num(v['raw']['jstar']):.3g}", *fit(v["raw"]), *fit(v["subtracted"]), v["raw"]["n_used"]]
            for k, v in fits.items() if {"raw", "subtracted"} <= set(v)]
    if rows:
        out += ["### Scaling on the compute frontier (all runs): J = beta f^alpha (raw) against J - J* = beta f^alpha",
                "", "alpha with its 95% bootstrap CI over runs; rho: Pearson correlation of the log-log fit.", "",
                table(["series", "J*", "raw alpha [CI]", "raw rho", "subtracted alpha [CI]", "subtracted rho",
                       "points"], rows), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
