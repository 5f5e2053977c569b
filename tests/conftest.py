import os
import signal
import socket
import subprocess
import sys
import time
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own SQLite store under `folder`; start() and stop() at will."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                    str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                    "--artifacts-destination", str(folder / "server-artifacts")]
        self.proc = None

    def start(self) -> "MlflowServer":
        self.proc = subprocess.Popen(self.cmd, cwd=self.folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.proc = None
