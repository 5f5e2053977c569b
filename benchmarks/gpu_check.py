"""The prepared GPU check: one line per figure, non-zero exit on any error (run through gpu_check.sh).

On one CUDA GPU, at most ~8 minutes:
  [jstar]     the full estimator and cDOL on synthetic data at ImageNet-64 scale (N = 50,000 of 12,288 dims,
              8 sigmas), each against the bare GEMMs of its shapes (benchmarks/estimator.py's);
  [train]     edm2-img64-xs (class-conditional) training img/s in fp32 and bf16, with and without --compile: the
              real `edm-opt train` under `torchrun --nproc_per_node=1` (NCCL), read back from its MLflow store
              (perf/img_per_s of the last --log-every interval, perf/peak_mem_gb);
  [sample]    Heun sampling img/s (32 steps) of the same network;
  [inception] Inception-v3 feature img/s (the FID network);
  [ddp]       a 2-rank training run when the machine has 2 GPUs (else one line saying it was skipped).
--cpu-smoke runs the same code paths on CPU at tiny sizes (gloo instead of NCCL, bf16 autocast and torch.compile
included) and is part of `make test-slow`.

Usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch

from estimator import bare_full_gemms, bare_subset_gemms, timed  # benchmarks/estimator.py (this folder)

from edm_opt.diffusion import sigma_grid
from edm_opt.metrics import extract_features, load_inception
from edm_opt.networks import build_network
from edm_opt.optimal_loss import estimate_optimal_loss
from edm_opt.sampling import generate

ROOT = Path(__file__).resolve().parents[1]
# (GPU, CPU smoke): data size, network and training settings
SIZES = {
    "gpu": dict(n=50_000, res=64, sigmas=8, full_m=2048, cdol_m=65_536, preset="edm2-img64-xs", batch=64,
                duration=64 * 60, sample=256, inception=1024, classes=1000),
    "cpu": dict(n=2048, res=8, sigmas=2, full_m=256, cdol_m=1024, preset="edm2-nano", batch=16, duration=16 * 6,
                sample=8, inception=16, classes=10),
}


def line(tag: str, text: str) -> None:
    print(f"[{tag}] {text}", flush=True)


def check_jstar(size: dict, device: str) -> None:
    n, d = size["n"], 3 * size["res"] ** 2
    x = torch.rand(n, d, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = sigma_grid(num=size["sigmas"])
    estimate_optimal_loss(x[:1024], [1.0], num_samples=64, device=device)  # warm up (kernels, allocator)
    t_full = timed(lambda: estimate_optimal_loss(x, [1.0], "full", num_samples=size["full_m"], device=device), device)
    t_gemm = bare_full_gemms(n, d, size["full_m"], device)
    line("jstar", f"full N={n} D={d} M={size['full_m']} (1 sigma): {t_full:.3f} s, bare GEMMs {t_gemm:.3f} s, "
                  f"ratio {t_full / t_gemm:.2f}")
    subset = 4096 if n > 4096 else 256
    out = {}
    t_cdol = timed(lambda: out.setdefault("table", estimate_optimal_loss(
        x, grid, "cdol", num_samples=size["cdol_m"], subset_size=subset, device=device)), device)
    table = out["table"]
    t_one = bare_subset_gemms(n, d, size["cdol_m"], subset, device)
    if not np.isfinite(table.values).all():
        raise RuntimeError(f"cDOL gave non-finite J*: {table.values}")
    line("jstar", f"cdol N={n} D={d} M={size['cdol_m']} {len(grid)} sigmas: {t_cdol:.2f} s "
                  f"({t_cdol / len(grid):.3f} s per sigma), bare GEMMs per sigma {t_one:.3f} s, "
                  f"ratio {t_cdol / (len(grid) * t_one):.2f}")


def synthetic_dataset(path: Path, size: dict) -> Path:
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (size["n"] if size["n"] <= 4096 else 4096, size["res"], size["res"], 3), np.uint8)
    labels = g.integers(0, size["classes"], len(images))
    np.savez(path, images=images, labels=labels)
    return path


def train(workdir: Path, data: Path, size: dict, nproc: int, precision: str, compiled: bool, name: str) -> dict:
    """One `edm-opt train` under torchrun; its last img/s and peak memory from the MLflow store."""
    store = workdir / "mlflow.db"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "edm_opt.cli", "train", "--data", str(data), "--preset", size["preset"], "--batch",
           str(size["batch"]), "--duration", str(size["duration"]), "--precision", precision, "--run-name", name,
           "--status-every", str(size["duration"]), "--snapshot-every", str(size["duration"]),
           "--checkpoint-every", str(size["duration"]), "--log-every", str(size["duration"] // 6),
           "--heldout-per-sigma", "8", "--sigmas", "0.002:80:8", "--class-conditional"]
    cmd += ["--compile"] if compiled else []
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "EDM_OPT_CACHE": str(workdir / "cache"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    c = mlflow.MlflowClient(f"sqlite:///{store}")
    run = c.search_runs([c.get_experiment_by_name("edm-opt").experiment_id],
                        filter_string=f"attributes.run_name = '{name}'")[0]
    m = run.data.metrics
    return {"img_per_s": m["perf/img_per_s"], "peak_gb": m.get("perf/peak_mem_gb"), "wall_s": wall,
            "status": run.info.status}


def check_train(workdir: Path, size: dict, gpus: int, cpu: bool) -> None:
    data = synthetic_dataset(workdir / "synthetic.npz", size)
    base = None
    for precision in ("fp32", "bf16"):
        for compiled in (False, True):
            name = f"{precision}{'-compile' if compiled else ''}"
            r = train(workdir, data, size, 1, precision, compiled, name)
            base = base or r["img_per_s"]
            mem = "" if r["peak_gb"] is None else f", peak memory {r['peak_gb']:.2f} GiB"
            line("train", f"{size['preset']} batch {size['batch']} {name} ({'gloo' if cpu else 'nccl'}, 1 rank): "
                          f"{r['img_per_s']:.1f} img/s ({r['img_per_s'] / base:.2f}x fp32){mem}; run "
                          f"{r['status']} in {r['wall_s']:.0f} s")
    if gpus >= 2:
        r = train(workdir, data, size, 2, "bf16", False, "ddp-2")
        line("ddp", f"2 ranks bf16: {r['img_per_s']:.1f} img/s, run {r['status']} in {r['wall_s']:.0f} s")
    else:
        line("ddp", f"skipped: {gpus} GPU(s) on this machine (2 needed)")


def check_sample_and_inception(size: dict, device: str) -> None:
    torch.manual_seed(0)
    net = build_network(size["preset"], img_resolution=size["res"], img_channels=3,
                        label_dim=size["classes"]).to(device)
    generate(net, range(2), batch_size=2, num_steps=4, device=device)  # warm up
    n = size["sample"]
    t = timed(lambda: generate(net, range(n), batch_size=min(64, n), num_steps=32, device=device), device)
    line("sample", f"{size['preset']} Heun 32 steps (63 evaluations), batch {min(64, n)}: {n / t:.1f} img/s")
    extractor, sha = load_inception(device=device)
    images = torch.randint(0, 256, (size["inception"], 3, size["res"], size["res"]), dtype=torch.uint8)
    extract_features(images[:8], extractor, batch_size=8, device=device)  # warm up (TorchScript)
    t = timed(lambda: extract_features(images, extractor, batch_size=64, device=device), device)
    line("inception", f"Inception-v3 features ({sha[:12]}): {size['inception'] / t:.1f} img/s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="the same code paths on CPU at tiny sizes")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs and store in this folder")
    args = ap.parse_args()
    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    device, size = ("cpu", SIZES["cpu"]) if cpu else ("cuda", SIZES["gpu"])
    gpus = 0 if cpu else torch.cuda.device_count()
    what = "CPU smoke" if cpu else f"{gpus} x {torch.cuda.get_device_name(0)}"
    line("machine", f"{what}; torch {torch.__version__}" + ("" if cpu else f", CUDA {torch.version.cuda}"))
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        check_jstar(size, device)
        check_sample_and_inception(size, device)
        check_train(workdir, size, gpus, cpu)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    line("done", f"all checks passed in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
