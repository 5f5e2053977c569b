"""Faults a hostile or unlucky user meets (issue "close the holes found by fault tests"): concurrent first use of a
store, two jobs on one run directory, a killed torchrun group, broken J* tables, bad config types, write failures,
interrupted writes, unreadable checkpoints, tracking outages. Each test drives the real command."""

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, MlflowServer, cli_args
from edm_opt.config import ConfigError, TrainConfig
from edm_opt.diffusion import sigma_grid
from edm_opt.optimal_loss import JStarMismatch, OptimalLossTable

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "runners" / "train.py")]
ARGS = cli_args({**TINY, "status_every": 128, "snapshot_every": 512, "checkpoint_every": 128, "schedule": "edm2"})


def client(cwd):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def runs_of(cwd, experiment="edm-opt"):
    c = client(cwd)
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id])


def clear_error(p, needle):
    assert p.returncode != 0 and needle in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


# --- fast: content checks -------------------------------------------------------------------------


@pytest.mark.parametrize("change, needle", [
    (lambda d: d["jstar"].__setitem__(2, float("nan")), "not finite"),
    (lambda d: d["jstar"].__setitem__(3, -0.05), "negative"),
    (lambda d: d.update(jstar=d["jstar"][:3]), "3 J* values"),
    (lambda d: d["stderr"].__setitem__(0, -1.0), "negative"),
    (lambda d: d.update(sigmas=d["sigmas"][::-1]), "increasing"),
])
def test_jstar_tables_are_checked_for_content(tmp_path, change, needle):
    grid = sigma_grid(0.002, 80, 5)
    good = OptimalLossTable(grid, 0.29 * grid ** 2 / (0.29 + grid ** 2), np.full(5, 1e-4), {"data_variance": 0.29})
    d = good.to_json()
    change(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(JStarMismatch, match=re.escape(needle)) as e:
        OptimalLossTable.load(path)
    assert "bad.json" in str(e.value)
    good.save(tmp_path / "good.json")
    OptimalLossTable.load(tmp_path / "good.json")  # round-off below 0 within its noise stays accepted


@pytest.mark.parametrize("options, needle", [
    ({"batch": "lots"}, "batch must be a whole number"), ({"lr": "fast"}, "lr must be a number"),
    ({"seed": "zero"}, "seed must be a whole number"), ({"xflip": "maybe"}, "xflip must be true or false"),
    ({"status_every": 0}, "status_every must be positive"), ({"lr": -1}, "lr must be positive"),
    ({"duration": "long"}, "duration must be an image count"), ({"resolution": 0}, "resolution must be positive"),
])
def test_config_values_are_coerced_by_type_and_range(options, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig.from_dict(options, source="my.yaml")
    assert TrainConfig.from_dict({"seed": 3.0, "lr": "0.01", "duration": "4Ki"}).seed == 3


def test_bad_yaml_types_are_refused_by_dry_run(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: zero\n")
    clear_error(subprocess.run(TRAIN + ["--config", "c.yaml", "--dry-run"], cwd=tmp_path, capture_output=True,
                               text=True), "c.yaml: seed must be a whole number")
    (tmp_path / "s.yaml").write_text("base: {xflip: maybe}\ngrid: {seed: [0]}\n")
    p = subprocess.run([sys.executable, "-m", "edm_opt.cli", "sweep", "run", "s.yaml", "--dry-run"], cwd=tmp_path,
                       capture_output=True, text=True)
    clear_error(p, "xflip must be true or false")


def test_small_holes_end_with_one_message_before_any_work(tmp_path):
    np.savez(tmp_path / "one.npz", images=np.zeros((1, 1, 8, 8), np.uint8))
    clear_error(subprocess.run(TRAIN + ARGS + ["--data", "one.npz"], cwd=tmp_path, capture_output=True, text=True),
                "holds 1 image(s)")
    cache = tmp_path / "cache"
    p = subprocess.run(TRAIN + ARGS + ["--resolution", "6"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "EDM_OPT_CACHE": str(cache)})
    clear_error(p, "divisible by 4")
    assert not (cache / "jstar").exists()  # refused before any J* estimate
    for args, needle in ((["--status-every", "0"], "status_every must be positive"), (["--lr", "-1"], "lr must be")):
        clear_error(subprocess.run(TRAIN + ARGS + args, cwd=tmp_path, capture_output=True, text=True), needle)
    assert not (tmp_path / "runs").exists()


# --- slow: real commands ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_first_users_of_a_new_store_both_succeed(tmp_path):
    procs = [subprocess.Popen(TRAIN + ARGS + ["--duration", "128", "--run-name", f"r{i}"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert sorted((r.info.run_name, r.info.status) for r in runs_of(tmp_path)) == [("r0", "FINISHED"),
                                                                                  ("r1", "FINISHED")]


@pytest.mark.slow
def test_a_second_job_on_the_same_run_is_refused(tmp_path):
    args = TRAIN + ARGS + ["--duration", "2Ki"]
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").rglob("log.txt")):
        time.sleep(0.2)
    second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    clear_error(second, f"is in use by PID {first.pid}")
    assert first.wait(timeout=600) == 0
    (r,) = runs_of(tmp_path)
    assert r.info.status == "FINISHED"
    (d,) = list((tmp_path / "runs" / "edm-opt").iterdir())
    log = (d / "log.txt").read_text().splitlines()
    assert len([l for l in log if " img  loss " in l]) == 16  # every status once


@pytest.mark.slow
def test_sigkill_of_a_torchrun_group_stops_its_ranks_and_the_rerun_resumes(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    args = [torchrun, "--standalone", "--nproc_per_node=2", str(ROOT / "runners" / "train.py"), *ARGS,
            "--duration", "16Ki", "--status-every", "4Ki", "--checkpoint-every", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").rglob("checkpoint-*.pt")):
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # torchrun puts each rank in a session of its own: only the agent dies here
    p.wait()
    t0 = time.time()
    while time.time() - t0 < 5 and _training_processes(tmp_path):
        time.sleep(0.1)
    assert not _training_processes(tmp_path), "ranks outlived their torchrun agent"
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and "resuming" in out.stdout, out.stderr[-3000:]
    (r,) = runs_of(tmp_path)
    assert r.info.status == "FINISHED"


def _training_processes(cwd: Path) -> list[int]:
    """PIDs of processes running runners/train.py with `cwd` as their working directory."""
    out = []
    for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(b"train.py" in c for c in cmd) and Path(f"/proc/{pid}/cwd").resolve() == cwd.resolve():
                out.append(pid)
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_broken_jstar_tables_end_before_any_run(tmp_path):
    grid = sigma_grid(0.002, 80, 5)
    from edm_opt.data import load_dataset
    from edm_opt.optimal_loss import estimate_for_dataset

    good, _ = estimate_for_dataset(load_dataset("digits"), grid, num_samples=256)
    for name, change in (("nan", lambda v: v.__setitem__(2, float("nan"))), ("negative", lambda v: v.__setitem__(3, -1)),
                         ("short", lambda v: v.__delitem__(slice(2, None)))):
        d = good.to_json()
        change(d["jstar"])
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        clear_error(subprocess.run(TRAIN + ARGS + ["--jstar", f"{name}.json"], cwd=tmp_path, capture_output=True,
                                   text=True), f"{name}.json")
    assert not (tmp_path / "mlflow.db").exists() or not runs_of(tmp_path)


@pytest.mark.slow
def test_a_read_only_outdir_is_one_clear_message_before_any_run(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere it has a file system to write: /proc has none
        ro = Path("/proc/edm-opt-test")
    try:
        p = subprocess.run(TRAIN + ARGS + ["--outdir", str(ro)], cwd=tmp_path, capture_output=True, text=True)
        clear_error(p, f"cannot write {ro}")
        assert not (tmp_path / "mlflow.db").exists() or not runs_of(tmp_path)
    finally:
        (tmp_path / "ro").chmod(0o755)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_fails_the_run_with_one_message(tmp_path):
    def small_files():  # the checkpoint (~1.4 MB) cannot be written; snapshots (~0.3 MB) and logs can
        resource.setrlimit(resource.RLIMIT_FSIZE, (800_000, 800_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    server = MlflowServer(tmp_path).start()  # its store is written by its own process, without the limit
    try:
        p = subprocess.run(TRAIN + ARGS, cwd=tmp_path, capture_output=True, text=True, preexec_fn=small_files,
                           timeout=600, env={**os.environ, "MLFLOW_TRACKING_URI": server.uri})
        clear_error(p, "cannot write")
        assert "checkpoint-" in p.stderr
        from mlflow.tracking import MlflowClient

        c = MlflowClient(server.uri)
        (r,) = c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id])
        assert r.info.status == "FAILED"
    finally:
        server.stop()


@pytest.mark.slow
def test_kills_during_checkpoint_writes_leave_no_temporary_file(tmp_path):
    args = TRAIN + ARGS + ["--duration", "4Ki", "--checkpoint-every", "32"]  # a checkpoint every step
    for i in range(10):
        p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and not list((tmp_path / "runs").rglob(".checkpoint-*.tmp")):
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait()
    (d,) = list((tmp_path / "runs" / "edm-opt").iterdir())
    assert list(d.glob(".checkpoint-*.tmp")), "the kills should have left temporaries to clean"
    out = subprocess.run(args + ["--duration", "4Ki"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list(d.glob(".*.tmp"))


@pytest.mark.slow
def test_unreadable_checkpoints_are_refused_then_restart_starts_over(tmp_path):
    subprocess.run(TRAIN + ARGS + ["--duration", "256"], cwd=tmp_path, check=True, capture_output=True)
    (d,) = list((tmp_path / "runs" / "edm-opt").iterdir())
    for ckpt in d.glob("checkpoint-*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    p = subprocess.run(TRAIN + ARGS, cwd=tmp_path, capture_output=True, text=True)
    clear_error(p, "no checkpoint is readable")
    assert "--restart" in p.stderr
    (old,) = runs_of(tmp_path)
    p = subprocess.run(TRAIN + ARGS + ["--restart"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "restarting" in p.stdout, p.stderr[-3000:]
    new = [r for r in runs_of(tmp_path) if r.info.run_id != old.info.run_id]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert list(d.glob("previous-*/checkpoint-*.pt"))


@pytest.mark.slow
def test_outages_cost_checkpoints_nothing_and_a_resume_during_one_finishes(tmp_path):
    server = MlflowServer(tmp_path).start()
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
    args = TRAIN + ARGS + ["--duration", "1Ki", "--checkpoint-every", "64"]
    try:
        subprocess.run(args + ["--duration", "256"], cwd=tmp_path, env=env, check=True, capture_output=True)  # last wins
        server.stop()
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        (d,) = list((tmp_path / "runs" / "edm-opt").iterdir())
        deadline = time.time() + 900
        while time.time() < deadline and "1Ki img" not in (d / "log.txt").read_text():
            time.sleep(0.5)
        server.start()  # back: the resumed run attaches and sends what it buffered
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "resuming" in out, err[-3000:]
        assert "cannot reach" in err
        checkpoints = float(out.split("checkpoints ")[1].split(" s")[0])
        n = (1024 - 256) // 64
        assert checkpoints / n < 1.0, f"{checkpoints:.1f} s for {n} checkpoints, most during the outage"
        from mlflow.tracking import MlflowClient

        c = MlflowClient(server.uri)
        (r,) = c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id])
        assert [m.step for m in c.get_metric_history(r.info.run_id, "loss/ref_total")] == list(range(128, 1025, 128))
        assert [m.step for m in c.get_metric_history(r.info.run_id, "loss/train")] == list(range(32, 1025, 32))
        assert r.info.status == "FINISHED"
    finally:
        server.stop()
