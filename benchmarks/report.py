"""Report build time for a large experiment: 100 runs x 200 logged status steps, K = 32 sigmas.

Synthetic runs (`reports.synthetic`, the MLflow naming contract) are logged into a temporary SQLite
store through `edm_opt.tracking.RunLogger` (as training logs), half `edm` and half `optimal`, ten network
sizes, FID every 20 steps on half the runs. The report reads each run's `per_sigma.json`, so to keep
the store small the per-sigma metrics are logged at the last step only (`--full-metrics` logs them at
every step, as training does: about 6 x 32 more metric rows). Prints the logging time and the build
time separately (target: build under 60 s on CPU), and the build's phases.

Usage: python benchmarks/report.py [--runs 100] [--steps 200] [--sigmas 32] [--full-metrics] [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edm_opt.diffusion import sigma_grid


def log_runs(uri: str, experiment: str, runs: int, steps: int, num_sigmas: int, full_metrics: bool) -> str:
    from edm_opt.tracking import create_run
    from reports.synthetic import SyntheticRun, log_synthetic_run

    parent = create_run(uri, experiment, "sweep")
    grid = sigma_grid(num=num_sigmas)
    for i in range(runs):
        schedule = ("edm", "optimal")[i % 2]
        size = 2 ** ((i // 2) % 10)
        run = SyntheticRun(f"{schedule}-{i:03d}", schedule, param_count=100_000 * size, flops_per_image=1e7 * size,
                           steps=steps, status_every=256, amplitude=1.0 if schedule == "edm" else 0.7,
                           fid_every=20 if i % 4 < 2 else None)
        log_synthetic_run(uri, experiment, run, grid, seed=i, parent_run_id=parent, per_sigma_history=full_metrics)
    return parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sigmas", type=int, default=32)
    ap.add_argument("--full-metrics", action="store_true", help="per-sigma metrics at every step")
    ap.add_argument("--keep", type=Path, default=None, help="write the store and the report here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
        t0 = time.perf_counter()
        parent = log_runs(uri, "bench", args.runs, args.steps, args.sigmas, args.full_metrics)
        t_log = time.perf_counter() - t0
        print(f"logged {args.runs} runs x {args.steps} steps x {args.sigmas} sigmas in {t_log:.1f} s "
              f"(includes creating the SQLite store)", flush=True)

        from reports.analysis import analyse
        from reports.build import build_report
        from reports.data import collect_experiment

        t0 = time.perf_counter()
        summary = build_report("bench", root / "report.pdf", sweep_run_id=parent, csv_dir=root / "csv", uri=uri)
        t_build = time.perf_counter() - t0
        size = (root / "report.pdf").stat().st_size
        print(f"built the report in {t_build:.1f} s: {len(summary.pages)} pages, {size / 1e6:.2f} MB, "
              f"target < 60 s: {'met' if t_build < 60 else 'MISSED'}")

        # Where the time goes (a second pass: warm caches, so it reads a bit faster).
        t0 = time.perf_counter()
        exp = collect_experiment(uri, "bench", parent)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        analyse(exp)
        t_fit = time.perf_counter() - t0
        print(f"phases: reading MLflow {t_read:.1f} s, fits {t_fit:.1f} s "
              f"(1000 + 8 x 200 run resamples x 2 forms), drawing + writing ~{t_build - t_read - t_fit:.1f} s")


if __name__ == "__main__":
    main()
