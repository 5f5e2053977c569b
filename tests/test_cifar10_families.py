"""docs/results/cifar10_families.py on a small fixture of report CSVs and diagnose.json files, built here with
known per-sigma gaps, so each table's number can be checked against what went in."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs/results/cifar10_families.py"
SIGMAS = np.geomspace(0.002, 80, 12)
JSTAR = 0.25 * SIGMAS ** 2 / (0.25 + SIGMAS ** 2) * (SIGMAS > 1.5)  # 0 up to sigma* (grid sigma 0.6475)
PEAK = {"edm2": 1.0, "fm": 3.0, "edm": 0.5, "vp": 40.0, "ve": 0.01}  # where each family's gap peaks
HIGH = {"edm2": 0.01, "fm": 0.01, "edm": 0.01, "vp": 0.05, "ve": 0.02}  # its gap floor at sigma > 10


def family_gap(name: str, seed: int) -> np.ndarray:
    bump = 0.1 * np.exp(-0.5 * np.log(SIGMAS / PEAK[name]) ** 2)
    return bump + HIGH[name] * (SIGMAS > 10) * (1 + 0.1 * seed)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def fixture(tmp_path):
    runs, per_sigma = [], []
    diag = tmp_path / "diagnose"
    for seed in (0, 1):
        for i, name in enumerate(PEAK):
            run = f"micro-{name}-s{seed}"
            gap = family_gap(name, seed)
            loss = JSTAR + gap
            runs.append({"run_id": f"id{seed}{i}", "run_name": run, "schedule": name, "preset": "edm2-micro",
                         "param_count": 169236, "status": "FINISHED", "source": "mlflow", "nimg": 131072,
                         "flops_total": 1e15, "ref_gap": float(gap.mean()), "fid": 50.0 + 10 * i + seed,
                         "kid": 0.05 + 0.01 * i, "variant": "", "seed": seed})
            per_sigma += [{"run_id": f"id{seed}{i}", "run_name": run, "schedule": name, "preset": "edm2-micro",
                           "param_count": 169236, "status": "FINISHED", "nimg": 131072, "flops_total": 1e15,
                           "sigma": s, "jstar": j, "loss_x0": l, "gap": g, "share": 1 / len(SIGMAS)}
                          for s, j, l, g in zip(SIGMAS, JSTAR, loss, gap)]
            (diag / run).mkdir(parents=True)
            test = loss * (1 + 0.02 * (SIGMAS < 0.3) * (i + 1))  # held-out worse at low sigma only
            (diag / run / "diagnose.json").write_text(json.dumps({"sigmas": SIGMAS.tolist(), "loss_x0": loss.tolist(),
                                                                  "test_loss_x0": test.tolist()}))
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    write_csv(csv_dir / "runs.csv", runs)
    write_csv(csv_dir / "per_sigma_final.csv", per_sigma)
    rho = np.where(SIGMAS < 0.6, 0.6, -0.4)  # positive left of sigma*
    write_csv(csv_dir / "gap_fid.csv", [{"sigma": s, "pearson": r, "pearson_ci_low": r - 0.2,
                                         "pearson_ci_high": r + 0.2, "spearman": r, "n": 20, "runs": 10}
                                        for s, r in zip(SIGMAS, rho)])
    return tmp_path


def tables(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_families_tables_from_a_fixture(fixture):
    p = tables(fixture / "csv", "--diagnose", fixture / "diagnose")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("sigma* = 0.6475 ")  # the largest grid sigma with J* = 0
    for name in PEAK:  # the peak: the grid sigma nearest the bump's centre (the floor at > 10 aside)
        gap = (family_gap(name, 0) + family_gap(name, 1)) / 2
        row = next(line for line in lines if line.startswith(f"| {name} | 2 |"))
        assert f"| {SIGMAS[np.argmax(gap)]:.4g} | {gap.max():.4f} |" in row
    assert "intermediate sigma (0.3 <= sigma < 10) for 3 of 5 series (not: " in p.stdout
    high = SIGMAS > 10
    mean_high = {n: (family_gap(n, 0) + family_gap(n, 1))[high] / 2 for n in PEAK}
    vs = {r: np.exp(np.mean(np.log(mean_high["vp"] / mean_high[r]))) for r in ("edm", "edm2", "fm")}
    assert vs["edm2"] > 4  # the fixture's vp errs at high sigma
    assert f"- vp (eps prediction) against edm {vs['edm']:.2f}x, edm2 {vs['edm2']:.2f}x, fm {vs['fm']:.2f}x in the gap " \
           f"at sigma > 10" in p.stdout
    edm = next(line for line in lines if line.startswith("| edm | 2 | +"))  # the held-out table
    assert edm.startswith(f"| edm | 2 | +{2 * (list(PEAK).index('edm') + 1):.2f}% | +0.00% | +0.00% | +0.00% |")
    assert "- left of sigma*: 6 of 6 grid sigmas positive, mean rho 0.600" in p.stdout
    assert "- in [sigma*, 4 sigma*]: 0 of 2 grid sigmas positive" in p.stdout


def test_families_tables_name_a_missing_diagnosis(fixture):
    (fixture / "diagnose" / "micro-vp-s1" / "diagnose.json").unlink()
    p = tables(fixture / "csv", "--diagnose", fixture / "diagnose")
    assert p.returncode != 0 and "micro-vp-s1" in p.stderr and "--test-data" in p.stderr
    without = tables(fixture / "csv")  # no --diagnose: no held-out table, the rest unchanged
    assert without.returncode == 0 and "Held-out" not in without.stdout and "Gap vs FID" in without.stdout
