"""The PDF report (reports/): built from real temporary MLflow stores, checked page by page.

Most tests share one SQLite store of synthetic runs logged through edm_opt.tracking (the naming
contract, per_sigma.json and jstar.json artifacts), including a run without artifacts (read from its
metric histories), a RUNNING run and a run with no evaluation yet. Others log optimal-schedule variants
(series labels, comparisons with their own base) and runs from before loss shares existed. The slow test
trains two tiny runs.
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
from edm_opt.gap_fid import gap_fid_points
from edm_opt.diffusion import sigma_grid
from edm_opt.fileio import write_json
from edm_opt.tracking import create_run, get_run, load_json_artifact, log_now
from reports.analysis import analyse, baseline_schedule
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
    np.testing.assert_allclose(r.share, h["share"], rtol=1e-12)  # from sched/share_sigma_<s> histories

    # Shares from per_sigma.json; the variant and params of the runs (optimal logged before variants: paper).
    h0 = synthetic_history(store["runs"][0], grid, synthetic_jstar(grid), np.random.default_rng(0))
    assert by_name["edm-0"].share.shape == (10, 8)
    np.testing.assert_allclose(by_name["edm-0"].share, h0["share"], rtol=1e-12)
    np.testing.assert_allclose(by_name["edm-0"].share.sum(axis=1), 1.0, rtol=1e-12)
    assert by_name["optimal-0"].variant == "paper" and by_name["optimal-running"].variant == "paper"
    assert by_name["edm-0"].variant is None and by_name["edm-0"].params["opt_variant"] == "None"
    assert by_name["optimal-0"].params["seed"] == "1" and by_name["edm-metrics-only"].params["seed"] == "10"
    assert {r.schedule for r in exp.runs} == {"edm", "optimal"}  # one variant: the labels of before


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
                       "Gap over training (heat maps)", "Loss shares and gaps per sigma",
                       "Scaling of the reference total", "Scaling per sigma",
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
    assert "Loss shares and gaps per sigma" in title  # in the contents
    shares = _page(texts, s.pages, "Loss shares and gaps per sigma")
    assert "Loss shares and gaps per sigma" in shares and "No run has loss shares" not in shares
    assert "optimal / edm (means, no seed pair)" in shares and "band edges sigma = 0.3, 2, 10" in shares
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
        per_sigma = list(csv.DictReader(fh))
    assert len(per_sigma) == 8 * 8  # runs with data x sigmas
    assert list(per_sigma[0])[-2:] == ["gap", "share"]
    share_sum: dict[str, float] = {}
    for row in per_sigma:
        assert float(row["share"]) > 0 and float(row["gap"]) == pytest.approx(
            float(row["loss_x0"]) - float(row["jstar"]), rel=1e-9, abs=1e-15)
        share_sum[row["run_name"]] = share_sum.get(row["run_name"], 0.0) + float(row["share"])
    assert len(share_sum) == 8 and all(v == pytest.approx(1.0, rel=1e-9) for v in share_sum.values())
    grid = sigma_grid(num=8)
    h = synthetic_history(store["runs"][0], grid, synthetic_jstar(grid), np.random.default_rng(0))
    got = [float(row["share"]) for row in per_sigma if row["run_name"] == "edm-0"]
    np.testing.assert_allclose(got, h["share"][-1], rtol=1e-12)
    with open(tmp_path / "csv" / "runs.csv") as fh:
        runs_csv = {r["run_name"]: r for r in csv.DictReader(fh)}
    assert list(next(iter(runs_csv.values())))[-3:] == ["kid", "variant", "seed"]
    assert (runs_csv["optimal-2"]["variant"], runs_csv["optimal-2"]["seed"]) == ("paper", "5")
    assert (runs_csv["edm-0"]["variant"], runs_csv["edm-0"]["seed"]) == ("", "0")
    assert runs_csv["edm-just-started"]["seed"] == ""  # no params logged
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


VARIANT_RUNS = (  # (schedule, base, variant, params, gap relative to the base's, expected series label)
    ("edm2", None, None, {}, 1.0, "edm2"),
    ("optimal", "edm2", "floor", {"opt_gamma": 0.5, "opt_clip_lo": 0.25}, 0.8, "optimal[floor, gamma=0.5]/edm2"),
    ("optimal", "edm2", "floor", {"opt_gamma": 1.0, "opt_clip_lo": 0.25}, 0.9, "optimal[floor, gamma=1]/edm2"),
    ("optimal", "edm2", "base-below", {"opt_gamma": 1.0, "opt_tau": 0.25}, 0.7, "optimal[base-below]/edm2"),
    ("fm", None, None, {}, 1.2, "fm"),  # relative to edm2, the baseline of the non-optimal series
    ("optimal", "fm", "floor", {"opt_gamma": 1.0, "opt_clip_lo": 0.25}, 1.1, "optimal[floor, gamma=1]/fm"),
)


def test_variants_are_series_each_against_its_own_base(tmp_path):
    """Variants and differing constants are separate series, named by what differs, each compared with its own
    base on the schedule page (frontiers) and on the shares page (final gap per sigma, runs paired by preset and
    seed). Two sizes, each its own preset; seeds 3 and 4 at each, so every run has exactly one partner."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    amplitude = {"edm2": 1.0, "fm": 1.2}
    noise = 0
    for i in range(2):
        for seed in (3, 4):
            for schedule, base, variant, params, rel, label in VARIANT_RUNS:
                log_synthetic_run(uri, "variants", SyntheticRun(
                    f"{label}-p{i}-s{seed}", schedule, 100_000 * 4 ** i, 1e7 * 4 ** i, steps=4, fid_every=None,
                    amplitude=rel * amplitude.get(base, 1.0), base_schedule=base, variant=variant, params=params,
                    seed=seed, preset=f"p{i}"), seed=noise)
                noise += 1
    expected = {(label, base or "edm2"): rel for _, base, _, _, rel, label in VARIANT_RUNS[1:]}
    exp = collect_experiment(uri, "variants")
    assert exp.schedules == sorted(label for *_, label in VARIANT_RUNS)
    assert {r.variant for r in exp.runs if r.schedule.startswith("optimal")} == {"floor", "base-below"}
    assert all(r.variant is None for r in exp.runs if not r.schedule.startswith("optimal"))
    assert baseline_schedule(exp.schedules) == "edm2"
    assert baseline_schedule([label for *_, label in VARIANT_RUNS if label.startswith("optimal")]) is None
    a = analyse(exp, bootstrap=0, sigma_bootstrap=0, sigma_panels=2)
    ratio = {(c.schedule, c.baseline): c.gap_ratio for c in a.comparisons}
    assert set(ratio) == set(expected)
    for key, rel in expected.items():
        assert ratio[key] == pytest.approx(rel, rel=0.02), key

    # Per sigma: the logged amplitude ratio at every sigma, from 4 (preset, seed) pairs per series.
    per_sigma = {(g.schedule, g.baseline): g for g in a.gap_ratios}
    assert set(per_sigma) == set(expected)
    for key, rel in expected.items():
        g = per_sigma[key]
        assert g.n_pairs == 4 and g.ratio.shape == (8,)
        np.testing.assert_allclose(g.ratio, rel, rtol=0.03)
    # Shares: each series' final shares, a mean over its 4 runs, sum to 1; optimal is tilted to high sigma.
    shares = {p.schedule: p for p in a.shares}
    assert set(shares) == set(exp.schedules) and all(p.n_runs == 4 for p in shares.values())
    for p in shares.values():
        assert p.share.sum() == pytest.approx(1.0, rel=1e-9)
    opt = shares["optimal[floor, gamma=1]/edm2"].share
    assert opt[-1] > shares["edm2"].share[-1] and opt[0] < shares["edm2"].share[0]

    s = build_report("variants", tmp_path / "r.pdf", csv_dir=tmp_path / "csv", uri=uri, **FAST)
    texts = _pdf_text(tmp_path / "r.pdf")
    schedules = _page(texts, s.pages, "Schedules at equal compute")
    share_page = _page(texts, s.pages, "Loss shares and gaps per sigma")
    summary = " ".join(s.summary)
    for (label, base), rel in expected.items():
        assert f"{label} vs {base}" in schedules
        assert f"{label} / {base} (4 pairs)" in share_page and f"{label} (4 runs)" in share_page
        verdict = "lower" if rel < 1 else "higher"
        assert f"the {label} frontier reaches a {verdict} reference gap than {base}" in summary
    with open(tmp_path / "csv" / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["schedule"], r["variant"]) for r in rows} == {(label, v or "") for _, _, v, _, _, label in VARIANT_RUNS}
    assert sorted(r["seed"] for r in rows) == ["3"] * 12 + ["4"] * 12

    # docs/results/schedule_tables.py on these CSVs: one folder, or the runs split over two folders (two sittings of
    # a study), merged to the same tables; two runs of one (preset, series, seed) are an error naming the file.
    def tables(*dirs: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "docs/results/schedule_tables.py"), *map(str, dirs)],
                              capture_output=True, text=True, timeout=60)
    whole = tables(tmp_path / "csv")
    assert whole.returncode == 0, whole.stderr
    gap = {(r["preset"], r["schedule"], r["seed"]): float(r["ref_gap"]) for r in rows}
    label = "optimal[base-below]/edm2"
    ratio = np.mean([gap[("p0", label, seed)] / gap[("p0", "edm2", seed)] for seed in ("3", "4")])
    assert ratio == pytest.approx(0.7, rel=0.05)
    row = next(line for line in whole.stdout.splitlines() if line.startswith(f"| p0 | {label} | 2 |"))
    assert f"| {ratio:.3f} |" in row
    with open(tmp_path / "csv" / "per_sigma_final.csv") as fh:
        per_sigma = list(csv.DictReader(fh))
    for seed in ("3", "4"):
        part = tmp_path / f"csv-s{seed}"
        part.mkdir()
        mine = [r for r in rows if r["seed"] == seed]
        names = {r["run_name"] for r in mine}
        for name, part_rows in (("runs.csv", mine), ("per_sigma_final.csv",
                                                    [r for r in per_sigma if r["run_name"] in names])):
            with open(part / name, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(part_rows[0]))
                w.writeheader()
                w.writerows(part_rows)
    merged = tables(tmp_path / "csv-s3", tmp_path / "csv-s4")
    assert merged.returncode == 0 and merged.stdout == whole.stdout
    again = tables(tmp_path / "csv-s3", tmp_path / "csv")  # seed 3's runs in both folders, same names: fine
    assert again.returncode == 0 and again.stdout == whole.stdout
    renamed = tmp_path / "csv-renamed"
    shutil.copytree(tmp_path / "csv-s3", renamed)
    text = (renamed / "runs.csv").read_text()
    (renamed / "runs.csv").write_text(text.replace(f"{label}-p0-s3", "another-run"))
    clash = tables(tmp_path / "csv", renamed)
    assert clash.returncode != 0 and str(renamed / "runs.csv") in clash.stderr and "another-run" in clash.stderr


def test_one_variant_keeps_the_labels_of_before(tmp_path):
    """One variant and the same constants: `optimal` (one base) or `optimal/<base>` (several), whatever the
    constants are. A run logged before variants (no opt_variant, no opt_gamma) is a paper run, like one that
    logged them as "None"; the same value written two ways ("1" and "1.0") is no difference."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for i, (schedule, base, variant, params) in enumerate((
            ("edm2", None, None, {}), ("fm", None, None, {}),
            ("optimal", "edm2", "floor", {"opt_gamma": "1", "opt_mix": 0.2}),
            ("optimal", "fm", "floor", {"opt_gamma": "1.0", "opt_mix": "0.2"}))):
        log_synthetic_run(uri, "one-variant", SyntheticRun(f"{schedule}-{base}", schedule, steps=3, fid_every=None,
                                                           base_schedule=base, variant=variant, params=params), seed=i)
    exp = collect_experiment(uri, "one-variant")
    assert exp.schedules == ["edm2", "fm", "optimal/edm2", "optimal/fm"]
    assert {r.variant for r in exp.runs if r.schedule.startswith("optimal")} == {"floor"}

    uri = f"sqlite:///{tmp_path / 'paper.db'}"
    for i, (variant, params) in enumerate(((None, {}), ("paper", {"opt_gamma": None, "opt_tau": None}))):
        log_synthetic_run(uri, "paper", SyntheticRun(f"optimal-{i}", "optimal", steps=3, fid_every=None,
                                                     base_schedule="edm", variant=variant, params=params), seed=i)
    log_synthetic_run(uri, "paper", SyntheticRun("edm", "edm", steps=3, fid_every=None), seed=2)
    exp = collect_experiment(uri, "paper")
    assert [(r.schedule, r.variant) for r in exp.runs] == [("edm", None), ("optimal", "paper"), ("optimal", "paper")]
    a = analyse(exp, bootstrap=0, sigma_bootstrap=0, sigma_panels=2)
    assert [(c.schedule, c.baseline) for c in a.comparisons] == [("optimal", "edm")]

    # Two variants: every optimal series is named by its variant and base, even where one base only.
    log_synthetic_run(uri, "paper", SyntheticRun("optimal-floor", "optimal", steps=3, fid_every=None,
                                                 base_schedule="edm", variant="floor"), seed=3)
    exp = collect_experiment(uri, "paper")
    assert exp.schedules == ["edm", "optimal[floor]/edm", "optimal[paper]/edm"]


def test_runs_without_shares_still_report(tmp_path):
    """Runs from before loss shares: no "share" in per_sigma.json and no share metrics (share NaN, the page
    says so, empty CSV cells); the gap panel still compares them (no seed pair: the ratio of mean gaps)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for seed, (schedule, amplitude) in enumerate((("edm", 1.0), ("optimal", 0.8))):
        log_synthetic_run(uri, "no-shares", SyntheticRun(schedule, schedule, steps=6, amplitude=amplitude,
                                                         fid_every=None, shares=False), seed=seed)
    exp = collect_experiment(uri, "no-shares")
    for r in exp.runs:
        assert r.source == "per_sigma.json" and r.share.shape == (6, 8) and np.isnan(r.share).all()
        assert "share" not in load_json_artifact(uri, r.run_id, "per_sigma.json")
    s = build_report("no-shares", tmp_path / "r.pdf", csv_dir=tmp_path / "csv", uri=uri, **FAST)
    texts = _pdf_text(tmp_path / "r.pdf")
    page = _page(texts, s.pages, "Loss shares and gaps per sigma")
    assert "No run has loss shares" in page and "optimal / edm (means, no seed pair)" in page
    a = analyse(exp, bootstrap=0, sigma_bootstrap=0, sigma_panels=2)
    assert a.shares == [] and len(a.gap_ratios) == 1 and a.gap_ratios[0].n_pairs == 0
    np.testing.assert_allclose(a.gap_ratios[0].ratio, 0.8, rtol=0.03)
    with open(tmp_path / "csv" / "per_sigma_final.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 8 and all(r["share"] == "" and float(r["loss_x0"]) > 0 for r in rows)

    # Null entries (statuses written before shares) and a short artifact: the metric histories (which have
    # no shares) give the curve, the artifact's shares fill the statuses it has.
    spec = SyntheticRun("resumed", "edm", steps=6, fid_every=None, shares=False)
    run_id = log_synthetic_run(uri, "partial", spec, seed=5)
    grid = sigma_grid(num=8)
    h = synthetic_history(SyntheticRun("resumed", "edm", steps=6, fid_every=None), grid, synthetic_jstar(grid),
                          np.random.default_rng(5))
    h["share"][:3] = [None] * 3
    cut = {k: (v[1:] if isinstance(v, list) and len(v) == spec.steps else v) for k, v in h.items()}
    (tmp_path / "cut").mkdir()
    log_now(uri, run_id, artifacts=[write_json(tmp_path / "cut" / "per_sigma.json", cut)])
    (r,) = collect_experiment(uri, "partial").runs
    assert r.source == "metric histories (per_sigma.json lacks 1 statuses)"
    np.testing.assert_array_equal(r.nimg, h["nimg"])
    assert np.isnan(r.share[:3]).all()
    np.testing.assert_allclose(r.share[3:], h["share"][3:], rtol=1e-12)


def test_single_run_without_fid_and_too_few_points(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_synthetic_run(uri, "single", SyntheticRun("edm-only", steps=2, fid_every=None))
    s = build_report("single", tmp_path / "r.pdf", csv_dir=tmp_path / "csv", uri=uri, **FAST)
    texts = _pdf_text(tmp_path / "r.pdf")
    assert len(texts) == len(s.pages) == 13
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
    assert len(_render(tmp_path / "r.pdf", tmp_path)) == 13


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
    assert len(texts) == len(s.pages) == 13
    assert s.runs == s.runs_with_data == 2 and s.runs_with_fid == 0
    exp = collect_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "real")
    assert all(r.source == "per_sigma.json" and list(r.nimg) == [512, 1024, 1536, 2048] for r in exp.runs)
    assert {r.schedule for r in exp.runs} == {"edm", "optimal"}
    # --schedule optimal on an EDM2 preset: its default variant there, edm2-tilt
    assert {r.schedule: r.variant for r in exp.runs} == {"edm": None, "optimal": "edm2-tilt"}
    for r in exp.runs:  # training writes the shares into per_sigma.json at every status
        assert r.share.shape == (4, 8) and np.isfinite(r.share).all()
        np.testing.assert_allclose(r.share.sum(axis=1), 1.0, rtol=1e-6)
    assert "No run has loss shares" not in _page(texts, s.pages, "Loss shares and gaps per sigma")
    assert "digits" in texts[0] and "cdol" in texts[0]
    scaling = _page(texts, s.pages, "Scaling of the reference total")
    assert s.reference.fits is not None and np.isfinite(s.reference.fits.subtracted.alpha), s.reference.note
    assert fmt(s.reference.fits.subtracted.alpha) in scaling
    assert "No FID logged" in _page(texts, s.pages, "FID and KID")
    assert len(_render(tmp_path / "real.pdf", tmp_path)) == 13
