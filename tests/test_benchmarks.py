"""The prepared GPU check's code paths on CPU (benchmarks/gpu_check.sh --cpu-smoke): J* estimators against their
GEMMs, the real `edm-opt train` under torchrun in fp32 and bf16, with and without torch.compile, sampling and the
Inception features, one line per figure."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=2400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    tags = [re.match(r"\[(\w+)\]", ln).group(1) for ln in lines if ln.startswith("[")]
    assert tags == ["machine", "jstar", "jstar", "sample", "inception", "train", "train", "train", "train", "ddp",
                    "done"], p.stdout
    train = [ln for ln in lines if ln.startswith("[train]")]
    assert [re.search(r"batch 16 (\S+) ", ln).group(1) for ln in train] == ["fp32", "fp32-compile", "bf16",
                                                                          "bf16-compile"]
    assert all("run FINISHED" in ln and float(re.search(r"([\d.]+) img/s", ln).group(1)) > 0 for ln in train)
    assert re.search(r"ratio \d+\.\d+", lines[1]) and "img/s" in lines[3] and "img/s" in lines[4]


def test_gpu_check_refuses_to_run_without_a_gpu_or_the_smoke_flag():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert p.returncode == 2 and "--cpu-smoke" in p.stderr
