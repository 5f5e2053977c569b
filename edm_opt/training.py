"""The training loop as a library function: steps, accumulation, EMA, lr schedule, measurement, resume.

`train(cfg)` runs one training run (`runners/train.py`, `edm-opt train`, sweep cells) in one process or
as one rank under torchrun. Everything a run writes follows DESIGN.md: the run directory, the MLflow
naming contract (step = images seen), atomic rotating checkpoints, kept EMA snapshots, resume into the same
MLflow run when the same command is run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import EdmOptError
from . import contract as C
from . import distributed as D
from .config import (ConfigError, TrainConfig, describe_schedule, format_nimg, needs_upper, parse_sigmas_checked,
                     resolve_config)
from .contract import RunInfo
from .data import load_dataset
from .diffusion import LogNormal
from .ema import EMA, parse_profiles
from .evaluation import TrainingFID
from .fileio import write_json
from .heldout import HeldOutSet, heldout_losses
from .latents import VAE_NAME, LatentError, decoder, preview
from .networks import get_preset
from .networks.presets import ARCHITECTURES, network_kwargs
from .optimal_loss import resolve_jstar, upper_bound_for_dataset, upper_cache_path
from .progress import progress as progress_bar
from .recorder import RunRecorder, StatusReporter, plain, save_snapshot
from .rundir import RunDir
from .sampling import generate
from .schedule import OptimalParams, make_schedule
from .tracking import set_run_status

WARMUP_CAP = 0.05  # the lr warm-up never exceeds 5% of the run (method.md section 6)


class TrainingError(EdmOptError, RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message says why and what was saved."""


# --------------------------------------------------------------------------------------------------
# Configuration


def lr_at(cfg: TrainConfig, nimg: int) -> float:
    """alpha_ref / sqrt(max(nimg / t_ref, 1)) x min(nimg / warm-up, 1), in images (method.md section 6)."""
    lr = cfg.lr
    if cfg.lr_tref:
        lr /= math.sqrt(max(nimg / cfg.lr_tref, 1.0))
    warmup = min(cfg.lr_warmup, WARMUP_CAP * cfg.duration)
    if warmup > 0:
        lr *= min(nimg / warmup, 1.0)
    return lr


# --------------------------------------------------------------------------------------------------
# Data order: a permutation stream shared by all ranks


class BatchStream:
    """Global batches of indices from successive random permutations (same on every rank)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen)
        self.pos = 0

    def next(self, size: int) -> torch.Tensor:
        out = []
        while size > 0:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = min(size, self.n - self.pos)
            out.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            size -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.gen.set_state(d["gen"])
        self.perm, self.pos = d["perm"].clone(), int(d["pos"])


# --------------------------------------------------------------------------------------------------
# The run


def train(cfg: TrainConfig, echo=print) -> dict:
    """Run (or resume, or find finished) one training run. Returns a summary dict (rank 0: full)."""
    env = D.read_env(cfg.device)
    r = resolve_config(cfg, env.world_size)
    dataset = load_dataset(r.data, r.resolution, r.xflip, progress=env.is_main)
    if r.class_conditional and dataset.labels is None:
        raise ConfigError(f"class_conditional: {dataset.spec.source} has no labels; use --unconditional")
    grid = parse_sigmas_checked(r.sigmas)
    try:  # the resolution against the preset before any estimate
        network_kwargs(r.preset, dataset.resolution, dataset.channels, dataset.num_classes if r.class_conditional else 0)
    except ValueError as e:
        raise ConfigError(f"preset: {e}") from None
    run = RunDir(Path(r.outdir) / r.experiment / r.run_name)
    lock, new = None, None
    if env.is_main:  # the run directory is this process's for the run's life; what a killed write left is removed
        new = run.probe_writable()
        lock = run.lock()
        run.remove_stale_temporaries()
    try:
        return _train_locked(r, env, dataset, grid, run, echo)
    finally:
        if lock is not None:
            if new is not None:  # e.g. a J* table of other data: no empty run directory is left behind
                run.remove_if_unused(new)
            lock.release()


def _train_locked(r: TrainConfig, env: D.DistEnv, dataset, grid: np.ndarray, run: RunDir, echo) -> dict:
    prior = run.read_info() if run.exists() else None
    if prior is not None:
        _check_resume(r, prior, dataset, run)
        if r.restart:
            prior = dataclasses.replace(prior, mlflow_run_id=None) if env.is_main else prior
            if env.is_main:
                echo(f"restarting {run.path.name} from 0 images into a new MLflow run; its files of before are in "
                     f"{run.set_aside()}")
    # J* before the process group: rank 0 estimates into the cache, the others wait for the file; on CPU
    # rank 0 takes every core meanwhile (torchrun gives each rank OMP_NUM_THREADS=1)
    threads = torch.get_num_threads()
    if env.is_main and env.device.type == "cpu":
        torch.set_num_threads(max(threads, os.cpu_count() or 1))
    try:
        jstar, jstar_path = resolve_jstar(r.jstar, dataset, grid, r.class_conditional, device=env.device,
                                          progress=env.is_main, wait=not env.is_main,
                                          upper=needs_upper(r), echo=echo if env.is_main else lambda line: None)
        if jstar.upper is None and upper_cache_path(dataset, grid, r.class_conditional).exists():
            jstar.upper = upper_bound_for_dataset(dataset, grid, r.class_conditional)  # logged when known
    finally:
        torch.set_num_threads(threads)
    D.init(env)
    try:
        return Trainer(r, env, dataset, jstar, Path(jstar_path), run, prior, echo).run()
    finally:
        D.shutdown()


def _check_resume(r: TrainConfig, prior: RunInfo, dataset, run: RunDir) -> None:
    conflicts = r.resume_conflicts(prior.config)
    if conflicts:
        k = conflicts[0]
        raise ConfigError(f"{run.info_path}: option '{k}' was {prior.config.get(k)!r} and is now {getattr(r, k)!r}; "
                          f"only --duration may change when resuming a run (changed: {', '.join(conflicts)}). "
                          f"Use another --run-name for a new run.")
    fp = prior.data.get("fingerprint")
    if fp and fp != dataset.fingerprint:
        raise ConfigError(f"{run.info_path}: the run was trained on data with fingerprint {fp[:16]}..., "
                          f"{dataset.spec.source} now has {dataset.fingerprint[:16]}...")


@dataclass
class TrainState:
    """What a checkpoint holds besides the modules' own states: progress, the random streams of every rank, the
    MLflow run, its unsent metrics and the per-sigma history (tensors and primitive containers only, so a
    checkpoint loads with torch.load(weights_only=True))."""

    nimg: int = 0
    step: int = 0
    rng: list = field(default_factory=list)  # per rank: {"gen", "noise", "torch"[, "cuda"]}
    mlflow_run_id: str | None = None
    pending_metrics: list = field(default_factory=list)
    history: dict | None = None  # contract.PerSigmaHistory.to_json()


class Meter:
    """Loss and throughput over one interval on this rank: summed per step, all-reduced and reset when read."""

    def __init__(self):
        self.sums = torch.zeros(2, dtype=torch.float64)  # per-sample losses, samples
        self.images, self.seconds = 0, 0.0

    def add(self, loss_sum: float, samples: int, images: int, seconds: float) -> None:
        self.sums += torch.tensor([loss_sum, float(samples)], dtype=torch.float64)
        self.images += images
        self.seconds += seconds

    def read(self, all_reduce) -> tuple[float, float]:
        """(mean per-sample loss over every rank, images per second of training steps)."""
        all_reduce(self.sums)
        out = self.sums[0].item() / max(self.sums[1].item(), 1), self.images / max(self.seconds, 1e-9)
        self.sums.zero_()
        self.images, self.seconds = 0, 0.0
        return out


class Trainer:
    """One rank's training run: network, schedule, EMAs, optimiser and data order, built in __init__; `run` resumes
    from the newest checkpoint and loops (step, status, snapshot, FID, checkpoint) to the duration."""

    def __init__(self, r: TrainConfig, env: D.DistEnv, dataset, jstar, jstar_path: Path, run_dir: RunDir,
                 prior: RunInfo | None, echo):
        self.r, self.env, self.dataset, self.jstar, self.jstar_path = r, env, dataset, jstar, jstar_path
        self.run_dir, self.prior, self.echo, self.device = run_dir, prior, echo, env.device
        self.grid = jstar.sigmas
        self.state = TrainState()
        self.stop_signal: int | None = None
        self.timers = {"steps": 0.0, "heldout": 0.0, "snapshots": 0.0, "checkpoints": 0.0, "fid": 0.0}
        self.preset = get_preset(r.preset)
        try:
            self.net_kwargs = network_kwargs(r.preset, dataset.resolution, dataset.channels,
                                             dataset.num_classes if r.class_conditional else 0,
                                             dropout=r.dropout, precond=r.precond)
        except ValueError as e:
            raise ConfigError(f"preset: {e}") from None
        torch.manual_seed(r.seed)  # identical initial weights on every rank
        net = ARCHITECTURES[self.preset.arch](**self.net_kwargs).to(self.device).train()
        self.schedule = make_schedule(r.schedule, self.grid, LogNormal(r.P_mean, r.P_std), jstar, r.base_schedule,
                                      net.sigma_data, r.opt_decay, OptimalParams.from_config(r))
        if not self.schedule.uses_logvar:  # the log-variance head is trained only by EDM2's loss
            for name, p in net.named_parameters():
                if name.startswith("logvar_"):
                    p.requires_grad_(False)
        self.net = net
        self.emas = [EMA(net, kind, value) for kind, value in parse_profiles(r.ema)]
        self.opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=r.lr,
                                    betas=tuple(self.preset.adam_betas), eps=1e-8)
        self.ddp = net
        if env.active:
            self.ddp = DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp) if r.compile else self.ddp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=r.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.precision)
        self.heldout = HeldOutSet.build(dataset, self.grid, r.heldout_per_sigma, r.class_conditional)
        self.stream = BatchStream(dataset.num_images, r.seed)
        self.gen = torch.Generator().manual_seed(r.seed * 1000003 + env.rank + 1)  # sigma draws, per rank
        self.noise_gen = torch.Generator(self.device).manual_seed(r.seed * 1000003 + env.rank + 7919)
        torch.manual_seed(r.seed * 1000003 + env.rank)  # dropout
        self.labels = dataset.labels if r.class_conditional else None
        self.fid = TrainingFID(dataset, env, r.fid_images, r.fid_ref_images) if r.fid_every else None
        self.decode = None  # latents: the VAE decoder for the snapshots' sample grids, when installed
        if dataset.latent is not None and env.is_main:
            try:
                self.decode = decoder(dataset.latent, self.device)
            except LatentError:
                self.echo(f"latent data without the VAE decoder ({VAE_NAME}): sample grids show latent channels 0-2")
        self.per_rank = r.batch // env.world_size
        self.micro = min(r.batch_gpu or self.per_rank, self.per_rank)
        self.all_reduce = self._all_reduce if env.active else None
        self.recorder: RunRecorder | None = None  # rank 0, once the run starts
        self.reporter: StatusReporter | None = None

    @property
    def nimg(self) -> int:
        return self.state.nimg

    @contextlib.contextmanager
    def _timed(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timers[key] += time.perf_counter() - t0

    def _all_reduce(self, t: torch.Tensor) -> None:
        D.all_reduce_sum(self.env, t)

    # the run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        r, env = self.r, self.env
        resumed = self._load_checkpoint()
        if resumed and self.nimg >= r.duration:
            if env.is_main:
                self._finish_already_done()
            return {"run_dir": str(self.run_dir.path), "nimg": self.nimg, "status": "already finished"}
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        status = "FAILED"
        try:
            if env.is_main:
                self._start_recording(resumed)
            result = self._loop()
            status = "KILLED" if self.stop_signal else "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.recorder is not None:
                self.recorder.finish(status)

    def _start_recording(self, resumed: bool) -> None:
        r = self.r
        self.recorder = RunRecorder(r, self.dataset, self.jstar, self.jstar_path, self.run_dir, self.prior, self.net,
                                    self.net_kwargs, self.preset.arch, self.schedule, self.device)
        self.recorder.start(self.state.pending_metrics if resumed else None)
        history = self.recorder.history(self.state.history, self.nimg) if resumed else None
        self.bar = progress_bar(total=r.duration, initial=self.nimg, desc="train", unit="img", unit_scale=True)
        self.say = self.bar.write if isinstance(self.bar, tqdm) else self.echo  # lines above a live bar
        self.reporter = StatusReporter(r, self.jstar, self.jstar_path, self.run_dir, self.recorder, history, self.say)
        self.echo(f"run {r.run_name}: {self.recorder.param_count:,} parameters, "
                  f"{self.recorder.flops_per_image / 1e6:.2f} MFLOP/img (fwd+bwd), schedule {describe_schedule(r)}, "
                  f"{format_nimg(r.duration)} images, batch {r.batch}, {self.env.world_size} rank(s) on "
                  f"{self.device}\n  run dir {self.run_dir.path}\n  MLflow run {self.recorder.run_id} at "
                  f"{self.recorder.uri}")

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.env.is_main:
            print(f"\nsignal {signum}: writing a checkpoint at the end of this step, then stopping "
                  f"(again to abort)", file=sys.stderr, flush=True)

    def _loop(self) -> dict:
        r, env, st = self.r, self.env, self.state
        status, log = Meter(), Meter()  # the status line's interval and the cheap scalars' (log_every)
        t_start, nimg_at_start = time.perf_counter(), st.nimg
        while st.nimg < r.duration:
            # step
            t0 = time.perf_counter()
            lr = lr_at(r, st.nimg + r.batch)
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss_sum, sig, err = self._train_step()
            st.step += 1
            st.nimg += r.batch
            for ema in self.emas:
                ema.update(self.net, st.step, st.nimg, r.batch)
            self.schedule.observe(sig, err)
            self.schedule.after_step(st.step, self.all_reduce)
            flags = torch.tensor([0.0 if math.isfinite(loss_sum) else 1.0, 1.0 if self.stop_signal else 0.0])
            self._all_reduce(flags)
            if flags[0] > 0:
                self._nonfinite(sig, err, lr)
            seconds = time.perf_counter() - t0
            self.timers["steps"] += seconds
            for meter in (status, log):
                meter.add(loss_sum, len(sig), r.batch, seconds)
            done, stopping = st.nimg >= r.duration, flags[1] > 0
            # status. On a stop, only the checkpoint: an extra held-out evaluation could outlast torchrun's 30 s
            # grace between SIGTERM and SIGKILL on busy cores, leaving the run RUNNING without its KILLED status.
            if self._crossed(r.status_every) or done:
                elapsed = time.perf_counter() - t_start
                loss, img_per_s = status.read(self._all_reduce)
                self._status(lr, loss, img_per_s, elapsed, elapsed / max(st.nimg - nimg_at_start, 1) *
                             (r.duration - st.nimg))
            # the cheap scalars after the status: loss/train is the last key of a step (what a resume reads)
            if self._crossed(r.log_every) or done:
                loss, img_per_s = log.read(self._all_reduce)
                if env.is_main:
                    scalars = {C.LR: lr, C.IMG_PER_S: img_per_s}
                    if self.device.type == "cuda":  # this rank's peak since the start (GiB)
                        scalars[C.PEAK_MEM_GB] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
                    self.recorder.log_metrics({**scalars, C.LOSS_TRAIN: loss}, step=st.nimg)
                    self.bar.update(st.nimg - self.bar.n)
                    self.bar.set_postfix_str(f"loss {loss:.4f}, steps alone {img_per_s:.0f} img/s")
            # snapshot, FID, checkpoint
            if self._crossed(r.snapshot_every) or done:
                with self._timed("snapshots"):
                    self._snapshot()
            if self.fid is not None and (self._crossed(r.fid_every) or done):
                with self._timed("fid"):
                    self._evaluate_fid()
            if self._crossed(r.checkpoint_every) or done or stopping:
                with self._timed("checkpoints"):
                    self._checkpoint()
            if stopping:
                self.stop_signal = self.stop_signal or signal.SIGTERM
                if env.is_main:
                    self.say(f"stopped at {format_nimg(st.nimg)} images; re-run the same command to resume")
                break
        if env.is_main:
            self.bar.close()
        total = sum(self.timers.values())
        if env.is_main and total > 0:
            self.echo("time: " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in self.timers.items()))
        return {"run_dir": str(self.run_dir.path), "nimg": st.nimg,
                "mlflow_run_id": self.recorder.run_id if self.recorder else None,
                "status": "stopped" if self.stop_signal else "finished", "timers": dict(self.timers)}

    def _crossed(self, every: int) -> bool:
        return self.nimg // every > (self.nimg - self.r.batch) // every

    def _train_step(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        r, env = self.r, self.env
        idx = self.stream.next(r.batch)[env.rank * self.per_rank:(env.rank + 1) * self.per_rank]
        self.opt.zero_grad(set_to_none=True)
        sigmas, errs, total = [], [], 0.0
        chunks = list(idx.split(self.micro))
        for i, j in enumerate(chunks):
            x0 = self.dataset.x0(j, self.device, self.noise_gen)  # latents: a fresh mean + std eps per draw
            labels = None
            if self.labels is not None:
                labels = torch.nn.functional.one_hot(self.labels[j], self.dataset.num_classes).float().to(self.device)
            sigma = self.schedule.sample(len(j), self.gen).to(self.device)
            noise = torch.randn(x0.shape, generator=self.noise_gen, device=self.device)
            sync = contextlib.nullcontext() if (i == len(chunks) - 1 or not self.env.active) else self.ddp.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    x = x0 + sigma.reshape(-1, 1, 1, 1) * noise
                    if self.schedule.uses_logvar:
                        denoised, logvar = self.forward(x, sigma, labels, return_logvar=True)
                        logvar = logvar.float().reshape(-1)
                    else:
                        denoised, logvar = self.forward(x, sigma, labels), None
                err = (denoised.float() - x0).square().flatten(1).mean(1)  # per-dim x0 error per sample
                loss = self.schedule.loss(err, sigma, logvar)
                self.scaler.scale(loss.sum() / self.per_rank).backward()
            sigmas.append(sigma.detach().cpu())
            errs.append(err.detach().cpu())
            total += float(loss.detach().sum())
        self.scaler.step(self.opt)
        self.scaler.update()
        return total, torch.cat(sigmas), torch.cat(errs)

    # measurement ----------------------------------------------------------------------------------
    def _status(self, lr: float, train_loss: float, img_per_s: float, elapsed: float, eta: float) -> None:
        env = self.env
        self.schedule.flush(self.all_reduce)
        kw = dict(rank=env.rank, world_size=env.world_size, all_reduce=self.all_reduce)
        with self._timed("heldout"):
            ema_loss, ema_se = heldout_losses(self.emas[0].net, self.heldout, self.device, **kw)
            raw_loss, _ = heldout_losses(self.net, self.heldout, self.device, **kw)
        if env.is_main:
            self.reporter.report(self.nimg, ema_loss, ema_se, raw_loss, self.schedule, self._logvar_grid(), train_loss,
                                 lr, img_per_s, eta, elapsed, self.device)

    def _logvar_grid(self) -> np.ndarray | None:
        """EDM2's learned log-variance u at the grid points, when the schedule trains it (for its loss shares)."""
        if not self.schedule.uses_logvar:
            return None
        with torch.no_grad():
            u = self.net.logvar(torch.tensor(self.grid, dtype=torch.float32, device=self.device))
            return u.flatten().double().cpu().numpy()

    def _snapshot(self) -> None:
        if not self.env.is_main:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # a preview: 18 Heun steps (35 evaluations); FID evaluation uses the full 32
            images, _ = generate(self.emas[0].net, range(64), batch_size=64, num_steps=18, device=self.device,
                                 decode=self.decode)
        if self.dataset.latent is not None and self.decode is None:
            images = preview(images)
        network = {"arch": self.preset.arch, "preset": self.r.preset, "kwargs": plain(self.net_kwargs)}
        save_snapshot(self.run_dir, self.recorder, self.reporter.history, self.emas, self.nimg, network,
                      self.r.class_conditional, images, f"{self.r.run_name} at {format_nimg(self.nimg)} images")

    def _evaluate_fid(self) -> None:
        m = self.fid(self.emas[0].net)
        if m is not None:
            self.recorder.log_metrics(m, step=self.nimg)
            self.recorder.logger.set_tags({C.TAG_FID_SHA: self.fid.sha})
            line = (f"{format_nimg(self.nimg):>8} img  FID {m[C.FID]:.3f}  KID {m[C.KID]:.5f} "
                    f"({m[C.FID_NUM_IMAGES]} images)")
            self.say(line)
            self.run_dir.log(line)

    # checkpoints ----------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        env, st = self.env, self.state
        self.schedule.flush(self.all_reduce)
        rng = {"gen": self.gen.get_state(), "noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        st.rng = D.gather_objects(env, rng)
        if env.is_main:
            # what is sent within a second goes to the store first; the rest is saved in the checkpoint
            self.recorder.logger.flush(timeout=0 if self.recorder.logger.down else 1.0)
            st.mlflow_run_id, st.pending_metrics = self.recorder.run_id, self.recorder.logger.pending()
            st.history = self.reporter.history.to_json()
            self.run_dir.save_checkpoint({
                "net": self.net.state_dict(), "ema": [e.state_dict() for e in self.emas],
                "optimizer": self.opt.state_dict(), "schedule": self.schedule.state_dict(),
                "stream": self.stream.state_dict(), **dataclasses.asdict(st), "config_hash": self.r.config_hash()},
                st.nimg)
        D.barrier(env)

    def _load_checkpoint(self) -> bool:
        """Restore the newest readable checkpoint (rank 0 chooses it for every rank); False when there is none."""
        found = self.run_dir.load_latest_checkpoint() if self.prior is not None else None
        if found is None and self.env.is_main and self.run_dir.checkpoints():
            names = ", ".join(p.name for _, p in self.run_dir.checkpoints())
            raise TrainingError(f"{self.run_dir.path}: no checkpoint is readable ({names}); resuming would train from 0 "
                                f"into MLflow run {self.prior.mlflow_run_id}. Rerun with --restart to start over into "
                                f"a new MLflow run (the files move to previous-<time>/).")
        found = D.broadcast_object(self.env, None if found is None else str(found[1]))
        if found is None:
            return False
        saved = torch.load(found, map_location="cpu", weights_only=True)
        self.net.load_state_dict(saved["net"])
        for ema, s in zip(self.emas, saved["ema"]):
            ema.load_state_dict(s)
        self.opt.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.stream.load_state_dict(saved["stream"])
        self.state = TrainState(int(saved["nimg"]), int(saved["step"]), saved["rng"], saved.get("mlflow_run_id"),
                                saved.get("pending_metrics", []), saved.get("history"))
        rngs = self.state.rng
        if len(rngs) == self.env.world_size:
            rng = rngs[self.env.rank]
            self.gen.set_state(rng["gen"])
            self.noise_gen.set_state(rng["noise"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        elif self.env.is_main:
            self.echo("warning: the world size changed since the checkpoint; random streams are re-seeded")
        if self.env.is_main:
            self.echo(f"resuming {self.run_dir.path.name} from {found} ({format_nimg(self.nimg)} images)")
        return True

    def _nonfinite(self, sig, err, lr) -> None:
        path = None
        if self.env.is_main:
            path = write_json(self.run_dir.path / f"nonfinite-{self.nimg:09d}.json", {
                "nimg": self.nimg, "step": self.state.step, "lr": lr, "sigma": sig.tolist(),
                "loss_x0_per_sample": [None if not math.isfinite(v) else v for v in err.tolist()]})
        ckpt = self.run_dir.checkpoints()
        raise TrainingError(f"non-finite loss at {self.nimg} images (step {self.state.step}, lr {lr:.3g}); the batch's "
                            f"sigmas and per-sample losses are in {path}; the last good checkpoint is "
                            f"{ckpt[-1][1] if ckpt else 'none'}. Lower --lr or check the data.")

    def _finish_already_done(self) -> None:
        if self.prior.mlflow_run_id:
            set_run_status(self.prior.tracking_uri, self.prior.mlflow_run_id, "FINISHED")
        self.echo(f"{self.run_dir.path.name}: already trained for {format_nimg(self.nimg)} images "
                  f"(duration {format_nimg(self.r.duration)}); nothing to do. Raise --duration to continue.")
