"""Sweeps: file validation, expansion, dry runs of the shipped sweeps, real cells run, skipped, failed, adopted."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY as TINY_OPTIONS
from edm_opt import EdmOptError
from edm_opt.config import TrainConfig, format_nimg, resolve_config
from edm_opt.launch import run_sweep
from edm_opt.sweep import (cell_command, cell_config, cell_statuses, config_text, format_plan, format_status,
                           load_sweep, select_cells)
from edm_opt.tracking import find_runs, get_run, set_run_status

ROOT = Path(__file__).resolve().parents[1]
TINY = {**TINY_OPTIONS, "status_every": 256, "snapshot_every": 512, "checkpoint_every": 256}


def write(tmp_path: Path, doc: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_sweep(tmp_path: Path, missing: str = "missing") -> dict:
    """Three nano cells: the first fails at run time (no such dataset), the other two train for 512 images."""
    return {"name": "tiny", "experiment": "sweep-test",
            "launch": {"mode": "subprocess", "env": {"OMP_NUM_THREADS": 1}},
            "base": TINY, "grid": {"schedule": ["edm", "edm2", "optimal"]},
            "overrides": [{"match": {"schedule": "edm"}, "set": {"data": str(tmp_path / missing)}}]}


# --------------------------------------------------------------------------------------------------
# The file format


def test_grid_overrides_and_run_names(tmp_path):
    s = load_sweep(write(tmp_path, {
        "base": {**TINY, "duration": "1Ki"},
        "grid": {"preset": ["edm2-nano", "edm2-micro"], "schedule": [{"schedule": "edm2"},
                                                                   {"schedule": "optimal", "base_schedule": "fm"}],
                 "seed": [0, 1]},
        "overrides": [{"match": {"preset": "edm2-micro", "duration": 1024}, "set": {"batch-gpu": 16}}]}))
    assert s.name == s.experiment == "tiny" and len(s.cells) == 8
    first, last = s.cells[0], s.cells[-1]
    assert first.label == "preset=edm2-nano schedule=edm2 seed=0"
    assert last.label == "preset=edm2-micro schedule=optimal base_schedule=fm seed=1"
    assert (last.resolved.preset, last.resolved.schedule, last.resolved.base_schedule, last.resolved.seed) == \
        ("edm2-micro", "optimal", "fm", 1)
    assert [c.resolved.batch_gpu for c in s.cells] == [None] * 4 + [16] * 4  # 1Ki matched 1024
    # a cell is named as the same `edm-opt train` command names its run; its cell hash extends that hash
    plain = resolve_config(TrainConfig.from_dict({**TINY, "duration": "1Ki", "preset": "edm2-nano",
                                                  "schedule": "edm2", "seed": 0}))
    assert first.run_name == plain.run_name and first.cell_hash.startswith(plain.config_hash())
    assert first.run_dir == Path("runs/tiny") / first.run_name and s.folder == Path("runs/tiny/sweep-tiny")
    # cells by index, range, run name
    assert [c.index for c in select_cells(s, f"7,2-3,{first.run_name}")] == [1, 2, 3, 7]
    assert "[7/8]" in format_plan(s, select_cells(s, "7")) and "[1/8]" not in format_plan(s, select_cells(s, "7"))
    with pytest.raises(EdmOptError, match="no cell '9'"):
        select_cells(s, "9")
    # longer durations: the same cells, the same sweep; another learning rate: another sweep
    longer = load_sweep(write(tmp_path, {"base": {**TINY, "duration": "2Ki"}, "grid": {"seed": [0, 1]}}, "a.yaml"))
    shorter = load_sweep(write(tmp_path, {"base": TINY, "grid": {"seed": [0, 1]}}, "b.yaml"))
    other = load_sweep(write(tmp_path, {"base": {**TINY, "lr": 0.005}, "grid": {"seed": [0, 1]}}, "c.yaml"))
    assert longer.sweep_hash == shorter.sweep_hash != other.sweep_hash


@pytest.mark.parametrize("text, needles", [
    ("grid: {seed: [0,\n", ["bad.yaml", "malformed YAML"]),
    ("- 1\n", ["bad.yaml", "mapping"]),
    ("grid: {seed: [0]}\nbse: {lr: 0.1}\n", ["bad.yaml", "'bse'"]),
    ("base: {learning_rate: 0.1}\ngrid: {seed: [0]}\n", ["bad.yaml", "base", "'learning_rate'"]),
    ("grid: {sed: [0, 1]}\n", ["bad.yaml", "grid.sed", "'sed'"]),
    ("grid: {seed: 0}\n", ["bad.yaml", "grid.seed", "list"]),
    ("grid: {seed: []}\n", ["bad.yaml", "grid.seed", "list"]),
    ("grid: {}\n", ["bad.yaml", "grid is empty"]),
    ("base: {preset: edm2-nano}\n", ["bad.yaml", "grid is empty"]),
    ("grid: {seed: [0]}\noverrides: [{match: {sed: 0}, set: {lr: 0.1}}]\n", ["overrides[0].match", "'sed'"]),
    ("grid: {seed: [0]}\noverrides: [{match: {seed: 0}, set: {lrr: 0.1}}]\n", ["overrides[0].set", "'lrr'"]),
    ("grid: {seed: [0]}\noverrides: [{match: {seed: 1}, set: {lr: 0.1}}]\n", ["overrides[0]", "matches no cell"]),
    ("grid: {seed: [0]}\noverrides: [{when: {seed: 1}}]\n", ["overrides[0]", "match and set"]),
    ("grid: {schedule: [edm2, optimall]}\n", ["bad.yaml", "schedule=optimall", "'optimall'"]),
    ("grid: {preset: [edm2-huge]}\n", ["bad.yaml", "preset=edm2-huge", "edm2-huge"]),
    ("grid: {seed: [0]}\nbase: {experiment: x}\n", ["base", "'experiment'", "top-level"]),
    ("grid: {run_name: [a, b]}\n", ["grid.run_name", "set by the sweep"]),
    ("grid: {duration: [1Ki, 2Ki]}\n", ["bad.yaml", "same run", "duration"]),
    ("grid: {seed: [0]}\nlaunch: slurm\n", ["launch", "'slurm'", "torchrun"]),
    ("grid: {seed: [0]}\nlaunch: {mode: torchrun, nproc_per_node: 3}\nbase: {batch: 32}\n",
     ["launch.nproc_per_node", "batch 32"]),
    ("grid: {seed: [0]}\nlaunch: {mode: inprocess}\n", ["launch", "'inprocess'", "subprocess, torchrun"]),
    ("grid: {seed: [0]}\nlaunch: {mode: subprocess, env: [OMP_NUM_THREADS]}\n", ["launch", "env must be a mapping"]),
])
def test_malformed_sweep_files_fail_clearly_and_run_nothing(tmp_path, monkeypatch, text, needles):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(EdmOptError) as e:
        load_sweep(tmp_path / "bad.yaml")
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(EdmOptError, match="nope.yaml not found"):
        load_sweep(tmp_path / "nope.yaml")


def test_cell_config_round_trips_through_train_config(tmp_path):
    """Every option the file may set reaches `edm-opt train --config` unchanged: booleans both ways, image counts."""
    from edm_opt.cli import train, train_config_from

    for flags in (True, False):
        base = {"data": "digits", "preset": "edm2-nano", "xflip": flags, "class_conditional": flags,
                "opt_bump": flags, "importance_correction": flags, "compile": flags, "P_mean": -0.75,
                "P_std": 1.25, "lr": 0.0123456789, "duration": "96Ki", "status_every": 1000, "ema": "power:0.05",
                "opt_mix": 0.25, "device": "cpu", "jstar": "auto", "sigmas": "0.002:80:7",
                "opt_variant": "paper"}  # the variant with the bump
        s = load_sweep(write(tmp_path, {"base": base, "grid": {"schedule": ["optimal"]}}))
        (cell,) = s.cells
        args = cell_command(s, cell)
        assert args[:4] == [sys.executable, "-m", "edm_opt.cli", "train"] and args[4:] == ["--config",
                                                                                          str(s.config_path(cell))]
        ranks = load_sweep(write(tmp_path, {"base": base, "grid": {"schedule": ["optimal"]},
                                            "launch": {"mode": "torchrun", "nproc_per_node": 2}}, "ranks.yaml"))
        assert cell_command(ranks, ranks.cells[0])[:8] == [sys.executable, "-m", "edm_opt.localrun",
                                                          "--nproc_per_node=2", "-m", "edm_opt.cli", "train",
                                                          "--config"]
        text = config_text(cell_config(cell, "abc"))
        assert "duration: 96Ki" in text and f"run_name: {cell.run_name}" in text
        path = tmp_path / "cell.yaml"
        path.write_text(text)
        ctx = train.make_context("train", ["--config", str(path)])
        back = train_config_from({k: v for k, v in ctx.params.items() if k not in ("config_file", "dry_run")},
                                 ctx.params["config_file"])
        assert back.to_dict() == {**cell.resolved.to_dict(), "parent_run_id": "abc"}
        for k, v in base.items():  # what the file set, through resolution
            want = {"duration": 96 * 1024, "status_every": 1024}.get(k, v)  # whole batches of 128
            assert getattr(back, k) == want, k
        assert resolve_config(back).to_dict() == back.to_dict()  # resolution is idempotent: the same run


def test_shipped_sweeps_pass_dry_run_without_their_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = {"scaling-digits.yaml": 10, "schedule-fashion-mnist.yaml": 8, "edm2-img64-scaling.yaml": 10,
                "edm-cifar10-ddpmpp.yaml": 4, "claims-fashion-mnist.yaml": 24, "demo.yaml": 6,
                "schedule-variants-fashion-mnist.yaml": 20, "schedule-stage2-fashion-mnist.yaml": 16,
                "cifar10-edm2-micro.yaml": 14}
    shipped = sorted((ROOT / "sweeps").glob("*.yaml"))
    assert set(expected) <= {p.name for p in shipped}
    for path in shipped:
        s = load_sweep(path)
        plan = format_plan(s)
        count = expected.get(path.name, len(s.cells))
        assert len(s.cells) == count and f"{count} cells" in plan, path.name
        assert plan.count(" --config ") == count and all(c.run_name in plan for c in s.cells)
        schedules = {c.resolved.schedule for c in s.cells}
        assert "optimal" in schedules and schedules & {"edm", "edm2", "fm"}, path.name
    for name in ("scaling-digits.yaml", "edm2-img64-scaling.yaml"):  # >= 5 sizes, >= 30x in parameters
        assert len({c.resolved.preset for c in load_sweep(ROOT / "sweeps" / name).cells}) >= 5
    img64 = load_sweep(ROOT / "sweeps" / "edm2-img64-scaling.yaml")
    assert img64.launch.mode == "torchrun" and img64.launch.nproc_per_node == 8
    assert all(c.resolved.batch == 2048 and c.resolved.class_conditional for c in img64.cells)
    assert "--nproc_per_node=8" in format_plan(img64)
    # the GPU recipes of the paper's settings: each baseline against the optimal schedule built on it
    cifar = load_sweep(ROOT / "sweeps" / "edm-cifar10-ddpmpp.yaml")
    assert {(c.resolved.schedule, c.resolved.base_schedule) for c in cifar.cells} == \
        {("edm", None), ("optimal", "edm"), ("fm", None), ("optimal", "fm")}
    assert all(c.resolved.preset == "ddpmpp-cifar10" and c.resolved.batch == 512 for c in cifar.cells)
    assert {c.resolved.schedule for c in img64.cells} == {"edm2", "optimal"}
    # stage 2 of the schedule study: each (preset, seed) block of 4 cells is a paired comparison, seed 0 first
    stage2 = load_sweep(ROOT / "sweeps" / "schedule-stage2-fashion-mnist.yaml")
    blocks = [stage2.cells[i:i + 4] for i in range(0, 16, 4)]
    assert [(b[0].resolved.seed, b[0].resolved.preset) for b in blocks] == [
        (0, "edm2-nano"), (0, "edm2-tiny"), (1, "edm2-nano"), (1, "edm2-tiny")]
    assert all([(c.resolved.schedule, c.resolved.base_schedule, c.resolved.opt_variant if c.resolved.schedule ==
                 "optimal" else None) for c in b] == [("edm2", None, None), ("optimal", "edm2", "edm2-tilt"),
                                                      ("fm", None, None), ("optimal", "fm", "base-below")]
               for b in blocks)
    assert all(c.resolved.duration == 256 * 1024 and c.resolved.fid_images == 1024 for c in stage2.cells)
    # CIFAR-10: five families and stage 3 of the schedule study, one preset, seed 0's 7 cells first
    c10 = load_sweep(ROOT / "sweeps" / "cifar10-edm2-micro.yaml")
    assert [c.resolved.seed for c in c10.cells] == [0] * 7 + [1] * 7
    assert {c.resolved.schedule for c in c10.cells} == {"vp", "ve", "edm", "edm2", "fm", "optimal"}
    assert {(c.resolved.base_schedule, c.resolved.opt_variant) for c in c10.cells if c.resolved.schedule ==
            "optimal"} == {("edm2", "edm2-tilt"), ("fm", "base-below")}
    assert {(c.resolved.preset, c.resolved.duration, c.resolved.class_conditional) for c in c10.cells} == {
        ("edm2-micro", 128 * 1024, False)}
    # the claims sweep: 3 sizes x {edm2, optimal on edm2, fm, optimal on fm} x 2 seeds at equal images
    claims = load_sweep(ROOT / "sweeps" / "claims-fashion-mnist.yaml")
    assert len({c.resolved.preset for c in claims.cells}) == 3 and {c.resolved.seed for c in claims.cells} == {0, 1}
    assert {(c.resolved.schedule, c.resolved.base_schedule) for c in claims.cells} == \
        {("edm2", None), ("optimal", "edm2"), ("fm", None), ("optimal", "fm")}
    assert len({c.resolved.duration for c in claims.cells}) == 1
    digits = load_sweep(ROOT / "sweeps" / "scaling-digits.yaml")
    assert {c.resolved.data for c in digits.cells} == {"digits"}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written


# --------------------------------------------------------------------------------------------------
# Running (real training subprocesses on a SQLite store in tmp_path)


def children(uri: str, parent_id: str) -> dict:
    return {r.run_name: r for r in find_runs(uri, "sweep-test", parent_run_id=parent_id)}


def test_sweep_runs_cells_skips_finished_ones_and_records_a_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = load_sweep(write(tmp_path, tiny_sweep(tmp_path)))
    bad, a, b = s.cells
    assert [st.state for st in cell_statuses(s)] == ["not started"] * 3
    lines = []
    result = run_sweep(s, echo=lines.append)
    out = "\n".join(lines)
    # the failing cell (first) did not stop the others; all three are accounted for
    assert result.failed == [bad.run_name] and result.trained == [a.run_name, b.run_name], out
    assert not result.stopped and f"FAILED {bad.run_name}" in out
    log = s.log_path(bad).read_text()
    assert "missing" in log and f"--config {s.config_path(bad)}" in log
    assert yaml.safe_load(s.config_path(bad).read_text())["parent_run_id"] == result.parent_run_id
    parent = get_run(uri, result.parent_run_id)
    assert parent.status == "FAILED" and parent.run_name == "sweep-tiny"
    assert parent.tags["edm_opt.sweep_cells"] == "3" and parent.params["grid.schedule"] == '["edm", "edm2", "optimal"]'
    kids = children(uri, result.parent_run_id)
    assert set(kids) == {a.run_name, b.run_name}  # the failed cell never got as far as an MLflow run
    for cell in (a, b):
        r = kids[cell.run_name]
        assert r.status == "FINISHED" and r.tags["edm_opt.cell_hash"] == cell.cell_hash
        assert r.tags["edm_opt.sweep"] == result.parent_run_id and "gap/ref_total" in r.metrics
    from mlflow.tracking import MlflowClient

    arts = [f.path for f in MlflowClient(uri).list_artifacts(result.parent_run_id, "logs")]
    assert f"logs/{bad.run_name}.log" in arts and f"logs/{a.run_name}.log" in arts
    child_arts = [f.path for f in MlflowClient(uri).list_artifacts(kids[a.run_name].run_id, "logs")]
    assert child_arts == [f"logs/{a.run_name}.log"]
    table = format_status(s, cell_statuses(s))
    assert [st.state for st in cell_statuses(s)] == ["failed", "finished", "finished"], table
    assert "512/512" in table and "1 failed, 2 finished" in table
    row = next(line for line in table.splitlines() if a.run_name in line)
    assert f"{kids[a.run_name].metrics['gap/ref_total']:.5f}" in row

    # again: the finished cells are skipped without starting a process, the failed one is retried
    t0 = time.monotonic()
    lines.clear()
    again = run_sweep(s, echo=lines.append)
    assert again.skipped == [a.run_name, b.run_name] and again.failed == [bad.run_name] and not again.trained
    assert again.parent_run_id == result.parent_run_id  # the same sweep: the same parent run
    assert sum("skipped (finished" in line for line in lines) == 2
    assert time.monotonic() - t0 < 40
    assert s.log_path(bad).read_text().count("=====") == 2  # each attempt appended
    assert s.log_path(a).read_text().count("=====") == 1  # no process was started for a finished cell

    # a longer duration is the same sweep: the cells are partial now; a RUNNING run shows as running
    longer = load_sweep(write(tmp_path, {**tiny_sweep(tmp_path), "base": {**TINY, "duration": 1024}}))
    assert longer.sweep_hash == s.sweep_hash
    set_run_status(uri, kids[b.run_name].run_id, "RUNNING")
    assert [st.state for st in cell_statuses(longer)] == ["failed", "partial", "running"]
    assert "512/1Ki" in format_status(longer, cell_statuses(longer))
    set_run_status(uri, kids[b.run_name].run_id, "FINISHED")

    # a changed cell is another sweep: a new parent run, which adopts the unchanged finished cells
    changed = load_sweep(write(tmp_path, tiny_sweep(tmp_path, missing="also-missing")))
    assert changed.sweep_hash != s.sweep_hash
    third = run_sweep(changed, echo=lines.append)
    assert third.skipped == [a.run_name, b.run_name]
    assert third.parent_run_id != result.parent_run_id
    assert set(children(uri, third.parent_run_id)) == {a.run_name, b.run_name}
    assert not children(uri, result.parent_run_id)


def test_subprocess_failure_is_caught_and_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = {**tiny_sweep(tmp_path), "grid": {"schedule": ["edm"]}}
    s = load_sweep(write(tmp_path, doc))
    assert f"--config {s.config_path(s.cells[0])}" in format_plan(s) and not s.config_path(s.cells[0]).exists()
    result = run_sweep(s, echo=lambda line: None)
    assert result.failed == [s.cells[0].run_name]
    assert "not found" in s.log_path(s.cells[0]).read_text()
    assert get_run(f"sqlite:///{tmp_path / 'mlflow.db'}", result.parent_run_id).status == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize("launch", [{"mode": "subprocess"},
                                    {"mode": "torchrun", "nproc_per_node": 2, "env": {"OMP_NUM_THREADS": 1}}])
def test_subprocess_and_torchrun_cells_train(tmp_path, monkeypatch, launch):
    monkeypatch.chdir(tmp_path)
    s = load_sweep(write(tmp_path, {"experiment": "sweep-test", "launch": launch, "base": TINY,
                                    "grid": {"schedule": ["optimal"]}}))
    result = run_sweep(s, echo=print)
    assert result.trained == [s.cells[0].run_name]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (r,) = children(uri, result.parent_run_id).values()
    assert r.status == "FINISHED" and r.tags["edm_opt.cell_hash"] == s.cells[0].cell_hash
    assert get_run(uri, result.parent_run_id).status == "FINISHED"


@pytest.mark.slow
def test_sigterm_stops_the_running_cell_at_a_checkpoint_and_a_rerun_resumes_it(tmp_path):
    doc = {"experiment": "sweep-test", "launch": {"mode": "subprocess", "env": {"OMP_NUM_THREADS": 1}},
           "base": {**TINY, "duration": "4Ki", "status_every": 512, "checkpoint_every": 256,
                    "snapshot_every": "4Ki"}, "grid": {"schedule": ["edm2"]}}
    path = write(tmp_path, doc)
    script = ["-c", "import sys; from edm_opt.launch import run_sweep; from edm_opt.sweep import load_sweep; "
                    "sys.exit(130 if run_sweep(load_sweep(sys.argv[1])).stopped else 0)", str(path)]
    p = subprocess.Popen([sys.executable, *script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    (cell,) = load_sweep(path).cells
    run_dir = tmp_path / cell.run_dir
    deadline = time.time() + 300
    while time.time() < deadline and not list(run_dir.glob("checkpoint-*.pt")):
        time.sleep(0.2)
    p.terminate()  # SIGTERM to the sweep: it asks the cell to checkpoint and stop
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 130 and "stopped" in out, out
    nimg = max(int(f.stem.split("-")[1]) for f in run_dir.glob("checkpoint-*.pt"))
    assert 0 < nimg < 4096
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (parent,) = [r for r in find_runs(uri, "sweep-test") if r.run_name == "sweep-tiny"]
    assert parent.status == "KILLED" and children(uri, parent.run_id)[cell.run_name].status == "KILLED"
    out = subprocess.run([sys.executable, *script], cwd=tmp_path, capture_output=True, text=True, timeout=600).stdout
    assert f"resuming at {format_nimg(nimg)}" in out and "finished in" in out, out
    assert get_run(uri, parent.run_id).status == "FINISHED"


# --------------------------------------------------------------------------------------------------
# The command line (once `edm-opt sweep` is wired into cli.py)


def test_sweep_command_line(tmp_path):
    from edm_opt.cli import main

    assert {"run", "status"} <= set(main.commands["sweep"].commands)
    edm_opt = [sys.executable, "-m", "edm_opt.cli"]
    p = subprocess.run(edm_opt + ["sweep", "run", str(ROOT / "sweeps" / "edm2-img64-scaling.yaml"), "--dry-run"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "10 cells" in p.stdout, p.stderr
    (tmp_path / "bad.yaml").write_text("grid: {sed: [0]}\n")
    p = subprocess.run(edm_opt + ["sweep", "run", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "'sed'" in p.stderr and "Traceback" not in p.stderr
    doc = {**tiny_sweep(tmp_path), "grid": {"schedule": ["edm"]}}
    write(tmp_path, doc)
    p = subprocess.run(edm_opt + ["sweep", "run", "tiny.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 1 and "1 of 1 cells failed" in p.stderr and "FAILED" in p.stdout, p.stderr
    p = subprocess.run(edm_opt + ["sweep", "status", "tiny.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "failed" in p.stdout
