"""`edm-opt demo` end to end on a shortened sweep (slow): the five stages, the PDF, the MLflow runs, the summary,
and a rerun that reuses everything."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edm_opt.tracking import find_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_shortened_demo_end_to_end_and_rerun(tmp_path):
    doc = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    doc["base"].update(duration="2Ki", status_every=512, snapshot_every="1Ki", checkpoint_every="1Ki",
                       heldout_per_sigma=16, sigmas="0.002:80:8")
    doc["grid"]["preset"] = ["edm2-nano", "edm2-micro"]
    short = tmp_path / "short.yaml"
    short.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp_path / "demo-out"
    cmd = [sys.executable, "-m", "edm_opt.cli", "demo", "--out", str(out), "--sweep", str(short),
           "--fid-images", "64", "--fid-ref-images", "128"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for n in range(1, 6):
        assert f"==> [{n}/5]" in p.stderr
    assert p.stderr.count("done in") == 5

    # stage 1: both J* tables, the plot, the side-by-side table with a visible cDOL difference
    assert (out / "jstar-full.json").exists() and (out / "jstar-cdol.json").exists() and (out / "jstar.png").exists()
    assert "cDOL L=256" in p.stdout
    # stage 2: four finished child runs of one sweep run in the demo's own SQLite store
    uri = f"sqlite:///{out / 'mlflow.db'}"
    runs = [r for r in find_runs(uri, "demo") if not r.run_name.startswith("sweep-")]
    assert len(runs) == 4 and {r.status for r in runs} == {"FINISHED"}
    assert {r.params["schedule"] for r in runs} == {"edm2", "optimal"}
    assert len({r.tags["mlflow.parentRunId"] for r in runs}) == 1
    # stage 3: FID and KID logged into every run at its final image count
    for r in runs:
        assert "kid" in r.metrics and r.metrics["fid/num_images"] == 64
    # the logged FID is the FID of those 64 images: evaluating the first run's final snapshot again reproduces it
    from edm_opt.evaluation import evaluate_run

    first = next(r for r in runs if r.params["schedule"] == "edm2")
    again = evaluate_run(first.tags["edm_opt.run_dir"], num_images=64, ref_images=int(first.metrics["fid/ref_images"]),
                         steps=32, batch=64, device="cpu", echo=lambda line: None)
    assert again["fid"] == pytest.approx(first.metrics["fid"], rel=1e-6)
    assert again["kid"] == pytest.approx(first.metrics["kid"], rel=1e-6, abs=1e-9)
    # stage 4: a PDF report
    pdf = out / "report.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 10_000
    assert f"report:  {pdf}" in p.stderr and f"mlflow ui --backend-store-uri {uri}" in p.stderr
    # stage 5: the summary table: one row per run with its parameter count, gap, KID and FID as logged
    for r in runs:
        row = [line for line in p.stdout.splitlines() if line.startswith(r.run_name)][-1]  # the table comes last
        assert f"{int(r.metrics['model/param_count']):,}" in row
        assert f"{r.metrics['gap/ref_total']:.4f}" in row and f"{r.metrics['fid']:.2f}" in row
    assert "64 generated images against 128 training images" in p.stdout

    # a rerun reuses everything: no training, no FID, no report rebuild
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped (finished") == 4 and again.stdout.count("already logged") == 4
    assert "up to date" in again.stdout
    assert len(find_runs(uri, "demo")) == len(runs) + 1  # no new runs


def test_demo_names_a_missing_sweep_file(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edm_opt.cli", "demo", "--out", str(tmp_path / "o"),
                        "--sweep", str(tmp_path / "nope.yaml")], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "nope.yaml" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()  # nothing written
