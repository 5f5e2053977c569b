"""What a training run records, on rank 0: its MLflow run and run.json (`RunRecorder`), and at each status the
held-out evaluation's metrics, the per-sigma history and the status line (`StatusReporter`); snapshots
(`save_snapshot`). Every name it writes comes from `edm_opt.contract`; step = training images seen.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import psutil
import torch

from . import __version__
from . import contract as C
from .compute import count_parameters, flops_per_image
from .config import TrainConfig, describe_schedule, flatten, format_nimg
from .fileio import write_json
from .heldout import negative_gaps, per_sigma_metrics
from .plots import plot_gap, plot_gap_curve, save_image_grid
from .rundir import RunDir
from .tracking import RunLogger, default_tracking_uri, git_commit, sqlite_path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plain(d: dict) -> dict:
    """Tuples to lists: checkpoint- and JSON-safe constructor keywords."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


class RunRecorder:
    """A run's MLflow run and run.json (rank 0): created with its params, tags and constants, or resumed from the
    run.json of an earlier attempt; metrics are buffered by `tracking.RunLogger` (never stalling training)."""

    def __init__(self, r: TrainConfig, dataset, jstar, jstar_path: Path, run_dir: RunDir, prior: C.RunInfo | None,
                 net: torch.nn.Module, net_kwargs: dict, arch: str, schedule, device: torch.device):
        self.r, self.dataset, self.jstar, self.jstar_path, self.run_dir = r, dataset, jstar, jstar_path, run_dir
        self.prior, self.net_kwargs, self.arch, self.schedule = prior, net_kwargs, arch, schedule
        self.param_count = count_parameters(net)
        self.flops_per_image = prior.flops_per_image if prior else None
        if self.flops_per_image is None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                self.flops_per_image = flops_per_image(net, dataset.resolution, dataset.channels,
                                                       net_kwargs["label_dim"], backward=True, device=device)
        self.logger: RunLogger | None = None

    @property
    def run_id(self) -> str | None:
        return self.logger.run_id if self.logger else None

    @property
    def uri(self) -> str | None:
        return self.logger.uri if self.logger else None

    def start(self, pending: list | None) -> None:
        """Resume the MLflow run of run.json (restoring a checkpoint's unsent metrics) or create it; write run.json."""
        r = self.r
        uri = (self.prior.tracking_uri if self.prior else None) or default_tracking_uri()
        pending_path = self.run_dir.path / "pending-metrics.json"
        run_id = self.prior.mlflow_run_id if self.prior else None
        if run_id:
            self.logger = RunLogger.resume(uri, run_id, pending_path=pending_path)
            if pending is not None:
                self.logger.restore_pending(pending)
            self.logger.set_tags({C.TAG_DURATION: r.duration})
        else:
            self._create(uri, pending_path)
        if r.system_metrics or (r.system_metrics is None and sqlite_path(uri) is None):
            self.logger.start_system_metrics(resume=bool(run_id))
        self.run_dir.write_info(C.RunInfo(
            config=r.to_dict(), data={**self.dataset.spec.to_dict(), "fingerprint": self.dataset.fingerprint},
            network={"arch": self.arch, "preset": r.preset, "kwargs": plain(self.net_kwargs)},
            jstar={"path": str(self.run_dir.path / C.JSTAR_ARTIFACT), "source": str(self.jstar_path),
                   "sha256": sha256(self.jstar_path)},
            tracking_uri=uri, mlflow_run_id=self.logger.run_id, experiment=r.experiment, param_count=self.param_count,
            flops_per_image=self.flops_per_image, edm_opt_version=__version__))

    def _create(self, uri: str, pending_path: Path) -> None:
        r, jstar = self.r, self.jstar
        commit = git_commit()
        tags = {C.TAG_FINGERPRINT: self.dataset.fingerprint, C.TAG_JSTAR_SHA: sha256(self.jstar_path),
                C.TAG_GIT_COMMIT: commit, C.TAG_SCHEDULE: r.schedule, C.TAG_PRESET: r.preset,
                C.TAG_DURATION: r.duration, C.TAG_RUN_DIR: str(self.run_dir.path),
                # MLflow's own lineage fields: the run page's Source, Created by and description
                C.TAG_SOURCE_NAME: "edm-opt train", C.TAG_SOURCE_TYPE: "LOCAL", C.TAG_SOURCE_COMMIT: commit,
                C.TAG_USER: getpass.getuser(), C.TAG_NOTE: self.description()}
        optional = {C.TAG_VARIANT: r.opt_variant, C.TAG_SWEEP: r.parent_run_id, C.TAG_CELL_HASH: r.cell_hash}
        tags.update({k: v for k, v in optional.items() if v})
        self.logger = RunLogger.create(uri, r.experiment, r.run_name, tags, r.parent_run_id, pending_path=pending_path)
        params = {k: v for k, v in r.to_dict().items() if k not in TrainConfig.UNHASHED or k == "run_name"}
        params.update(flatten({"network": self.net_kwargs, "schedule": self.schedule.describe(),
                               "data": {"fingerprint": self.dataset.fingerprint, "count": self.dataset.num_images,
                                        "preprocessing": self.dataset.preprocessing},
                               "jstar": {"estimator": jstar.meta.get("estimator"), "ref_total": jstar.ref_total()}}))
        self.logger.log_params(flatten(params))
        constants = {C.PARAM_COUNT: self.param_count, C.FLOPS_PER_IMAGE: self.flops_per_image,
                     **C.sigma_metrics(C.JSTAR, jstar.sigmas, jstar.values)}
        if jstar.upper is not None:
            constants.update(C.sigma_metrics(C.JSTAR_UP, jstar.sigmas, jstar.upper.values))
        self.logger.log_metrics(C.shown(constants, r.log_per_sigma), step=0)
        ds = self.dataset
        self.logger.log_dataset(Path(ds.spec.source).name, ds.fingerprint, {**ds.spec.to_dict(),
                                "fingerprint": ds.fingerprint}, {"count": ds.num_images, "resolution": ds.resolution,
                                "channels": ds.channels, "preprocessing": ds.preprocessing})
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.logger.log_artifact(write_json(self.run_dir.path / C.CONFIG_ARTIFACT, r.to_dict()))
        self.logger.log_artifact(jstar.save(self.run_dir.path / C.JSTAR_ARTIFACT))

    def description(self) -> str:
        """The run page's description: what ran, and which metric to look at first."""
        r, ds, grid = self.r, self.dataset, self.jstar.sigmas
        near_one = C.sigma_metric(C.GAP, grid[int(np.argmin(np.abs(np.log(grid))))])
        return (f"{r.preset} ({self.param_count:,} parameters) trained on {Path(ds.spec.source).name} "
                f"({ds.num_images:,} images, {ds.channels}x{ds.resolution}x{ds.resolution}, "
                f"preprocessing {ds.preprocessing}) with "
                f"the {describe_schedule(r)} schedule for {format_nimg(r.duration)} images. Step = training images "
                f"seen. Look first at {near_one} (the held-out gap J_sigma(theta) - J*_sigma near sigma = 1) and "
                f"{C.GAP_REF}; chart them against {C.FLOPS_TOTAL} to compare runs at equal compute. Per-sigma "
                f"curves: the 'gap_curve' images, or {C.PER_SIGMA_ARTIFACT} and {C.GAP_PLOT} in the artifacts.")

    def history(self, checkpoint_history: dict | None, nimg: int) -> C.PerSigmaHistory | None:
        """The per-sigma history to continue from: the checkpoint's, else (checkpoints from before it travelled in
        them) per_sigma.json cut at the checkpoint, whose statuses after its last snapshot are lost."""
        if checkpoint_history:
            return C.PerSigmaHistory.from_json(checkpoint_history)
        path = self.run_dir.path / C.PER_SIGMA_ARTIFACT
        if not path.exists():
            return None
        return C.PerSigmaHistory.from_json(json.loads(path.read_text())).cut(nimg)

    def new_history(self) -> C.PerSigmaHistory:
        return C.PerSigmaHistory(self.jstar.sigmas.tolist(), self.jstar.values.tolist(), self.jstar.stderr.tolist(),
                                 self.param_count, self.flops_per_image, self.r.schedule, self.r.preset)

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.logger.log_metrics(metrics, step=step)

    def finish(self, status: str) -> None:
        if self.logger is not None:
            self.logger.finish(status)


class StatusReporter:
    """One status (rank 0): the metrics of a held-out evaluation and the schedule, the history row, warnings
    (loss below J*, starved bands) and the status line, into MLflow, per_sigma history and log.txt."""

    def __init__(self, r: TrainConfig, jstar, jstar_path: Path, run_dir: RunDir, recorder: RunRecorder,
                 history: C.PerSigmaHistory | None, echo):
        self.r, self.jstar, self.jstar_path, self.run_dir, self.recorder = r, jstar, jstar_path, run_dir, recorder
        self.history = history or recorder.new_history()
        self.echo = echo
        self.starved: set[str] = set()  # bands of the grid the last status warned about

    def report(self, nimg: int, ema_loss: np.ndarray, ema_se: np.ndarray, raw_loss: np.ndarray, schedule,
               logvar_grid: np.ndarray | None, train_loss: float, lr: float, img_per_s: float, eta_s: float,
               elapsed_s: float, device: torch.device) -> dict:
        sigmas, jstar = self.jstar.sigmas, self.jstar.values
        m = per_sigma_metrics(sigmas, ema_loss, ema_se, jstar, raw_loss)
        m.update(schedule.status_metrics(logvar_grid))
        m.update({C.FLOPS_TOTAL: float(self.recorder.flops_per_image) * nimg, **system_metrics(device)})
        self.recorder.log_metrics(C.shown(m, self.r.log_per_sigma), step=nimg)
        self.history.append(nimg, m[C.LOSS_REF], m[C.FLOPS_TOTAL], loss_x0=ema_loss, stderr=ema_se,
                            loss_x0_raw=raw_loss, **schedule.history_row(logvar_grid))
        curve = plot_gap_curve(sigmas, jstar, ema_loss, ema_se, nimg, self.run_dir.path / "gap-curve.png")
        self.recorder.logger.log_image(curve, "gap_curve", nimg)
        self._warn_starved(nimg, schedule.starved(logvar_grid))
        bad = negative_gaps(sigmas, ema_loss, ema_se, jstar)
        if bad:
            msg = (f"WARNING: held-out loss below J* by more than 3 standard errors ({'; '.join(bad[:3])}). "
                   f"This means a bug or a J* table of other data ({self.jstar_path}).")
            print(msg, file=sys.stderr, flush=True)
            self.recorder.logger.set_tags({C.TAG_WARNING: msg[:500]})
        line = (f"{format_nimg(nimg):>8} img  loss {train_loss:.4f}  ref gap {m[C.GAP_REF]:.4f} "
                f"(J* {m[C.JSTAR_REF]:.4f})  lr {lr:.2e}  {img_per_s:7.1f} img/s  "
                f"elapsed {elapsed_s / 60:.1f} min  eta {eta_s / 60:.1f} min")
        self.echo(line)
        self.run_dir.log(line)
        return m

    def _warn_starved(self, nimg: int, bad: list[str]) -> None:
        """One line when a band of the grid newly gets less than half of its base schedule's share (method.md 4.4)."""
        new = [b for b in bad if b.split(":")[0] not in self.starved]
        self.starved = {b.split(":")[0] for b in bad}
        if new:
            line = (f"warning: {format_nimg(nimg)} img: the {self.r.opt_variant} schedule gives less than half "
                    f"of {self.r.base_schedule}'s share of the training signal to {'; '.join(new)}")
            print(line, file=sys.stderr, flush=True)
            self.run_dir.log(line)


def system_metrics(device: torch.device) -> dict:
    proc = psutil.Process()
    m = {"system/cpu_rss_gb": proc.memory_info().rss / 2 ** 30, "system/cpu_percent": psutil.cpu_percent()}
    if device.type == "cuda":
        m["system/gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return m


def save_snapshot(run_dir: RunDir, recorder: RunRecorder, history: C.PerSigmaHistory, emas: list, nimg: int,
                  network: dict, class_conditional: bool, samples: torch.Tensor, title: str) -> Path:
    """`snapshot-<nimg>.pt` (the first EMA profile's weights as `net`, every other profile's in `ema_profiles`, and
    how to rebuild the network), per_sigma.json, gap.png and the sample grid, each logged as an artifact."""
    dataset = recorder.dataset
    path = run_dir.save_snapshot({
        "net": emas[0].net.state_dict(), "ema": emas[0].name, "nimg": nimg, "network": network,
        "ema_profiles": {e.name: e.net.state_dict() for e in emas[1:]},
        "data": {**dataset.spec.to_dict(), "fingerprint": dataset.fingerprint,
                 **({"latents": dataset.latent.to_json()} if dataset.latent is not None else {})},
        "class_conditional": class_conditional, "edm_opt_version": __version__}, nimg)
    recorder.logger.log_artifact(write_json(run_dir.path / C.PER_SIGMA_ARTIFACT, history.to_json(), indent=None))
    if len(history):
        recorder.logger.log_artifact(plot_gap(history.to_json(), run_dir.path / C.GAP_PLOT, title=title))
    grid = save_image_grid(samples, run_dir.path / f"samples-{nimg:09d}.png")
    recorder.logger.log_artifact(grid, C.SAMPLES_DIR)
    recorder.logger.log_image(grid, C.SAMPLES_DIR, nimg)
    run_dir.log(f"snapshot {path.name}")
    return path
