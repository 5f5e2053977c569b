import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests run on 2 CPU cores; keep torch from oversubscribing them when pytest forks helpers.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own EDM_OPT_CACHE and no ambient MLflow server."""
    monkeypatch.setenv("EDM_OPT_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def one_thread():
    """Tiny networks: one thread is as fast as two, and immune to a busy second core (OpenMP threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tiny training settings every end-to-end test starts from: edm2-nano on digits, 5 grid sigmas, 8 held-out images
# each, 512 images. Tests add their own intervals and schedule.
TINY = {"data": "digits", "preset": "edm2-nano", "batch": 32, "sigmas": "0.002:80:5", "heldout_per_sigma": 8,
        "duration": 512}
EDM_OPT = str(Path(sys.executable).with_name("edm-opt"))


def cli_args(options: dict) -> list[str]:
    """`edm-opt train` options from a mapping of option names (underscores)."""
    return [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """One finished tiny edm2 run (statuses at 256 and 512 images, snapshots at both), its run directory; shared by
    the evaluation and diagnose tests, which read it (evaluation also logs FIDs into its MLflow run)."""
    cwd = tmp_path_factory.mktemp("train")
    args = cli_args({**TINY, "status_every": 256, "snapshot_every": 256, "checkpoint_every": 512, "schedule": "edm2"})
    env = {**os.environ, "EDM_OPT_CACHE": str(tmp_path_factory.mktemp("cache"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run([EDM_OPT, "train", *args], cwd=cwd, check=True, capture_output=True, env=env)
    (run,) = list((cwd / "runs" / "edm-opt").iterdir())
    return run
