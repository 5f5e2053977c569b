"""`make demo`: the whole edm-opt story on one laptop CPU, one timed stage at a time, resumable.

1. J*_sigma of the data: the full estimator against cDOL at L = 256, saved and plotted;
2. the sweep `sweeps/demo.yaml` (3 model sizes x {edm2, optimal}) trained on 2 ranks (edm_opt.localrun), per-sigma gaps
   tracked into `<out>/mlflow.db`;
3. FID and KID of each final model (256 generated images against a 1000-image reference);
4. the PDF scaling report;
5. a summary table, and the `mlflow ui` command to browse the runs.
Everything lives under `--out`; running the demo again reuses what is done (J* cache, finished runs,
FID values, the report when nothing changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import click
import yaml

from . import EdmOptError
from . import contract as C
from .config import load_yaml
from .data import load_dataset
from .diffusion import sigma_grid, sigma_key
from .evaluation import evaluate_run
from .fileio import atomic_path, write_json
from .launch import run_sweep
from .optimal_loss import estimate_for_dataset
from .plots import plot_jstar
from .rundir import RunDir
from .sweep import load_sweep
from .tracking import find_runs, metric_history

DEMO_SUBSET = 256  # cDOL subset size of the demo: small enough that cDOL visibly differs from the full estimator
DEMO_QUERIES = 2048  # J* queries per sigma on large data (digits uses the default 2N = 3594); full: N x M
FID_IMAGES, FID_REF_IMAGES = 256, 1000
SWEEP_FILE = Path(__file__).resolve().parents[1] / "sweeps" / "demo.yaml"


class Stage:
    """One line per stage with its elapsed time; its messages also go to `<out>/logs/<n>-<name>.log`."""

    def __init__(self, out: Path):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.log: Path | None = None

    @contextmanager
    def __call__(self, title: str):
        self.count += 1
        slug = re.sub(r"[^a-z0-9]+", "-", title.split(":")[0].split("(")[0].lower().replace("*", "star")).strip("-")
        self.log = self.logs / f"{self.count}-{slug}.log"
        self.log.write_text("")
        t0 = time.perf_counter()
        click.echo(click.style(f"==> [{self.count}/5] {title}", bold=True), err=True)
        try:
            yield
        except Exception as e:
            with open(self.log, "a") as f:
                f.write(traceback.format_exc())
            raise EdmOptError(f"demo stage {self.count} ({title}) failed: {e}\n  log: {self.log}") from e
        click.echo(f"    done in {time.perf_counter() - t0:.1f} s", err=True)

    def echo(self, line: str = "", err: bool = False) -> None:
        click.echo(line, err=err)
        with open(self.log, "a") as f:
            f.write(line + "\n")


def run_demo(source: str, out: Path, resolution: int | None = None, sweep_file: Path = SWEEP_FILE,
             duration: str | None = None, fid_images: int = FID_IMAGES, fid_ref_images: int = FID_REF_IMAGES) -> dict:
    """Run the five stages into `out`; returns the report path, the summary rows, the MLflow URI and sweep run id.

    `sweep_file` is the sweep to train (its data, resolution, outdir and name are replaced); `duration`
    (images, e.g. 48Ki) overrides its training length.
    """
    t_start = time.perf_counter()
    doc = load_yaml(sweep_file, "sweep file")  # bad input fails before anything is loaded or written
    if resolution is None and source != "digits":
        resolution = 32  # e.g. Fashion-MNIST 28x28 padded to 32x32
    dataset = load_dataset(source, resolution, progress=True)
    tag = "digits" if source == "digits" else Path(dataset.spec.source).name.replace("_", "-")
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    sweep = demo_sweep(doc, sweep_file, dataset, out, tag, duration)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the sweep's cells inherit it
    stage = Stage(out)

    with stage("J*_sigma of the data: the full estimator against cDOL"):
        jstar_stage(stage, dataset, out)
    sizes, schedules = (sorted({getattr(c.resolved, k) for c in sweep.cells}) for k in ("preset", "schedule"))
    ranks = f"{sweep.launch.nproc_per_node} ranks" if sweep.launch.mode == "torchrun" else "1 process"
    with stage(f"Sweep: {len(sizes)} model sizes x {{{', '.join(schedules)}}} on {tag}, {ranks} each, "
               f"per-sigma gaps to MLflow"):
        result = sweep_stage(stage, sweep)
    with stage(f"FID and KID of each final model ({fid_images} generated images vs a {fid_ref_images}-image "
               f"reference)"):
        fid_stage(stage, sweep, fid_images, fid_ref_images)
    with stage("PDF scaling report"):
        report = report_stage(stage, sweep, result, out, uri)
    with stage("Summary"):
        rows = summary_stage(stage, sweep, uri, fid_images, fid_ref_images)
    click.echo(f"\nreport:  {report}\nbrowse:  mlflow ui --backend-store-uri {uri}\n"
               f"total:   {(time.perf_counter() - t_start) / 60:.1f} min", err=True)
    return {"report": str(report), "rows": rows, "uri": uri, "parent_run_id": result.parent_run_id}


# --------------------------------------------------------------------------------------------------
# Stages


def jstar_stage(stage: Stage, dataset, out: Path) -> None:
    grid = sigma_grid()
    m = None if dataset.num_images <= 4096 else DEMO_QUERIES
    full, _ = estimate_for_dataset(dataset, grid, "full", num_samples=m, progress=True)
    cdol, _ = estimate_for_dataset(dataset, grid, "cdol", num_samples=m, subset_size=min(DEMO_SUBSET, dataset.num_images),
                                   progress=True)
    full.save(out / "jstar-full.json")
    cdol.save(out / "jstar-cdol.json")
    label = f"cDOL L={cdol.meta['params']['subset_size']}"
    plot = plot_jstar({"full": full, label: cdol}, out / "jstar.png", title=f"J*_sigma of {Path(dataset.spec.source).name}")
    stage.echo(f"{'sigma':>8} {'full':>11} {'+-':>8} {label:>13} {'+-':>8} {'rel. diff':>9}")
    for s, a, ea, b, eb in zip(grid, full.values, full.stderr, cdol.values, cdol.stderr):
        rel = f"{b / a - 1:+9.3f}" if a > 1e-3 * full.values[-1] else f"{'':>9}"
        stage.echo(f"{sigma_key(s):>8} {a:11.5g} {ea:8.2g} {b:13.5g} {eb:8.2g} {rel}")
    stage.echo(f"sigma* = {full.sigma_star:.3g}; data variance per dimension {full.data_variance:.4f}; "
               f"full {full.meta['wall_time_s']:.1f} s, cDOL {cdol.meta['wall_time_s']:.1f} s "
               f"(M = {full.meta['params']['num_samples']} queries per sigma); plot {plot}")


def demo_sweep(doc: dict, sweep_file: Path, dataset, out: Path, tag: str, duration: str | None):
    """The sweep `doc` (read from `sweep_file`) on the demo's data, written to `<out>/<name>.yaml` and checked
    before anything runs; an invalid one is not left behind."""
    base = doc.get("base") or {}
    if not isinstance(base, dict):
        raise EdmOptError(f"{sweep_file}: base must be a mapping of training options")
    name = "demo" if tag == "digits" else f"demo-{tag}"
    base.update(data=dataset.spec.source, outdir=str(out / "runs"))
    if dataset.spec.resolution is not None:
        base["resolution"] = dataset.spec.resolution
    if duration is not None:
        base["duration"] = duration
    doc = {**doc, "name": name, "experiment": name, "base": base}
    path = out / f"{name}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        return load_sweep(path)
    except EdmOptError as e:  # name the user's file, not the copy
        path.unlink()
        raise EdmOptError(str(e).replace(str(path), str(sweep_file))) from None


def sweep_stage(stage: Stage, sweep):
    result = run_sweep(sweep, echo=stage.echo)
    if result.stopped:
        raise EdmOptError("the sweep was stopped (the running cell saved a checkpoint); run the same command again "
                          "to resume")
    if result.failed:
        raise EdmOptError(f"{len(result.failed)} cell(s) failed: {', '.join(result.failed)}; cell logs in {sweep.folder}")
    return result


def fid_stage(stage: Stage, sweep, fid_images: int, fid_ref_images: int) -> None:
    for cell in sweep.cells:
        run = RunDir(cell.run_dir)
        info = run.read_info()
        nimg, _ = run.snapshot_path("latest")
        done = [v for step, v in metric_history(info.tracking_uri, info.mlflow_run_id, C.FID) if step == nimg]
        if done:
            stage.echo(f"{cell.run_name}: FID {done[-1]:.2f} already logged at {nimg:,} images")
            continue
        r = evaluate_run(run.path, snapshot="latest", num_images=fid_images, ref_images=fid_ref_images, steps=32,
                         batch=64, device="cpu", echo=lambda line: stage.echo(line, err=True))
        stage.echo(f"{cell.run_name}: FID {r['fid']:.2f}  KID {r['kid']:.4f}")


def report_stage(stage: Stage, sweep, result, out: Path, uri: str) -> Path:
    """Rebuild the report only when the runs changed since it was last built."""
    from reports.build import build_report


    pdf, state = out / "report.pdf", out / "report.state.json"
    runs = find_runs(uri, sweep.experiment, result.parent_run_id)
    key = hashlib.sha256(json.dumps(sorted((r.run_id, r.status, sorted(r.metrics.items())) for r in runs),
                                    default=str).encode()).hexdigest()
    if pdf.exists() and state.exists() and json.loads(state.read_text()).get("key") == key:
        stage.echo(f"{pdf}: up to date")
        return pdf
    s = build_report(sweep.experiment, pdf, result.parent_run_id, out / "report-csv", uri=uri)
    for line in s.summary:
        stage.echo(line)
    stage.echo(f"wrote {s.out}: {len(s.pages)} pages")

    write_json(state, {"key": key})
    return pdf


def summary_stage(stage: Stage, sweep, uri: str, fid_images: int, fid_ref_images: int) -> list[dict]:
    by_name = {r.run_name: r for r in find_runs(uri, sweep.experiment)}
    rows = []
    stage.echo(f"{'run':<32} {'params':>10} {'schedule':>9} {'ref gap':>9} {'KID':>8} {'FID':>8}")
    for cell in sweep.cells:
        r = by_name.get(cell.run_name)
        m = r.metrics if r else {}
        row = {"run": cell.run_name, "params": int(m.get(C.PARAM_COUNT, 0)), "schedule": cell.resolved.schedule,
               "ref_gap": m.get(C.GAP_REF), "kid": m.get(C.KID), "fid": m.get(C.FID)}
        rows.append(row)
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        stage.echo(f"{row['run']:<32} {row['params']:>10,} {row['schedule']:>9} {fmt(row['ref_gap'], '9.4f')} "
                   f"{fmt(row['kid'], '8.4f')} {fmt(row['fid'], '8.2f')}")
    stage.echo(f"(FID and KID from {fid_images} generated images against {fid_ref_images} training images: at this "
               f"N, KID is the more reliable of the two and FID is biased high; the reference gap is the held-out "
               f"x0 loss minus J* under EDM's fixed weighting, comparable across schedules.)")
    return rows
