"""Training runs end to end: MLflow contract, resume after SIGKILL, torchrun, server outage, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY as TINY_OPTIONS, MlflowServer, cli_args
from edm_opt.contract import P_SIGMA, PER_SIGMA_ARTIFACT, PerSigmaHistory
from edm_opt.diffusion import sigma_grid, sigma_key

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "runners" / "train.py")]
TINY = cli_args({**TINY_OPTIONS, "status_every": 128, "snapshot_every": 256, "checkpoint_every": 128})


def run(args, cwd, env=None, check=True, timeout=600):
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def client(cwd):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def only_run(cwd, experiment="edm-opt"):
    c = client(cwd)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return c, runs[0]


def steps(c, run_id, key):
    return [m.step for m in c.get_metric_history(run_id, key)]


def run_dir(cwd) -> Path:
    (d,) = list((cwd / "runs" / "edm-opt").iterdir())
    return d


@pytest.mark.parametrize("schedule", ["edm2", "optimal", "edm", "fm", "vp", "ve"])
def test_short_run_logs_the_naming_contract(tmp_path, schedule):
    every = schedule == "optimal"  # one run logs every per-sigma family (--log-per-sigma all), the others the default
    extra = ["--log-per-sigma", "all", "--opt-variant", "floor"] if every else []  # floor: the variant with J*_up
    run(TRAIN + TINY + ["--schedule", schedule] + extra, tmp_path)
    c, r = only_run(tmp_path)
    assert r.info.status == "FINISHED"
    m = r.data.metrics
    grid = sigma_grid(0.002, 80, 5)
    keys = ["loss/train", "loss/ref_total", "jstar/ref_total", "gap/ref_total", "model/param_count",
            "compute/flops_per_image", "compute/flops_total", "perf/img_per_s", "train/lr"]
    keys += [f"{family}/sigma_{sigma_key(s)}" for s in grid for family in ("loss_x0", "gap")]
    hidden = [f"{family}sigma_{sigma_key(s)}" for s in grid for family in
              ("loss_x0_raw/", "jstar/", "stderr/", "sched/share_")]
    hidden += [f"loss_x0_batch/sigma_{sigma_key(grid[2])}"]  # a central bin: always sampled
    if schedule == "optimal":  # floor: p and J*_up
        hidden += [f"sched/p_sigma_{sigma_key(s)}" for s in grid] + [f"jstar_up/sigma_{sigma_key(s)}" for s in grid]
    missing = [k for k in keys + (hidden if every else []) if k not in m]
    assert not missing, missing
    assert every or not [k for k in hidden if k in m]  # the default layout keeps them in per_sigma.json only
    assert m["gap/ref_total"] == pytest.approx(m["loss/ref_total"] - m["jstar/ref_total"])
    assert steps(c, r.info.run_id, "loss/ref_total") == [128, 256, 384, 512]  # the held-out status cadence
    assert steps(c, r.info.run_id, "loss/train") == list(range(32, 513, 32))  # the cheap scalars: every batch here
    assert m["compute/flops_total"] == pytest.approx(512 * m["compute/flops_per_image"])
    assert m["model/param_count"] == 75_368  # edm2-nano (README, docs/results): parameters() only
    tags = r.data.tags
    for t in ("edm_opt.dataset_fingerprint", "edm_opt.jstar_sha256", "edm_opt.git_commit", "edm_opt.schedule",
              "edm_opt.preset", "mlflow.source.git.commit", "mlflow.source.name", "mlflow.user"):
        assert tags.get(t), t
    assert "Step = training images seen" in tags["mlflow.note.content"] and "gap/sigma_0.4" in tags["mlflow.note.content"]
    (dataset,) = r.inputs.dataset_inputs
    assert dataset.dataset.digest == tags["edm_opt.dataset_fingerprint"][:36] and dataset.dataset.name == "digits"
    assert tags["edm_opt.schedule"] == schedule and r.data.params["schedule"] == schedule
    assert r.data.params["precond"] == {"fm": "fm", "vp": "vp", "ve": "ve"}.get(schedule, "edm")
    if schedule == "optimal":
        assert tags["edm_opt.opt_variant"] == r.data.params["opt_variant"] == "floor"
        assert r.data.params["opt_gamma"] == "1.0" and r.data.params["schedule.variant"] == "floor"
    d = run_dir(tmp_path)
    assert [p.name for p in sorted(d.glob("snapshot-*.pt"))] == ["snapshot-000000256.pt", "snapshot-000000512.pt"]
    assert len(list(d.glob("checkpoint-*.pt"))) == 2  # rotating: the last two
    snap = torch.load(d / "snapshot-000000512.pt", weights_only=True)
    assert snap["nimg"] == 512 and snap["network"]["preset"] == "edm2-nano"
    hist = json.loads((d / "per_sigma.json").read_text())
    assert hist["nimg"] == [128, 256, 384, 512] and len(hist["loss_x0"][0]) == 5
    assert len(hist["share"]) == 4 and sum(hist["share"][-1]) == pytest.approx(1.0) and min(hist["share"][-1]) >= 0
    if every:
        assert hist["share"][-1] == pytest.approx([m[f"sched/share_sigma_{sigma_key(s)}"] for s in grid])
    arts = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"per_sigma.json", "config.json", "jstar.json", "gap.png", "samples", "images"} <= arts
    images = [a.path.split("/")[-1] for a in c.list_artifacts(r.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(i.split("+step+")[1].split("+")[0]) for i in images if i.startswith("gap_curve")) == \
        [128, 256, 384, 512]  # the gap curve at every status, and the sample grid at every snapshot
    assert sorted(int(i.split("+step+")[1].split("+")[0]) for i in images if i.startswith("samples")) == [256, 512]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    def command(duration):
        return TRAIN + TINY + ["--schedule", "optimal", "--opt-refresh", "2", "--opt-warmup-count", "1",
                               "--duration", str(duration), "--checkpoint-every", "256", "--snapshot-every", "1024"]

    args = command(1024)
    straight = tmp_path / "straight"
    straight.mkdir()
    run(args, straight)
    killed = tmp_path / "killed"
    killed.mkdir()
    p = subprocess.Popen(args, cwd=killed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((killed / "runs").rglob("checkpoint-000000512.pt")):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    (d,) = list((killed / "runs" / "edm-opt").iterdir())
    assert list(d.glob("checkpoint-*.pt")) and not list(d.glob("snapshot-000001024.pt"))
    c, r0 = only_run(killed)
    assert r0.info.status == "RUNNING"  # SIGKILL: nothing could mark it
    out = run(args, killed)
    assert "resuming" in out.stdout
    c, r1 = only_run(killed)
    assert r1.info.run_id == r0.info.run_id and r1.info.status == "FINISHED"
    for key, every in (("loss/ref_total", 128), (f"loss_x0/sigma_{sigma_key(80)}", 128), ("loss/train", 32)):
        s = steps(c, r1.info.run_id, key)
        assert s == sorted(set(s)) == list(range(every, 1025, every)), (key, s)  # no step twice, none missing
    a = torch.load(run_dir(straight) / "snapshot-000001024.pt", weights_only=True)["net"]
    b = torch.load(d / "snapshot-000001024.pt", weights_only=True)["net"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca, ra = only_run(straight)
    assert ra.data.metrics["loss/train"] == r1.data.metrics["loss/train"]
    # the killed run had no snapshot yet: its per-sigma history before the checkpoint came back with the checkpoint
    ha, hb = (json.loads((p / "per_sigma.json").read_text()) for p in (run_dir(straight), d))
    assert hb["nimg"] == ha["nimg"] == list(range(128, 1025, 128))
    assert hb["ref_total"] == pytest.approx(ha["ref_total"], rel=1e-6)
    # the same command again is a no-op; a longer duration continues the same run
    again = run(args, killed)
    assert "nothing to do" in again.stdout
    run(command(1152), killed)
    c, r2 = only_run(killed)
    assert r2.info.run_id == r0.info.run_id and steps(c, r2.info.run_id, "loss/train")[-1] == 1152


def test_torchrun_two_ranks_logs_once(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    out = run([torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "runners" / "train.py")] + TINY
              + ["--schedule", "optimal", "--opt-refresh", "2", "--opt-warmup-count", "1"], tmp_path,
              env={"OMP_NUM_THREADS": "1"})
    c, r = only_run(tmp_path)
    assert r.info.status == "FINISHED"
    assert steps(c, r.info.run_id, "loss/ref_total") == [128, 256, 384, 512]  # once per step, not twice
    assert steps(c, r.info.run_id, "loss/train") == list(range(32, 513, 32))
    assert out.stdout.count("run edm2-nano-optimal") == 1
    assert "2 rank(s)" in out.stdout


@pytest.mark.slow
def test_sigterm_under_torchrun_checkpoints_and_ends_the_run_killed(tmp_path):
    """SIGTERM to torchrun (what a sweep or a scheduler sends): the ranks stop at the end of their step with
    a checkpoint only (no extra held-out evaluation that could outlast torchrun's grace before SIGKILL),
    the run is KILLED, and the same command resumes it to the end with the status cadence unbroken."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    args = [torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "runners" / "train.py")] + TINY + [
        "--duration", "8Ki", "--status-every", "1Ki", "--checkpoint-every", "512", "--snapshot-every", "8Ki"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").rglob("checkpoint-*.pt")):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert "stopped at" in out, out[-3000:]
    c, r = only_run(tmp_path)
    assert r.info.status == "KILLED"
    stopped = max(int(f.stem.split("-")[1]) for f in (tmp_path / "runs").rglob("checkpoint-*.pt"))
    assert 0 < stopped < 8192
    assert all(s % 1024 == 0 for s in steps(c, r.info.run_id, "loss/ref_total"))  # no off-cadence status
    run(args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    c, r2 = only_run(tmp_path)
    assert r2.info.run_id == r.info.run_id and r2.info.status == "FINISHED"
    assert sorted(steps(c, r.info.run_id, "loss/ref_total")) == list(range(1024, 8193, 1024))


def test_bad_inputs_fail_clearly_and_leave_nothing_running(tmp_path):
    def fails(args, needle):
        p = run(TRAIN + args, tmp_path, check=False)
        assert p.returncode != 0 and needle in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        return p

    fails(["--data", str(tmp_path / "missing")], "missing")
    fails(["--preset", "edm2-huge"], "edm2-huge")
    (tmp_path / "bad.yaml").write_text("duration: [1,\n")
    fails(["--config", str(tmp_path / "bad.yaml")], "bad.yaml")
    (tmp_path / "typo.yaml").write_text("learning_rate: 0.1\n")
    fails(["--config", str(tmp_path / "typo.yaml")], "learning_rate")
    from edm_opt.data import load_dataset
    from edm_opt.optimal_loss import estimate_for_dataset

    other, _ = estimate_for_dataset(load_dataset("digits", resolution=12), sigma_grid(0.002, 80, 5), num_samples=256)
    other.save(tmp_path / "other.json")
    fails(TINY + ["--jstar", str(tmp_path / "other.json")], "other.json")
    fails(TINY + ["--schedule", "optimal", "--opt-variant", "best"], "best")
    fails(TINY + ["--schedule", "optimal", "--opt-gamma", "-1"], "opt_gamma")
    fails(TINY + ["--schedule", "optimal", "--opt-clip-lo", "4", "--opt-clip-hi", "2"], "opt_clip_lo")
    fails(TINY + ["--schedule", "edm2", "--opt-variant", "floor"], "opt_variant")
    fails(TINY + ["--log-every", "0"], "log_every must be positive")
    fails(TINY + ["--log-every", "48"], "log_every 48 is not a whole number of batches of 32")
    fails(TINY + ["--log-per-sigma", "some"], "some")
    assert not (tmp_path / "runs").exists()  # nothing started
    run(TRAIN + TINY + ["--duration", "128", "--run-name", "r1"], tmp_path)
    fails(TINY + ["--duration", "256", "--run-name", "r1", "--lr", "0.5"], "'lr'")
    c = client(tmp_path)
    runs = c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


@pytest.mark.slow
def test_a_run_on_a_tracking_server_at_default_cadences(tmp_path):
    """What the MLflow UI gets from a 4Ki run at the default --log-every and --log-per-sigma, on a real server."""
    from mlflow.tracking import MlflowClient

    server = MlflowServer(tmp_path).start()
    try:
        # the default --log-every (duration/256, whole batches) and --log-per-sigma; fewer snapshots than default
        options = cli_args({**TINY_OPTIONS, "duration": 4096, "status_every": 1024, "snapshot_every": 2048})
        run(TRAIN + options, tmp_path, env={"MLFLOW_TRACKING_URI": server.uri})
        c = MlflowClient(server.uri)
        (r,) = c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id])
        assert r.info.status == "FINISHED"
        train = steps(c, r.info.run_id, "loss/train")
        assert len(train) >= 50 and train == sorted(train) and all(s % 32 == 0 for s in train)  # whole batches
        assert steps(c, r.info.run_id, "train/lr") == train == steps(c, r.info.run_id, "perf/img_per_s")
        status = steps(c, r.info.run_id, "loss/ref_total")
        images = [a.path.split("/")[-1] for a in c.list_artifacts(r.info.run_id, "images") if a.path.endswith(".png")]
        assert sorted(int(i.split("+step+")[1].split("+")[0]) for i in images if i.startswith("gap_curve")) == status
        assert [i for i in images if i.startswith("samples+step+4096+")]  # the final snapshot's grid
        tags = r.data.tags
        (dataset,) = r.inputs.dataset_inputs
        assert dataset.dataset.digest == tags["edm_opt.dataset_fingerprint"][:36]
        assert tags["mlflow.source.name"] == "edm-opt train" and tags["mlflow.user"]
        assert tags["mlflow.source.git.commit"] == tags["edm_opt.git_commit"]
        assert tags["mlflow.note.content"].startswith("edm2-nano (75,368 parameters) trained on digits (1,797 images")
        assert not [k for k in r.data.metrics if k.startswith(("jstar/sigma_", "stderr/", "loss_x0_raw/"))]
    finally:
        server.stop()


@pytest.mark.slow
def test_tracking_server_outage_loses_no_metric(tmp_path):
    server = MlflowServer(tmp_path).start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    args = TRAIN + TINY + ["--duration", "2048", "--status-every", "64", "--checkpoint-every", "1024",
                           "--snapshot-every", "2048"]
    train = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "runs").rglob("log.txt")):
            time.sleep(0.2)
        time.sleep(2)
        server.stop()  # mid-run: the trainer keeps going and buffers
        time.sleep(8)
        assert train.poll() is None, "training must not stop when the tracking server goes away"
        server.start()
        out, err = train.communicate(timeout=600)
        assert train.returncode == 0, err[-3000:]
        assert "unreachable" in err and "reachable again" in err
    finally:
        if train.poll() is None:
            train.kill()
    from mlflow.tracking import MlflowClient

    c = MlflowClient(server.uri)
    try:
        (r,) = c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id])
        assert r.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "loss/ref_total")] == list(range(64, 2049, 64))
        assert [m.step for m in c.get_metric_history(r.info.run_id, "loss/train")] == list(range(32, 2049, 32))
        assert len(c.get_metric_history(r.info.run_id, f"loss_x0/sigma_{sigma_key(80)}")) == 32
    finally:
        server.stop()


def test_default_status_interval_bounds_heldout_share():
    """duration/64 for long runs; short runs get the floor that keeps held-out evaluation <= 5% of the run."""
    from edm_opt.config import TrainConfig, parse_nimg
    from edm_opt.config import FORWARD_COST, heldout_floor, resolve_config

    def status_every(**kw):
        return resolve_config(TrainConfig(data="digits", preset="edm2-nano", **kw)).status_every

    assert status_every(duration="8Mi") == parse_nimg("8Mi") // 64
    assert heldout_floor(32, 64) == pytest.approx(2 * 32 * 64 / 3 / 0.05)
    short = status_every(duration="64Ki")
    assert short == parse_nimg("64Ki") // 2  # the most evenly spaced points that respect the floor: 2
    assert status_every(duration="16Ki") == parse_nimg("16Ki")  # shorter than the floor: once, at the end
    # cost of one evaluation in training images, against the images trained between two evaluations
    assert 2 * 32 * 64 * FORWARD_COST / short <= 0.05
    assert status_every(duration="64Ki", heldout_per_sigma=8) < short  # smaller held-out set, denser curve
    assert status_every(duration="64Ki", sigmas="0.002:80:8") < short
    assert status_every(duration="64Ki", status_every="3Ki") == 3072  # explicit wins


@pytest.mark.slow
def test_every_variant_trains_and_logs_its_constants(tmp_path):
    for variant, base in (("paper", "edm2"), ("base-below", "fm"), ("edm2-tilt", "edm2")):
        run(TRAIN + TINY + ["--schedule", "optimal", "--opt-variant", variant, "--base-schedule", base,
                            "--run-name", variant, "--opt-refresh", "1", "--opt-warmup-count", "1"], tmp_path)
    c = client(tmp_path)
    runs = {r.info.run_name: r for r in c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id])}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    paper, below, tilt = runs["paper"].data, runs["base-below"].data, runs["edm2-tilt"].data
    assert paper.params["opt_gamma"] == "None" and "schedule.w_max" in paper.params
    assert below.params["opt_tau"] == "0.25" and float(below.params["schedule.sigma_j"]) > 0
    assert below.params["precond"] == "fm" and below.tags["edm_opt.opt_variant"] == "base-below"
    assert tilt.params["opt_gamma"] == "0.5" and "schedule.a" not in tilt.params
    # edm2-tilt learns EDM2's log-variance: the head moved away from its initial weights
    d = tmp_path / "runs" / "edm-opt"
    start = torch.load(sorted((d / "paper").glob("checkpoint-*.pt"))[-1], weights_only=True)["net"]
    end = torch.load(sorted((d / "edm2-tilt").glob("checkpoint-*.pt"))[-1], weights_only=True)["net"]
    assert torch.equal(start["logvar_linear.weight"], end["logvar_linear.weight"]) is False
    # p is in the per-sigma artifact (--log-per-sigma gaps, the default, keeps it out of the metrics)
    assert not any(k.startswith(P_SIGMA) for k in tilt.metrics)
    hist = PerSigmaHistory.from_json(json.loads((d / "edm2-tilt" / PER_SIGMA_ARTIFACT).read_text()))
    p = hist.p_sigma[-1]
    assert len(p) == len(hist.sigmas) and sum(p) == pytest.approx(1.0) and max(p) != min(p)
