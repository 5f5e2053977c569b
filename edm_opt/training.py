"""The training loop as a library function: steps, accumulation, EMA, lr schedule, measurement, resume.

`train(cfg)` runs one training run (`runners/train.py`, `edm-opt train`, sweep cells) in one process or
as one rank under torchrun. Everything a run writes follows DESIGN.md: the run directory, the MLflow
naming contract (step = images seen), atomic rotating checkpoints, kept EMA snapshots, resume into the same
MLflow run when the same command is run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import EdmOptError, __version__
from . import distributed as D
from .config import (ConfigError, TrainConfig, describe_schedule, format_nimg, needs_upper, parse_sigmas_checked,
                     resolve_config)
from .diffusion import LogNormal, sigma_key
from .fileio import write_json

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
    from .data import load_dataset
    from .optimal_loss import resolve_jstar, upper_bound_for_dataset, upper_cache_path
    from .rundir import RunDir

    dataset = load_dataset(r.data, r.resolution, r.xflip, progress=env.is_main)
    if r.class_conditional and dataset.labels is None:
        raise ConfigError(f"class_conditional: {dataset.spec.source} has no labels; use --unconditional")
    grid = parse_sigmas_checked(r.sigmas)
    run = RunDir(Path(r.outdir) / r.experiment / r.run_name)
    prior = run.read_info() if run.exists() else None
    if prior is not None:
        _check_resume(r, prior, dataset, run)
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
        return Trainer(r, env, dataset, grid, jstar, Path(jstar_path), run, prior, echo).run()
    finally:
        D.shutdown()


def _check_resume(r: TrainConfig, prior: dict, dataset, run) -> None:
    stored = prior.get("config", {})
    conflicts = r.resume_conflicts(stored)
    if conflicts:
        k = conflicts[0]
        raise ConfigError(f"{run.info_path}: option '{k}' was {stored.get(k)!r} and is now {getattr(r, k)!r}; "
                          f"only --duration may change when resuming a run (changed: {', '.join(conflicts)}). "
                          f"Use another --run-name for a new run.")
    fp = prior.get("data", {}).get("fingerprint")
    if fp and fp != dataset.fingerprint:
        raise ConfigError(f"{run.info_path}: the run was trained on data with fingerprint {fp[:16]}..., "
                          f"{dataset.spec.source} now has {dataset.fingerprint[:16]}...")


class Trainer:
    def __init__(self, r: TrainConfig, env: D.DistEnv, dataset, grid, jstar, jstar_path: Path, run, prior, echo):
        self.r, self.env, self.dataset, self.grid = r, env, dataset, grid
        self.jstar, self.jstar_path, self.run_dir, self.prior, self.echo = jstar, jstar_path, run, prior, echo
        self.device = env.device
        self.stop_signal: int | None = None
        self.starved: set[str] = set()  # bands of the grid the last status warned about
        self.logger = None
        self.history: dict = {}
        self.timers = {"steps": 0.0, "heldout": 0.0, "snapshots": 0.0, "checkpoints": 0.0, "fid": 0.0}

    @contextlib.contextmanager
    def _timed(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timers[key] += time.perf_counter() - t0

    # setup ----------------------------------------------------------------------------------------
    def _build(self) -> None:
        from .ema import EMA, parse_profiles
        from .networks import get_preset
        from .networks.presets import ARCHITECTURES, network_kwargs
        from .schedule import OptimalParams, make_schedule

        r, env = self.r, self.env
        self.preset = get_preset(r.preset)
        try:
            self.net_kwargs = network_kwargs(r.preset, self.dataset.resolution, self.dataset.channels,
                                             self.dataset.num_classes if r.class_conditional else 0,
                                             dropout=r.dropout, precond=r.precond)
        except ValueError as e:
            raise ConfigError(f"preset: {e}") from None
        torch.manual_seed(r.seed)  # identical initial weights on every rank
        net = ARCHITECTURES[self.preset.arch](**self.net_kwargs).to(self.device).train()
        self.schedule = make_schedule(r.schedule, self.grid, LogNormal(r.P_mean, r.P_std), self.jstar, r.base_schedule,
                                      net.sigma_data, r.opt_decay, OptimalParams.from_config(r))
        if not self.schedule.uses_logvar:  # the log-variance head is trained only by the edm2 schedule
            for name, p in net.named_parameters():
                if name.startswith("logvar_"):
                    p.requires_grad_(False)
        self.net = net
        self.emas = [EMA(net, kind, value) for kind, value in parse_profiles(r.ema)]
        params = [p for p in net.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=r.lr, betas=tuple(self.preset.adam_betas), eps=1e-8)
        self.ddp = net
        if env.active:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(net, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.forward = torch.compile(self.ddp) if r.compile else self.ddp
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=r.precision == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.precision)
        from .diagnose import HeldOutSet

        self.heldout = HeldOutSet.build(self.dataset, self.grid, r.heldout_per_sigma, r.class_conditional)
        self.stream = BatchStream(self.dataset.num_images, r.seed)
        self.gen = torch.Generator().manual_seed(r.seed * 1000003 + env.rank + 1)  # sigma draws, per rank
        self.noise_gen = torch.Generator(self.device).manual_seed(r.seed * 1000003 + env.rank + 7919)
        torch.manual_seed(r.seed * 1000003 + env.rank)  # dropout
        self.images = self.dataset.images  # uint8, indexed per batch
        self.labels = self.dataset.labels if r.class_conditional else None
        self.fid = None
        if r.fid_every:
            from .evaluation import TrainingFID

            self.fid = TrainingFID(self.dataset, env, r.fid_images, r.fid_ref_images)
        self.per_rank = r.batch // env.world_size
        self.micro = min(r.batch_gpu or self.per_rank, self.per_rank)
        self.nimg, self.step = 0, 0

    def _all_reduce(self, t: torch.Tensor) -> None:
        D.all_reduce_sum(self.env, t)

    # resume ---------------------------------------------------------------------------------------
    def _load_checkpoint(self) -> dict | None:
        found = self.run_dir.load_latest_checkpoint() if self.prior is not None else None
        found = D.broadcast_object(self.env, None if found is None else str(found[1]))
        if found is None:
            return None
        state = torch.load(found, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state["net"])
        for ema, s in zip(self.emas, state["ema"]):
            ema.load_state_dict(s)
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.stream.load_state_dict(state["stream"])
        rng = state["rng"][self.env.rank] if self.env.rank < len(state["rng"]) else None
        if rng is not None and len(state["rng"]) == self.env.world_size:
            self.gen.set_state(rng["gen"])
            self.noise_gen.set_state(rng["noise"])
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        elif self.env.is_main:
            self.echo("warning: the world size changed since the checkpoint; random streams are re-seeded")
        self.nimg, self.step = int(state["nimg"]), int(state["step"])
        if self.env.is_main:
            self.echo(f"resuming {self.run_dir.path.name} from {found} ({format_nimg(self.nimg)} images)")
        return state

    # tracking -------------------------------------------------------------------------------------
    def _start_tracking(self, state: dict | None) -> None:
        from .compute import count_parameters, flops_per_image
        from .config import flatten
        from .tracking import RunLogger, default_tracking_uri, git_commit

        r = self.r
        info = self.prior or {}
        uri = info.get("tracking_uri") or default_tracking_uri()
        self.param_count = count_parameters(self.net)
        self.flops_per_image = info.get("flops_per_image")
        if self.flops_per_image is None:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.flops_per_image = flops_per_image(self.net, self.dataset.resolution, self.dataset.channels,
                                                       self.net_kwargs["label_dim"], backward=True,
                                                       device=self.device)
        pending = self.run_dir.path / "pending-metrics.json"
        run_id = info.get("mlflow_run_id")
        if run_id:
            self.logger = RunLogger.resume(uri, run_id, pending_path=pending)
            if state is not None:
                self.logger.restore_pending(state.get("pending_metrics", []))
            self.logger.set_tags({"edm_opt.duration": r.duration})
        else:
            tags = {"edm_opt.dataset_fingerprint": self.dataset.fingerprint, "edm_opt.jstar_sha256": _sha256(self.jstar_path),
                    "edm_opt.git_commit": git_commit(), "edm_opt.schedule": r.schedule, "edm_opt.preset": r.preset,
                    "edm_opt.duration": r.duration, "edm_opt.run_dir": str(self.run_dir.path)}
            if r.opt_variant:
                tags["edm_opt.opt_variant"] = r.opt_variant
            if r.parent_run_id:
                tags["edm_opt.sweep"] = r.parent_run_id
            if r.cell_hash:
                tags["edm_opt.cell_hash"] = r.cell_hash
            self.logger = RunLogger.create(uri, r.experiment, r.run_name, tags, r.parent_run_id, pending_path=pending)
            params = {k: v for k, v in r.to_dict().items() if k not in TrainConfig.UNHASHED or k == "run_name"}
            params.update(flatten({"network": self.net_kwargs, "schedule": self.schedule.describe(),
                                   "data": {"fingerprint": self.dataset.fingerprint, "count": self.dataset.num_images,
                                            "preprocessing": self.dataset.preprocessing},
                                   "jstar": {"estimator": self.jstar.meta.get("estimator"),
                                             "ref_total": self.jstar.ref_total()}}))
            self.logger.log_params(flatten(params))
            up = {} if self.jstar.upper is None else {
                f"jstar_up/sigma_{sigma_key(s)}": float(v) for s, v in zip(self.grid, self.jstar.upper.values)}
            self.logger.log_metrics({"model/param_count": self.param_count,
                                     "compute/flops_per_image": self.flops_per_image,
                                     **{f"jstar/sigma_{sigma_key(s)}": float(v) for s, v in zip(self.grid, self.jstar.values)},
                                     **up}, step=0)
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            cfg_path = self.run_dir.path / "config.json"
            write_json(cfg_path, r.to_dict())
            self.logger.log_artifact(cfg_path)
            self.logger.log_artifact(self.jstar.save(self.run_dir.path / "jstar.json"))
        self.run_dir.write_info({
            "config": r.to_dict(), "data": {**self.dataset.spec.to_dict(), "fingerprint": self.dataset.fingerprint},
            "network": {"arch": self.preset.arch, "preset": r.preset, "kwargs": _plain(self.net_kwargs)},
            "jstar": {"path": str(self.run_dir.path / "jstar.json"), "source": str(self.jstar_path),
                      "sha256": _sha256(self.jstar_path)},
            "tracking_uri": uri, "mlflow_run_id": self.logger.run_id, "experiment": r.experiment,
            "param_count": self.param_count, "flops_per_image": self.flops_per_image, "edm_opt_version": __version__})
        if state is not None:
            self.history = state.get("history") or self._history_from_file()

    def _history_from_file(self) -> dict:
        """per_sigma.json cut at the checkpoint, for checkpoints that predate the history in their state;
        it is written at snapshots only, so statuses after the last snapshot are lost there."""
        hist = self.run_dir.path / "per_sigma.json"
        if not hist.exists():
            return {}
        h = json.loads(hist.read_text())
        keep = [i for i, n in enumerate(h.get("nimg", [])) if n <= self.nimg]
        return {k: ([v[i] for i in keep] if isinstance(v, list) and len(v) == len(h["nimg"]) else v)
                for k, v in h.items()}

    # the loop -------------------------------------------------------------------------------------
    def run(self) -> dict:
        r, env = self.r, self.env
        self._build()
        state = self._load_checkpoint()
        if state is not None and self.nimg >= r.duration:
            if env.is_main:
                self._finish_already_done()
            return {"run_dir": str(self.run_dir.path), "nimg": self.nimg, "status": "already finished"}
        self.nimg_at_start = self.nimg
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        status = "FAILED"
        try:
            if env.is_main:
                self._start_tracking(state)
                self._announce()
            result = self._loop()
            status = "KILLED" if self.stop_signal else "FINISHED"
            return result
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.logger is not None:
                self.logger.finish(status)

    def _announce(self) -> None:
        r, env = self.r, self.env
        self.echo(f"run {r.run_name}: {self.param_count:,} parameters, {self.flops_per_image / 1e6:.2f} MFLOP/img "
                      f"(fwd+bwd), schedule {describe_schedule(r)}, {format_nimg(r.duration)} images, batch {r.batch}, "
                      f"{env.world_size} rank(s) on {self.device}\n  run dir {self.run_dir.path}\n"
                      f"  MLflow run {self.logger.run_id} at {self.logger.uri}")

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.stop_signal = signum
        if self.env.is_main:
            print(f"\nsignal {signum}: writing a checkpoint at the end of this step, then stopping "
                  f"(again to abort)", file=sys.stderr, flush=True)

    def _loop(self) -> dict:
        r, env = self.r, self.env
        t_interval, img_interval, train_time = time.perf_counter(), 0, 0.0
        loss_acc = torch.zeros(2, dtype=torch.float64)  # sum of per-sample losses, count (this rank)
        t_start = time.perf_counter()
        while self.nimg < r.duration:
            t0 = time.perf_counter()
            lr = lr_at(r, self.nimg + r.batch)
            for g in self.opt.param_groups:
                g["lr"] = lr
            loss_sum, sig, err = self._train_step()
            self.step += 1
            self.nimg += r.batch
            for ema in self.emas:
                ema.update(self.net, self.step, self.nimg, r.batch)
            self.schedule.tracker.observe(sig, err)
            self.schedule.after_step(self.step, self._all_reduce if env.active else None)
            loss_acc += torch.tensor([loss_sum, float(len(sig))], dtype=torch.float64)
            flags = torch.tensor([0.0 if math.isfinite(loss_sum) else 1.0, 1.0 if self.stop_signal else 0.0])
            self._all_reduce(flags)
            if flags[0] > 0:
                self._nonfinite(sig, err, lr)
            train_time += time.perf_counter() - t0
            self.timers["steps"] += time.perf_counter() - t0
            img_interval += r.batch
            done = self.nimg >= r.duration
            stopping = flags[1] > 0
            # On a stop, only the checkpoint: an extra held-out evaluation could outlast torchrun's 30 s grace
            # between SIGTERM and SIGKILL on busy cores, leaving the run RUNNING without its KILLED status.
            if self._crossed(r.status_every) or done:
                self._all_reduce(loss_acc)
                self._status(lr, loss_acc[0].item() / max(loss_acc[1].item(), 1), img_interval / max(train_time, 1e-9),
                             time.perf_counter() - t_start)
                loss_acc.zero_()
                img_interval, train_time = 0, 0.0
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
                    self.echo(f"stopped at {format_nimg(self.nimg)} images; re-run the same command to resume")
                break
        total = sum(self.timers.values())
        if env.is_main and total > 0:
            self.echo("time: " + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in self.timers.items()))
        return {"run_dir": str(self.run_dir.path), "nimg": self.nimg,
                "mlflow_run_id": self.logger.run_id if self.logger else None,
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
            x0 = self.images[j].to(self.device).float() / 127.5 - 1
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
    def _status(self, lr: float, train_loss: float, img_per_s: float, elapsed: float) -> None:
        from .diagnose import heldout_losses, negative_gaps, per_sigma_metrics

        r, env = self.r, self.env
        self.schedule.tracker.flush(self._all_reduce if env.active else None)
        kw = dict(rank=env.rank, world_size=env.world_size, all_reduce=self._all_reduce if env.active else None)
        with self._timed("heldout"):
            ema_loss, ema_se = heldout_losses(self.emas[0].net, self.heldout, self.device, **kw)
            raw_loss, _ = heldout_losses(self.net, self.heldout, self.device, **kw)
        if not env.is_main:
            return
        jstar = self.jstar.values
        m = per_sigma_metrics(self.grid, ema_loss, ema_se, jstar, raw_loss)
        m.update(self.schedule.tracker.metrics())
        logvar_grid = self._logvar_grid()
        m.update(self.schedule.metrics(logvar_grid))
        self._warn_starved()
        m.update({"loss/train": train_loss, "train/lr": lr, "perf/img_per_s": img_per_s,
                  "compute/flops_total": float(self.flops_per_image) * self.nimg, **_system_metrics(self.device)})
        self.logger.log_metrics(m, step=self.nimg)
        self._append_history(ema_loss, ema_se, raw_loss, m)
        bad = negative_gaps(self.grid, ema_loss, ema_se, jstar)
        if bad:
            msg = (f"WARNING: held-out loss below J* by more than 3 standard errors ({'; '.join(bad[:3])}). "
                   f"This means a bug or a J* table of other data ({self.jstar_path}).")
            print(msg, file=sys.stderr, flush=True)
            self.logger.set_tags({"edm_opt.warning": msg[:500]})
        eta = elapsed / max(self.nimg - self.nimg_at_start, 1) * (r.duration - self.nimg)
        line = (f"{format_nimg(self.nimg):>8} img  loss {train_loss:.4f}  ref gap {m['gap/ref_total']:.4f} "
                f"(J* {m['jstar/ref_total']:.4f})  lr {lr:.2e}  {img_per_s:7.1f} img/s  "
                f"elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min")
        self.echo(line)
        self.run_dir.log(line)

    def _logvar_grid(self) -> np.ndarray | None:
        """EDM2's learned log-variance u at the grid points, when the schedule trains it (for its loss shares)."""
        if not self.schedule.uses_logvar:
            return None
        with torch.no_grad():
            u = self.net.logvar(torch.tensor(self.grid, dtype=torch.float32, device=self.device))
            return u.flatten().double().cpu().numpy()

    def _warn_starved(self) -> None:
        """One line when a band of the grid newly gets less than half of its base schedule's share (method.md 4.4)."""
        from .schedule import starved_bands

        if self.r.schedule != "optimal" or not getattr(self.schedule, "warm", False):
            return
        bad = starved_bands(self.grid, self.schedule.shares(self._logvar_grid()), self.schedule.base_shares())
        new = [b for b in bad if b.split(":")[0] not in self.starved]
        self.starved = {b.split(":")[0] for b in bad}
        if new:
            line = (f"warning: {format_nimg(self.nimg)} img: the {self.r.opt_variant} schedule gives less than half "
                    f"of {self.r.base_schedule}'s share of the training signal to {'; '.join(new)}")
            print(line, file=sys.stderr, flush=True)
            self.run_dir.log(line)

    def _append_history(self, ema_loss, ema_se, raw_loss, m) -> None:
        h = self.history
        if not h:
            h.update({"sigmas": self.grid.tolist(), "jstar": self.jstar.values.tolist(),
                      "jstar_stderr": self.jstar.stderr.tolist(), "param_count": self.param_count,
                      "flops_per_image": self.flops_per_image, "schedule": self.r.schedule, "preset": self.r.preset,
                      "nimg": [], "loss_x0": [], "stderr": [], "loss_x0_raw": [], "loss_x0_batch": [],
                      "p_sigma": [], "ref_total": [], "flops_total": []})
        h["nimg"].append(self.nimg)
        h["loss_x0"].append([float(v) for v in ema_loss])
        h["stderr"].append([float(v) for v in ema_se])
        h["loss_x0_raw"].append([float(v) for v in raw_loss])
        h["loss_x0_batch"].append([None if math.isnan(v) else float(v) for v in self.schedule.tracker.ema.tolist()])
        p = getattr(self.schedule, "p", None)
        h["p_sigma"].append(None if p is None else [float(v) for v in p])
        h.setdefault("share", [None] * (len(h["nimg"]) - 1)).append(  # histories from before shares: None
            [m[f"sched/share_sigma_{sigma_key(s)}"] for s in self.grid])
        h["ref_total"].append(m["loss/ref_total"])
        h["flops_total"].append(m["compute/flops_total"])

    def _snapshot(self) -> None:
        if not self.env.is_main:
            return
        from .plots import plot_gap

        nimg = self.nimg
        path = self.run_dir.save_snapshot({
            "net": self.emas[0].net.state_dict(), "ema": self.emas[0].name, "nimg": nimg,
            "network": {"arch": self.preset.arch, "preset": self.r.preset, "kwargs": _plain(self.net_kwargs)},
            "data": {**self.dataset.spec.to_dict(), "fingerprint": self.dataset.fingerprint},
            "class_conditional": self.r.class_conditional, "edm_opt_version": __version__}, nimg)
        hist = write_json(self.run_dir.path / "per_sigma.json", self.history, indent=None)
        self.logger.log_artifact(hist)
        if self.history:
            self.logger.log_artifact(plot_gap(self.history, self.run_dir.path / "gap.png",
                                              title=f"{self.r.run_name} at {format_nimg(nimg)} images"))
        grid_png = self._sample_grid(self.run_dir.path / f"samples-{nimg:09d}.png")
        self.logger.log_artifact(grid_png, "samples")
        self.run_dir.log(f"snapshot {path.name}")

    def _evaluate_fid(self) -> None:
        m = self.fid(self.emas[0].net)
        if m is not None:
            self.logger.log_metrics(m, step=self.nimg)
            self.logger.set_tags({"edm_opt.fid_weights_sha256": self.fid.sha})
            line = f"{format_nimg(self.nimg):>8} img  FID {m['fid']:.3f}  KID {m['kid']:.5f} ({m['fid/num_images']} images)"
            self.echo(line)
            self.run_dir.log(line)

    def _sample_grid(self, path: Path) -> Path:
        from .sampling import generate
        from .plots import save_image_grid

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # a preview: 18 Heun steps (35 evaluations); FID evaluation uses the full 32
            images, _ = generate(self.emas[0].net, range(64), batch_size=64, num_steps=18, device=self.device)
        return save_image_grid(images, path)

    def _checkpoint(self) -> None:
        env = self.env
        self.schedule.tracker.flush(self._all_reduce if env.active else None)
        rng = {"gen": self.gen.get_state(), "noise": self.noise_gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = D.gather_objects(env, rng)
        if env.is_main:
            self.logger.flush(timeout=10)  # metrics before the checkpoint go to the store first
            state = {"net": self.net.state_dict(), "ema": [e.state_dict() for e in self.emas],
                     "optimizer": self.opt.state_dict(), "schedule": self.schedule.state_dict(),
                     "stream": self.stream.state_dict(), "rng": rngs, "nimg": self.nimg, "step": self.step,
                     "mlflow_run_id": self.logger.run_id, "pending_metrics": self.logger.pending(),
                     "history": self.history, "config_hash": self.r.config_hash()}
            self.run_dir.save_checkpoint(state, self.nimg)
        D.barrier(env)

    def _nonfinite(self, sig, err, lr) -> None:
        path = None
        if self.env.is_main:
            path = write_json(self.run_dir.path / f"nonfinite-{self.nimg:09d}.json", {
                "nimg": self.nimg, "step": self.step, "lr": lr, "sigma": sig.tolist(),
                "loss_x0_per_sample": [None if not math.isfinite(v) else v for v in err.tolist()]})
        ckpt = self.run_dir.checkpoints()
        raise TrainingError(f"non-finite loss at {self.nimg} images (step {self.step}, lr {lr:.3g}); the batch's sigmas "
                            f"and per-sample losses are in {path}; the last good checkpoint is "
                            f"{ckpt[-1][1] if ckpt else 'none'}. Lower --lr or check the data.")

    def _finish_already_done(self) -> None:
        from .tracking import set_run_status

        info = self.prior or {}
        if info.get("mlflow_run_id"):
            set_run_status(info.get("tracking_uri"), info["mlflow_run_id"], "FINISHED")
        self.echo(f"{self.run_dir.path.name}: already trained for {format_nimg(self.nimg)} images "
                  f"(duration {format_nimg(self.r.duration)}); nothing to do. Raise --duration to continue.")


def _plain(d: dict) -> dict:
    """Tuples to lists: checkpoint- and JSON-safe constructor keywords."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _system_metrics(device) -> dict:
    import psutil

    proc = psutil.Process()
    m = {"system/cpu_rss_gb": proc.memory_info().rss / 2 ** 30, "system/cpu_percent": psutil.cpu_percent()}
    if device.type == "cuda":
        m["system/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return m
