"""Training costs measured side by side in one run (these machines are noisy: repeats interleaved, min kept).

1. Tracking overhead: mean optimiser-step time with MLflow logging on (the real background logger) vs off
   (a logger that drops everything), same config, with a status every 24 steps (the densest cadence of the
   shipped sweeps; the default is >= 200) and every 4 steps (stress). Target <= 3%.
2. Held-out evaluation's share of run time at the default status interval (duration / 64, at least
   training.heldout_floor). Target <= 5%.
3. Images/s of edm2-mini on digits with 1 and 2 ranks (torchrun, CPU, gloo); `--only ranks`: torchrun --standalone
   against edm_opt.localrun at 2 ranks.
4. The optimal schedule's variants: mean optimiser-step time of each (tracking off, one status) against the
   edm2 schedule's, same network and data; what the weight, the tilted sampler and the gap tracker cost.
5. With CUDA: edm2-img64-xs forward+backward images/s, fp32 vs bf16 autocast, with and without torch.compile.

Usage: python benchmarks/training.py [--repeats 3] [--duration 16Ki] [--skip-ranks] [--only variants|tracking|ranks]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edm_opt import recorder  # noqa: E402
from edm_opt.config import TrainConfig  # noqa: E402
from edm_opt.training import train  # noqa: E402


class NullLogger:
    """Tracking off: accepts everything, sends nothing."""

    def __init__(self, *a, **k):
        self.run_id, self.uri = "off", "off"

    @classmethod
    def create(cls, *a, **k):
        return cls()

    resume = create

    def __getattr__(self, name):
        return lambda *a, **k: [] if name == "pending" else True


@contextlib.contextmanager
def tracking_off():
    real = recorder.RunLogger
    recorder.RunLogger = NullLogger  # what the run recorder creates its MLflow run with
    try:
        yield
    finally:
        recorder.RunLogger = real


def one_run(preset: str, duration: str, status_every, logging: bool, **options) -> dict:
    """One training run on digits in a temporary folder; `options` (the schedule by default the optimal one)."""
    with tempfile.TemporaryDirectory() as d:
        cwd = os.getcwd()
        os.chdir(d)
        os.environ["EDM_OPT_CACHE"] = str(Path(tempfile.gettempdir()) / "edm-opt-bench-cache")
        try:
            cfg = TrainConfig(data="digits", preset=preset, duration=duration, status_every=status_every,
                              snapshot_every=duration, checkpoint_every=duration,
                              **{"schedule": "optimal", **options})
            ctx = contextlib.nullcontext() if logging else tracking_off()
            with ctx:
                t = time.perf_counter()
                result = train(cfg, echo=lambda line: None)
                result["wall"] = time.perf_counter() - t
            result["steps_n"] = result["nimg"] // 128
            return result
        finally:
            os.chdir(cwd)


def ranks_throughput(nproc: int, duration: str, launcher: str = "torchrun") -> float:
    """Training img/s of edm2-mini on digits with `nproc` ranks under torchrun --standalone or edm_opt.localrun."""
    prefix = ([str(Path(sys.executable).with_name("torchrun")), "--standalone"] if launcher == "torchrun"
              else [sys.executable, "-m", "edm_opt.localrun"])
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([*prefix, f"--nproc_per_node={nproc}", str(ROOT / "runners" / "train.py"),
                              "--data", "digits", "--preset", "edm2-mini", "--duration", duration, "--status-every",
                              duration, "--snapshot-every", duration, "--checkpoint-every", duration],
                             cwd=d, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)),
                                  "EDM_OPT_CACHE": str(Path(tempfile.gettempdir()) / "edm-opt-bench-cache")})
        rates = [float(x) for x in re.findall(r"([\d.]+) img/s", out.stdout)]
        if out.returncode or not rates:
            raise RuntimeError(out.stderr[-2000:])
        return rates[-1]


def gpu_throughput():
    from edm_opt.networks import build_network

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results = {}
    for precision in ("fp32", "bf16"):
        for compiled in (False, True):
            torch.manual_seed(0)
            net = build_network("edm2-img64-xs").to(dev).train()
            fwd = torch.compile(net) if compiled else net
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            b = 64
            x = torch.randn(b, 3, 64, 64, device=dev)
            y = torch.nn.functional.one_hot(torch.randint(1000, (b,), device=dev), 1000).float()
            s = torch.rand(b, device=dev) + 0.1

            def step():
                with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                    d, u = fwd(x, s, y, return_logvar=True)
                loss = ((d.float() - x) ** 2).mean() + u.float().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            results[(precision, compiled)] = 20 * b / (time.perf_counter() - t)
    base = results[("fp32", False)]
    for (precision, compiled), v in results.items():
        print(f"[gpu] edm2-img64-xs {precision}{' +compile' if compiled else ''}: {v:8.1f} img/s "
              f"({v / base:.2f}x fp32)")


VARIANTS = {"edm2": {"schedule": "edm2"},
            **{f"optimal {v}": {"opt_variant": v} for v in ("paper", "floor", "base-below", "edm2-tilt")}}


def variant_step_times(repeats: int, duration: str) -> None:
    """Mean optimiser-step time of each optimal variant against edm2's (tracking off, interleaved, min kept)."""
    times = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, schedule in VARIANTS.items():
            r = one_run("edm2-nano", duration, duration, False, **schedule)
            times[name].append(r["timers"]["steps"] / r["steps_n"])
    base = min(times["edm2"])
    for name, t in times.items():
        print(f"[variants] edm2-nano on digits, {name:<20}: step {min(t) * 1e3:6.2f} ms "
              f"({100 * (min(t) / base - 1):+5.1f}% against edm2)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", default="16Ki")
    ap.add_argument("--skip-ranks", action="store_true")
    ap.add_argument("--only", choices=["variants", "tracking", "ranks"], default=None, help="Run one section only.")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only == "ranks":  # the launchers side by side, interleaved, best of the repeats
        rates = {"torchrun": [], "localrun": []}
        for _ in range(args.repeats):
            for launcher, sink in rates.items():
                sink.append(ranks_throughput(2, args.duration, launcher))
        t, l_ = max(rates["torchrun"]), max(rates["localrun"])
        print(f"[ranks] edm2-mini on digits, 2 ranks: torchrun --standalone {t:.0f} img/s, edm_opt.localrun "
              f"{l_:.0f} img/s ({l_ / t:.2f}x)")
        return
    one_run("edm2-nano", "2Ki", 512, True)  # warm caches: J*, J*_up, mlflow import, sqlite creation
    if args.only == "variants":
        variant_step_times(args.repeats, args.duration)
        return

    # A status sends ~70 metrics (--log-per-sigma gaps) and a gap-curve image; the cheap scalars go every
    # --log-every images (default duration/256). MLflow's SQLite store spends its CPU on cores training uses.
    for steps, what in ((None, "the defaults: status and --log-every"), (24, "3Ki images: the densest status cadence "
                        "of the shipped sweeps"), (4, "stress")):
        on, off = [], []
        for _ in range(args.repeats):  # interleaved: on, off, on, off, ...
            for logging, sink in ((True, on), (False, off)):
                r = one_run("edm2-nano", args.duration, None if steps is None else steps * 128, logging)
                sink.append(r["timers"]["steps"] / r["steps_n"])
        print(f"[tracking] edm2-nano, {what}: step {min(on) * 1e3:.2f} ms with MLflow, {min(off) * 1e3:.2f} ms "
              f"without: overhead {100 * (min(on) / min(off) - 1):+.1f}% (target <= 3%)")
    # MLflow's system-metrics monitor (off by default on SQLite): on against off, both with MLflow
    on, off = [], []
    for _ in range(args.repeats):
        for system, sink in ((True, on), (False, off)):
            r = one_run("edm2-nano", args.duration, None, True, system_metrics=system)
            sink.append(r["timers"]["steps"] / r["steps_n"])
    print(f"[tracking] system metrics every 10 s on a SQLite store: step {min(on) * 1e3:.2f} ms on, "
          f"{min(off) * 1e3:.2f} ms off: overhead {100 * (min(on) / min(off) - 1):+.1f}%")
    if args.only == "tracking":
        return

    # The held-out share depends on the run's length: one evaluation (2 x 64 images x 32 sigmas, EMA and
    # raw weights) per default status interval (duration/64, floored by training.heldout_floor). Measure both
    # costs once, then the share for runs of several lengths.
    from edm_opt.config import parse_nimg
    from edm_opt.config import resolve_config

    n = parse_nimg(args.duration)
    r = one_run("edm2-mini", args.duration, n // 8, True)
    t_eval = r["timers"]["heldout"] / 8
    t_step = r["timers"]["steps"] / r["steps_n"]
    print(f"[held-out] edm2-mini on digits: one held-out evaluation {t_eval:.2f} s = {t_eval / t_step:.1f} "
          f"optimiser steps of 128 images ({t_step * 1e3:.0f} ms each)")
    for length in ("64Ki", "256Ki", "1Mi", "8Mi"):
        cfg = resolve_config(TrainConfig(data="digits", preset="edm2-mini", duration=length))
        evaluations = -(-cfg.duration // cfg.status_every)  # the last one at the end of the run
        t_train = cfg.duration / cfg.batch * t_step
        share = evaluations * t_eval / (evaluations * t_eval + t_train)
        print(f"[held-out]   {length:>5} images: default status every {cfg.status_every:>6} images, {evaluations:>2} "
              f"evaluations, {100 * share:4.1f}% of run time (target <= 5%)")

    variant_step_times(args.repeats, args.duration)
    if not args.skip_ranks:
        one, two = ranks_throughput(1, args.duration), ranks_throughput(2, args.duration)
        print(f"[ranks] edm2-mini on digits: 1 rank {one:.0f} img/s, 2 ranks {two:.0f} img/s ({two / one:.2f}x)")
    if torch.cuda.is_available():
        gpu_throughput()
    else:
        print("[gpu] no CUDA device: skipped")


if __name__ == "__main__":
    main()
