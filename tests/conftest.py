import os

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
