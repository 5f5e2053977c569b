"""The PDF report (reports/): built from real temporary MLflow stores, checked page by page.

Most tests share one SQLite store of synthetic runs logged through edm_opt.tracking (the naming
contract, per_sigma.json and jstar.json artifacts), including a run without artifacts (read from its
metric histories), a RUNNING run and a run with no evaluation yet. The slow test trains two tiny runs.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pypdf import PdfReader

from edm_opt import EdmOptError
from edm_opt.diagnose import gap_fid_points
from edm_opt.diffusion import sigma_grid
from edm_opt.fileio import write_json
from edm_opt.tracking import create_run, get_run, load_json_artifact, log_now
from reports.analysis import analyse
from reports.build import build_report
from reports.data import NoRunsError, collect_experiment
from reports.synthetic import SyntheticRun, log_synthetic_run, synthetic_history, synthetic_jstar
from reports.tables import fmt, fmt_r

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "report-test"
FAST = dict(bootstrap=200, sigma_bootstrap=50)  # fewer run resamples: the same pages, faster


def _runs() -> list[SyntheticRun]:
    runs = []
    for i in range(3):
        for schedule, amplitude in (("edm", 1.0), ("optimal", 0.7)):
            runs.append(SyntheticRun(f"{schedule}-{i}", schedule, param_count=100_000 * 4 ** i,
                                     flops_per_image=1e7 * 4 ** i, steps=10, amplitude=amplitude,
                                     fid_every=3 if i < 2 else None))
    return runs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep of 6 synthetic runs + one without artifacts + one RUNNING + one with no data yet."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    sweep = create_run(uri, EXPERIMENT, "sweep")
    ids = {}
    for seed, run in enumerate(_runs()):
        ids[run.name] = log_synthetic_run(uri, EXPERIMENT, run, seed=seed, parent_run_id=sweep)
    no_artifacts = SyntheticRun("edm-metrics-only", "edm", param_count=200_000, flops_per_image=2e7, steps=6,
                                fid_every=2)
    ids[no_artifacts.name] = log_synthetic_run(uri, EXPERIMENT, no_artifacts, seed=10, parent_run_id=sweep,
                                               artifacts=False)
    running = SyntheticRun("optimal-running", "optimal", param_count=200_000, flops_per_image=2e7, steps=5,
                           amplitude=0.7, status="RUNNING", fid_every=None)
    ids[running.name] = log_synthetic_run(uri, EXPERIMENT, running, seed=11, parent_run_id=sweep)
    ids["edm-just-started"] = create_run(uri, EXPERIMENT, "edm-just-started", {"edm_opt.schedule": "edm"}, sweep)
    create_run(uri, "only-a-sweep-parent", "sweep")
    return {"uri": uri, "sweep": sweep, "ids": ids, "runs": _runs() + [no_artifacts, running], "root": root}


def _pdf_text(path: Path) -> list[str]:
    return [p.extract_text() for p in PdfReader(path).pages]


def _page(texts: list[str], titles: list[str], title: str) -> str:
    return texts[titles.index(title)]


def _render(pdf: Path, out: Path) -> list[Path]:
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm not found: install Debian's poppler-utils to render the report pages")
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(pdf), str(out / "page")], check=True, timeout=120)
    return sorted(out.glob("page*.png"))


# --------------------------------------------------------------------------------------------------
# Reading the store


def test_collect_reads_artifacts_metric_histories_and_running_runs(store):
    exp = collect_experiment(store["uri"], EXPERIMENT, store["sweep"])
    by_name = {r.name: r for r in exp.runs}
    assert set(by_name) == {r.name for r in store["runs"]} | {"edm-just-started"}
    assert by_name["edm-0"].source == "per_sigma.json"
    assert by_name["edm-metrics-only"].source == "metric histories"
    assert by_name["optimal-running"].source == "metric histories"  # per_sigma.json lags a RUNNING run
    assert by_name["optimal-running"].status == "RUNNING"
    assert not by_name["edm-just-started"].has_history
    assert any("no held-out evaluation yet" in n for n in exp.notes)

    # The metric histories give back what was logged (sigma keys keep 4 significant digits).
    spec = next(r for r in store["runs"] if r.name == "edm-metrics-only")
    grid = sigma_grid(num=8)
    h = synthetic_history(spec, grid, synthetic_jstar(grid), np.random.default_rng(10))
    r = by_name["edm-metrics-only"]
    np.testing.assert_allclose(r.sigmas, grid, rtol=1e-3)
    np.testing.assert_array_equal(r.nimg, h["nimg"])
    np.testing.assert_allclose(r.loss_x0, h["loss_x0"], rtol=1e-12)
    np.testing.assert_allclose(r.ref_total, h["ref_total"], rtol=1e-12)
    assert r.fid.shape == (3, 2) and r.param_count == 200_000


def test_a_short_per_sigma_artifact_gives_way_to_the_metric_histories(tmp_path):
    """A per_sigma.json that lacks early statuses (what a run resumed before its first snapshot left,
    before the history travelled in checkpoints) must not shorten the run's curve: the report reads the
    metric histories, keeps the artifact's J* standard errors, and says so in a note."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole, short = (SyntheticRun(name, "edm", steps=6, fid_every=None) for name in ("whole", "short"))
    log_synthetic_run(uri, "short-history", whole, seed=0)
    run_id = log_synthetic_run(uri, "short-history", short, seed=1)
    grid = sigma_grid(num=8)
    h = synthetic_history(short, grid, synthetic_jstar(grid), np.random.default_rng(1))
    cut = {k: (v[2:] if isinstance(v, list) and len(v) == short.steps else v) for k, v in h.items()}
    (tmp_path / "cut").mkdir()
    log_now(uri, run_id, artifacts=[write_json(tmp_path / "cut" / "per_sigma.json", cut)])
    assert load_json_artifact(uri, run_id, "per_sigma.json")["nimg"] == h["nimg"][2:]

    exp = collect_experiment(uri, "short-history")
    by_name = {r.name: r for r in exp.runs}
    assert by_name["whole"].source == "per_sigma.json"
    r = by_name["short"]
    assert r.source == "metric histories (per_sigma.json lacks 2 statuses)"
    np.testing.assert_array_equal(r.nimg, h["nimg"])
    np.testing.assert_allclose(r.ref_total, h["ref_total"], rtol=1e-12)
    np.testing.assert_allclose(r.loss_x0, h["loss_x0"], rtol=1e-12)
    np.testing.assert_allclose(r.jstar_stderr, h["jstar_stderr"], rtol=1e-12)
    assert [n for n in exp.notes if "lacks logged statuses" in n] == [
        "1 runs read from metric histories (per_sigma.json lacks logged statuses): short"]


def test_gap_fid_points_from_store(store):
    points = gap_fid_points(store["uri"], EXPERIMENT, store["sweep"])
    with_fid = [r for r in store["runs"] if r.fid_every]
    assert len(points) == sum(r.steps // r.fid_every for r in with_fid)
    grid = sigma_grid(num=8)
    jstar = synthetic_jstar(grid)
    for spec, seed in ((store["runs"][0], 0), (store["runs"][-2], 10)):  # from per_sigma.json / from metrics
        h = synthetic_history(spec, grid, jstar, np.random.default_rng(seed))
        mine = [p for p in points if p.run_name == spec.name]
        assert [p.nimg for p in mine] == h["nimg"][spec.fid_every - 1::spec.fid_every]
        for p in mine:
            t = h["nimg"].index(p.nimg)
            got = np.array([p.gap[k] for k in sorted(p.gap, key=float)])
            np.testing.assert_allclose(got, np.array(h["loss_x0"][t]) - jstar, rtol=1e-9, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# The report


def test_report_pages_numbers_csv_and_rendering(store, tmp_path):
    out = tmp_path / "report.pdf"
    s = build_report(EXPERIMENT, out, sweep_run_id=store["sweep"], csv_dir=tmp_path / "csv", uri=store["uri"], **FAST)

    assert s.pages == ["Title", "Optimal loss J*_sigma", "Per-sigma gap at each run's last evaluation",
                       "Gap over training (heat maps)", "Scaling of the reference total", "Scaling per sigma",
                       "Fit table per sigma", "Schedules at equal compute", "FID and KID", "Per-sigma gap vs FID",
                       "Runs", "Summary"]
    texts = _pdf_text(out)
    assert len(texts) == len(s.pages)
    assert s.runs == 9 and s.runs_with_data == 8 and s.runs_with_fid == 5

    # The reference-total fits, as the table prints them, on the scaling page and in the summary.
    raw, sub, free = s.reference.fits
    assert sub.alpha < raw.alpha < 0 and abs(sub.rho) > 0.99
    assert not np.isnan(sub.alpha_ci[0])  # 8 runs: run-resampling CIs
    scaling = _page(texts, s.pages, "Scaling of the reference total")
    for v in (fmt(raw.alpha), fmt(sub.alpha), fmt(sub.alpha_ci[0]), fmt(sub.beta), fmt_r(sub.rho), fmt_r(sub.r2)):
        assert v in scaling
    assert "free floor" in scaling and fmt(free.c) in scaling
    assert fmt(sub.alpha) in _page(texts, s.pages, "Summary")
    table = _page(texts, s.pages, "Fit table per sigma")
    assert all(fmt(f.fits.subtracted.alpha) in table for f in s.sigma_fits)
    assert len(s.sigma_fits) == 8

    # Schedules: optimal was logged with a 0.7x gap, so it is lower at equal compute.
    (cmp,) = s.comparisons
    assert (cmp.schedule, cmp.baseline) == ("optimal", "edm") and cmp.gap_ratio < 1
    assert "optimal frontier reaches a lower reference gap than edm" in " ".join(s.summary)

    title = texts[0]
    assert EXPERIMENT in title and "9 training runs" in title and "synthetic0000" in title
    assert "RUNNING (2)" in title  # the run logged as RUNNING and the one just started
    runs_page = _page(texts, s.pages, "Runs")
    assert all(r.name in runs_page for r in store["runs"]) and "edm-just-started" in runs_page
    assert s.gap_fid_points == 3 + 3 + 3 + 3 + 3 and len(s.gap_fid) == 8

    # CSV: the per-sigma tables and the fit table.
    with open(tmp_path / "csv" / "fits.csv") as fh:
        rows = list(csv.DictReader(fh))
    ref = next(r for r in rows if r["series"] == "reference total" and r["form"] == "subtracted")
    assert float(ref["alpha"]) == pytest.approx(sub.alpha, rel=1e-12)
    with open(tmp_path / "csv" / "per_sigma_final.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8 * 8  # runs with data x sigmas
    assert {p.name for p in s.csv_files} == {"per_sigma_final.csv", "fits.csv", "runs.csv", "gap_fid.csv"}

    # docs/results/claims_tables.py turns the CSVs into the markdown tables of docs/results.
    md = subprocess.run([sys.executable, str(REPO / "docs/results/claims_tables.py"), str(tmp_path / "csv")],
                        capture_output=True, text=True, check=True, timeout=60).stdout
    assert "7 finished runs (unfinished runs left out: 2)" in md  # 6 + metrics-only; RUNNING, just started
    assert all(f"| {r.name} |" in md for r in store["runs"][:-1])
    raw_row = next(r for r in rows if r["series"] == "reference total" and r["form"] == "raw")
    assert f"| reference total | {float(ref['jstar']):.3g} | {float(raw_row['alpha']):.4f} [" in md
    assert f"| {float(ref['alpha']):.4f} [" in md  # the subtracted fit beside it
    assert "| synthetic | 100,000 | edm | 1 |" in md and "| synthetic | 200,000 | edm | 1 |" in md  # over seeds, per schedule

    # Logged as an artifact of the sweep run.
    art = get_run(store["uri"], store["sweep"]).artifact_uri.removeprefix("file://")
    assert (Path(art) / "report.pdf").read_bytes() == out.read_bytes()
    assert (Path(art) / "report-csv" / "fits.csv").exists()

    pngs = _render(out, tmp_path)
    assert len(pngs) == len(s.pages) and all(p.stat().st_size > 1000 for p in pngs)


def test_report_is_byte_identical_when_built_twice(store, tmp_path):
    a = build_report(EXPERIMENT, tmp_path / "a.pdf", uri=store["uri"], **FAST)
    b = build_report(EXPERIMENT, tmp_path / "b.pdf", uri=store["uri"], **FAST)
    assert a.pages == b.pages
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()


def test_no_runs_is_a_clear_error(store, tmp_path):
    with pytest.raises(NoRunsError, match="only-a-sweep-parent"):
        build_report("only-a-sweep-parent", tmp_path / "r.pdf", uri=store["uri"])
    with pytest.raises(EdmOptError, match="no-such-experiment"):
        build_report("no-such-experiment", tmp_path / "r.pdf", uri=store["uri"])
    assert not (tmp_path / "r.pdf").exists()


def test_optimal_on_two_bases_is_two_series_each_against_its_base(tmp_path):
    """The claims sweep's layout: optimal on edm2 and optimal on fm are neither pooled nor compared with
    the other base. Logged gaps: optimal/edm2 at 0.7x edm2, optimal/fm at 1.3x fm, fm at 1.2x edm2."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for i in range(2):
        for schedule, base, amplitude in (("edm2", None, 1.0), ("optimal", "edm2", 0.7), ("fm", None, 1.2),
                                          ("optimal", "fm", 1.2 * 1.3)):
            log_synthetic_run(uri, "two-bases", SyntheticRun(f"{schedule}-{base}-{i}", schedule, 100_000 * 4 ** i,
                              1e7 * 4 ** i, steps=6, amplitude=amplitude, fid_every=None, base_schedule=base),
                              seed=i)
    exp = collect_experiment(uri, "two-bases")
    assert exp.schedules == ["edm2", "fm", "optimal/edm2", "optimal/fm"]
    a = analyse(exp, bootstrap=0, sigma_bootstrap=0, sigma_panels=2)
    ratio = {(c.schedule, c.baseline): c.gap_ratio for c in a.comparisons}
    assert set(ratio) == {("fm", "edm2"), ("optimal/edm2", "edm2"), ("optimal/fm", "fm")}
    assert ratio["optimal/edm2", "edm2"] == pytest.approx(0.7, rel=0.02)
    assert ratio["optimal/fm", "fm"] == pytest.approx(1.3, rel=0.02)
    assert ratio["fm", "edm2"] == pytest.approx(1.2, rel=0.02)

    # One base only: the series keeps the plain name and is still compared with its own base.
    uri1 = f"sqlite:///{tmp_path / 'one.db'}"
    for schedule, base, amplitude in (("edm", None, 1.0), ("edm2", None, 0.9), ("optimal", "edm2", 0.9 * 0.8)):
        log_synthetic_run(uri1, "one-base", SyntheticRun(schedule, schedule, steps=6, amplitude=amplitude,
                                                         fid_every=None, base_schedule=base))
    exp1 = collect_experiment(uri1, "one-base")
    assert exp1.schedules == ["edm", "edm2", "optimal"]
    a1 = analyse(exp1, bootstrap=0, sigma_bootstrap=0, sigma_panels=2)
    ratio1 = {(c.schedule, c.baseline): c.gap_ratio for c in a1.comparisons}
    assert set(ratio1) == {("edm2", "edm"), ("optimal", "edm2")}
    assert ratio1["optimal", "edm2"] == pytest.approx(0.8, rel=0.02)


def test_single_run_without_fid_and_too_few_points(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_synthetic_run(uri, "single", SyntheticRun("edm-only", steps=2, fid_every=None))
    s = build_report("single", tmp_path / "r.pdf", csv_dir=tmp_path / "csv", uri=uri, **FAST)
    texts = _pdf_text(tmp_path / "r.pdf")
    assert len(texts) == len(s.pages) == 12
    fid = _page(texts, s.pages, "FID and KID")
    assert "No FID logged for any run" in fid
    assert any("no run has FID" in m for m in s.missing)
    assert s.reference.fits is None and "only 2 logged points" in s.reference.note
    assert "only 2 logged points" in _page(texts, s.pages, "Scaling of the reference total")
    assert "Only one schedule" in _page(texts, s.pages, "Schedules at equal compute")
    assert "Missing: no run has FID" in " ".join(s.summary)
    with open(tmp_path / "csv" / "fits.csv") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 1 + 9 and {len(r) for r in rows} == {len(rows[0])}  # no fits: one row per series
    assert rows[1][0] == "reference total" and "only 2 logged points" in rows[1][-1]
    assert len(_render(tmp_path / "r.pdf", tmp_path)) == 12


# --------------------------------------------------------------------------------------------------
# Two real tiny training runs


@pytest.mark.slow
def test_report_from_two_real_training_runs(tmp_path):
    env = {**os.environ, "EDM_OPT_CACHE": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    for schedule in ("edm", "optimal"):
        subprocess.run([sys.executable, str(REPO / "runners" / "train.py"), "--preset", "edm2-nano",
                        "--schedule", schedule, "--duration", "2Ki", "--status-every", "512", "--snapshot-every",
                        "2Ki", "--batch", "64", "--sigmas", "0.002:80:8", "--heldout-per-sigma", "16",
                        "--experiment", "real"], cwd=tmp_path, env=env, check=True, timeout=1200,
                       capture_output=True)
    s = build_report("real", tmp_path / "real.pdf", csv_dir=tmp_path / "csv",
                     uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **FAST)
    texts = _pdf_text(tmp_path / "real.pdf")
    assert len(texts) == len(s.pages) == 12
    assert s.runs == s.runs_with_data == 2 and s.runs_with_fid == 0
    exp = collect_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "real")
    assert all(r.source == "per_sigma.json" and list(r.nimg) == [512, 1024, 1536, 2048] for r in exp.runs)
    assert {r.schedule for r in exp.runs} == {"edm", "optimal"}
    assert "digits" in texts[0] and "cdol" in texts[0]
    scaling = _page(texts, s.pages, "Scaling of the reference total")
    if s.reference.fits is not None and not np.isnan(s.reference.fits.subtracted.alpha):
        assert fmt(s.reference.fits.subtracted.alpha) in scaling
    assert "No FID logged" in _page(texts, s.pages, "FID and KID")
    assert len(_render(tmp_path / "real.pdf", tmp_path)) == 12
