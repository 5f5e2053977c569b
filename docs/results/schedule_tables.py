"""Markdown tables of the schedule study (docs/results/schedule.md) from the CSVs of `edm-opt report --csv DIR`.

    edm-opt report --experiment schedule-variants-fashion-mnist --out variants.pdf --csv variants-csv
    python docs/results/schedule_tables.py variants-csv > docs/results/schedule-stage1.md
    python docs/results/schedule_tables.py docs/results/schedule-stage2-csv/* > docs/results/schedule-stage2.md

Several folders are merged: a study that runs over several sittings (stage 2) keeps one folder of report CSVs per
sitting. A run finished in two folders must have the same name; the later folder's row wins.

Every run (final reference gap, KID, FID); each (size, series) over seeds against its own base and against
edm2 (ratios per seed, then their mean over seeds); the per-sigma gap ratios to edm2 by band of the grid, their
worst grid sigma and the band [sigma*, 4 sigma*]; each band's share of the training signal; and the issue's bar,
row by row. Gaps are per-dimension x0 MSE above J*_sigma (VE sigma), as everywhere in edm-opt; ratios below 1
favour the series.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

BANDS = ((0.0, 0.3), (0.3, 2.0), (2.0, 10.0), (10.0, math.inf))  # edm_opt.schedule.BANDS
BAND_NAMES = ("sigma < 0.3", "0.3-2", "2-10", "> 10")
BASES = ("edm2", "fm")


def read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def num(v) -> float:
    return float(v) if v not in ("", "None", None) else math.nan


def fmt(v: float, spec: str = ".4f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, spec)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def base_of(series: str) -> str:
    """`optimal[floor]/fm` -> fm; a base schedule is its own base."""
    return series.rsplit("/", 1)[1] if series.startswith("optimal") and "/" in series else series


def geomean(x) -> float:
    x = np.asarray([v for v in x if v > 0 and math.isfinite(v)], dtype=np.float64)
    return float(np.exp(np.log(x).mean())) if x.size else math.nan


class Study:
    """The runs of one or more reports, keyed by (preset, series, seed)."""

    def __init__(self, csv_dirs: list[Path]):
        self.runs = {}
        self.per_sigma = defaultdict(dict)  # run name -> sigma -> row
        for csv_dir in csv_dirs:
            missing = [n for n in ("runs.csv", "per_sigma_final.csv") if not (csv_dir / n).is_file()]
            if missing:
                raise SystemExit(f"{csv_dir}: no {', '.join(missing)}; write them with "
                                 f"`edm-opt report --csv {csv_dir}`")
            for r in read(csv_dir / "runs.csv"):
                if r["nimg"] in ("", "None") or r["status"] != "FINISHED":  # a stopped or running cell: no result
                    continue
                key = (r["preset"], r["schedule"], int(num(r["seed"])) if r["seed"] not in ("", "None") else -1)
                if key in self.runs and self.runs[key]["name"] != r["run_name"]:
                    raise SystemExit(f"{csv_dir / 'runs.csv'}: {key} is run {r['run_name']} here and "
                                     f"{self.runs[key]['name']} in an earlier folder; merge one study only")
                self.runs[key] = {"name": r["run_name"], "ref_gap": num(r["ref_gap"]), "kid": num(r["kid"]),
                                  "fid": num(r["fid"]), "nimg": int(r["nimg"]), "params": int(r["param_count"])}
            for r in read(csv_dir / "per_sigma_final.csv"):
                self.per_sigma[r["run_name"]][num(r["sigma"])] = r
        if not self.runs:
            raise SystemExit(f"{', '.join(map(str, csv_dirs))}: no finished run")
        first = next(iter(self.per_sigma.values()))
        self.sigmas = np.array(sorted(first))
        jstar = np.array([num(first[s]["jstar"]) for s in self.sigmas])
        below = np.nonzero(jstar < 1e-3 * jstar.max())[0]
        self.sigma_star = float(self.sigmas[below[-1]]) if below.size else float(self.sigmas[0])
        self.presets = sorted({k[0] for k in self.runs}, key=lambda p: self.runs[next(k for k in self.runs
                                                                                   if k[0] == p)]["params"])
        self.series = sorted({k[1] for k in self.runs}, key=lambda s: (base_of(s) != "edm2", s != base_of(s), s))
        self.seeds = sorted({k[2] for k in self.runs})

    def per_sigma_of(self, key, column: str) -> np.ndarray:
        rows = self.per_sigma[self.runs[key]["name"]]
        return np.array([num(rows[s][column]) if s in rows else math.nan for s in self.sigmas])

    def pairs(self, preset: str, series: str, base: str):
        """(run key, base run key) for each seed both have."""
        return [((preset, series, s), (preset, base, s)) for s in self.seeds
                if (preset, series, s) in self.runs and (preset, base, s) in self.runs]

    def ratio(self, preset: str, series: str, base: str, metric: str) -> float:
        """Mean over seeds of the per-seed ratio of `metric` to the base's."""
        r = [self.runs[a][metric] / self.runs[b][metric] for a, b in self.pairs(preset, series, base)]
        return float(np.mean(r)) if r else math.nan

    def sigma_ratios(self, preset: str, series: str, base: str) -> np.ndarray:
        """Per grid sigma: the mean over seeds of gap / base gap."""
        r = [self.per_sigma_of(a, "gap") / self.per_sigma_of(b, "gap") for a, b in self.pairs(preset, series, base)]
        return np.nanmean(np.array(r), axis=0) if r else np.full(self.sigmas.shape, math.nan)

    def bands(self) -> list[np.ndarray]:
        """Masks over the grid: one per band of BANDS."""
        return [(self.sigmas >= lo) & (self.sigmas < hi) for lo, hi in BANDS]

    def near_star_mask(self, sigmas: np.ndarray) -> np.ndarray:
        """sigma in [sigma*, 4 sigma*]."""
        return (sigmas >= self.sigma_star * (1 - 1e-9)) & (sigmas <= 4 * self.sigma_star)

    def band_ratios(self, ratios: np.ndarray) -> list[float]:
        return [geomean(ratios[m]) for m in self.bands()]

    def near_star(self, ratios: np.ndarray) -> float:
        return geomean(ratios[self.near_star_mask(self.sigmas)])

    def spread(self, preset: str, series: str, metric: str) -> float:
        """Seed-to-seed spread: (max - min) / mean over the seeds."""
        v = [self.runs[(preset, series, s)][metric] for s in self.seeds if (preset, series, s) in self.runs]
        return (max(v) - min(v)) / np.mean(v) if len(v) > 1 else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv_dirs", type=Path, nargs="+", help="folders of `edm-opt report --csv` (merged)")
    st = Study(ap.parse_args().csv_dirs)
    out = [f"sigma* = {st.sigma_star:.4g} (largest grid sigma with J* < 1e-3 J*_max); seeds {st.seeds}.", ""]

    out += ["### Every run", ""]
    rows = [[p, s, str(seed), st.runs[(p, s, seed)]["name"], fmt(st.runs[(p, s, seed)]["ref_gap"]),
             fmt(st.runs[(p, s, seed)]["kid"], ".5f"), fmt(st.runs[(p, s, seed)]["fid"], ".2f")]
            for p in st.presets for s in st.series for seed in st.seeds if (p, s, seed) in st.runs]
    out += [table(["preset", "series", "seed", "run", "ref gap", "KID", "FID"], rows), ""]

    out += ["### Each series over seeds, against its base and against edm2 (mean of per-seed ratios)", ""]
    rows = []
    for p in st.presets:
        for s in st.series:
            keys = [(p, s, seed) for seed in st.seeds if (p, s, seed) in st.runs]
            if not keys:
                continue
            mean = {m: float(np.mean([st.runs[k][m] for k in keys])) for m in ("ref_gap", "kid", "fid")}
            own = base_of(s)
            rows.append([p, s, str(len(keys)), fmt(mean["ref_gap"]), fmt(mean["kid"], ".5f"), fmt(mean["fid"], ".2f"),
                         f"{fmt(100 * st.spread(p, s, 'ref_gap'), '.1f')}% / {fmt(100 * st.spread(p, s, 'kid'), '.1f')}%"
                         if len(keys) > 1 else "n/a (1 seed)",
                         fmt(st.ratio(p, s, own, "ref_gap"), ".3f") if s != own else "",
                         fmt(st.ratio(p, s, own, "kid"), ".3f") if s != own else "",
                         fmt(st.ratio(p, s, "edm2", "ref_gap"), ".3f"), fmt(st.ratio(p, s, "edm2", "kid"), ".3f"),
                         fmt(st.ratio(p, s, "edm2", "fid"), ".3f")])
    out += [table(["preset", "series", "seeds", "ref gap", "KID", "FID", "seed spread (gap / KID)",
                   "gap / own base", "KID / own base", "gap / edm2", "KID / edm2", "FID / edm2"], rows), ""]

    out += ["### Per-sigma gap against edm2: geometric mean of the ratio over each band's grid sigmas", ""]
    rows = []
    for p in st.presets:
        for s in st.series:
            if s == "edm2" or not st.pairs(p, s, "edm2"):
                continue
            r = st.sigma_ratios(p, s, "edm2")
            worst = int(np.nanargmax(r)) if np.isfinite(r).any() else None
            rows.append([p, s, *[fmt(v, ".3f") for v in st.band_ratios(r)], fmt(st.near_star(r), ".3f"),
                         "n/a" if worst is None else f"{r[worst]:.3f} at {st.sigmas[worst]:.4g}"])
    out += [table(["preset", "series", *BAND_NAMES, "[sigma*, 4 sigma*]", "worst grid sigma"], rows), ""]

    out += ["### Share of the training signal per band (final status, mean over seeds)", ""]
    rows = []
    for p in st.presets:
        for s in st.series:
            shares = [st.per_sigma_of((p, s, seed), "share") for seed in st.seeds if (p, s, seed) in st.runs]
            if not shares:  # a series not (yet) run at this size
                continue
            mean = np.nanmean(np.array(shares), axis=0)
            rows.append([p, s, *[fmt(float(np.nansum(mean[m])), ".3f") for m in st.bands()]])
    out += [table(["preset", "series", *BAND_NAMES], rows), ""]

    out += ["### The bar (issue 17), per optimal series", "",
            "On edm2: gap ratio <= 1.03, KID ratio <= 1.10, no grid sigma above 1.25x, [sigma*, 4 sigma*] >= 3% below "
            "(stage 2). On fm: >= 10% better than fm in KID and reference gap.", ""]
    rows = []
    for p in st.presets:
        for s in st.series:
            own = base_of(s)
            if not s.startswith("optimal") or not st.pairs(p, s, own):
                continue
            r = st.sigma_ratios(p, s, own)
            checks = [st.ratio(p, s, own, "ref_gap"), st.ratio(p, s, own, "kid"), float(np.nanmax(r)),
                      st.near_star(r)]
            if own == "edm2":
                ok = [checks[0] <= 1.03, checks[1] <= 1.10, checks[2] <= 1.25, checks[3] <= 0.97]
            else:
                ok = [checks[0] <= 0.90, checks[1] <= 0.90, True, True]
            rows.append([p, s, *[fmt(v, ".3f") for v in checks], "yes" if all(ok) else
                         "no (" + ", ".join(n for n, good in zip(("gap", "KID", "max sigma", "near sigma*"), ok)
                                            if not good) + ")"])
    out += [table(["preset", "series", "gap / base", "KID / base", "max per-sigma ratio", "[sigma*, 4 sigma*]",
                   "passes"], rows)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
