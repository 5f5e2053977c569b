"""The one owner of what edm-opt's modules hand each other (DESIGN.md "MLflow naming contract").

- metric keys: scalar names, and per-sigma families whose key is `<family>sigma_<format(s, ".4g")>`
  (`sigma_metric(GAP, 1.863)` -> `gap/sigma_1.863`); step = training images seen;
- tag and artifact names;
- `PerSigmaHistory`: a run's per-sigma history (`per_sigma.json`, also kept in checkpoints): one row per
  held-out evaluation, appended by training, cut at a resume step, read by reports and diagnose, and rebuilt
  from the metric histories when the artifact is missing or short (the one fallback);
- `RunInfo`: the typed content of a run directory's `run.json`.

Units: every per-sigma loss is the x0 MSE per dimension in VE coordinates on data in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .diffusion import sigma_key

# --------------------------------------------------------------------------------------------------
# Metric keys

LOSS_TRAIN = "loss/train"  # the optimised loss under the run's own schedule
LOSS_REF = "loss/ref_total"  # DESIGN.md's reference total of the held-out per-sigma losses
JSTAR_REF = "jstar/ref_total"
GAP_REF = "gap/ref_total"
PARAM_COUNT = "model/param_count"
FLOPS_PER_IMAGE = "compute/flops_per_image"  # forward + backward
FLOPS_TOTAL = "compute/flops_total"
IMG_PER_S = "perf/img_per_s"
PEAK_MEM_GB = "perf/peak_mem_gb"  # CUDA only: rank 0's peak allocated memory
LR = "train/lr"
FID, KID = "fid", "kid"
FID_NUM_IMAGES, FID_REF_IMAGES, FID_STEPS, FID_MEAN = "fid/num_images", "fid/ref_images", "fid/steps", "fid/mean"
TAG_GNET = "edm_opt.gnet"  # the guiding network of guided FIDs


def fid_metric(key: str, guidance: float = 1.0, ema: str | None = None) -> str:
    """`fid` or `kid` of a snapshot's default EMA profile sampled without guidance; `fid/guidance_1.4` with
    guidance; `fid/ema_power_0.15` for another tracked profile, `fid/ema_power_0.1_posthoc` for a post-hoc one
    (`ema`: the profile's name as the snapshot stores it, None for the default)."""
    if guidance != 1:
        key += f"/guidance_{guidance:g}"
    return key + (f"/ema_{ema.replace(':', '_').replace(' ', '_')}" if ema else "")
SWEEP_CELLS_FINISHED, SWEEP_CELLS_FAILED = "sweep/cells_finished", "sweep/cells_failed"

# per-sigma families (prefixes of `sigma_<key>`)
LOSS_X0 = "loss_x0/"  # held-out, EMA weights
LOSS_X0_RAW = "loss_x0_raw/"  # held-out, raw weights
LOSS_X0_BATCH = "loss_x0_batch/"  # training-batch EMA per bin (the gap tracker)
LOSS_X0_TEST = "loss_x0_test/"  # diagnose: the test split
STDERR = "stderr/"
GAP = "gap/"  # held-out EMA loss minus J*
JSTAR = "jstar/"
JSTAR_UP = "jstar_up/"
SHARE = "sched/share_"  # each bin's share of the training signal
P_SIGMA = "sched/p_"  # the optimal schedule's sampling probability per bin


def sigma_metric(family: str, sigma: float) -> str:
    """`gap/` and 1.863 -> `gap/sigma_1.863`."""
    return f"{family}sigma_{sigma_key(sigma)}"


def sigma_metrics(family: str, sigmas, values, skip_nan: bool = False) -> dict[str, float]:
    """{sigma_metric(family, s): v} over a grid (NaN values left out with `skip_nan`)."""
    return {sigma_metric(family, s): float(v) for s, v in zip(sigmas, values)
            if not (skip_nan and (v is None or math.isnan(v)))}


SHOWN = (GAP, LOSS_X0)  # the per-sigma families that are MLflow metrics with --log-per-sigma gaps (the default)


def shown(metrics: dict[str, float], layout: str) -> dict[str, float]:
    """The metrics to send under a `--log-per-sigma` layout: every scalar, and per sigma all families ("all") or
    only gap/ and loss_x0/ ("gaps"; the others stay in per_sigma.json)."""
    if layout == "all":
        return metrics
    return {k: v for k, v in metrics.items() if "sigma_" not in k or k.startswith(SHOWN)}


def sigma_keys(family: str, keys) -> list[str]:
    """The sigma keys (`"1.863"`) of a family's metric names among `keys`, in increasing sigma."""
    prefix = f"{family}sigma_"
    return sorted((k.removeprefix(prefix) for k in keys if k.startswith(prefix)), key=float)


# --------------------------------------------------------------------------------------------------
# Loss shares (method.md 4.4): what `sched/share_sigma_<s>` holds, and the bands of the grid they are read in

BANDS = ((0.0, 0.3), (0.3, 2.0), (2.0, 10.0), (10.0, math.inf))  # the grid's bands for the starvation warning


def normalised_share(mass: np.ndarray, weight: np.ndarray, ema: np.ndarray) -> np.ndarray:
    """s_b = p_b w_b EMA_b / sum: each bin's share of the training signal (bins never seen: 0)."""
    s = np.nan_to_num(np.asarray(mass) * np.asarray(weight) * np.asarray(ema), nan=0.0)
    total = s.sum()
    return s / total if total > 0 else s


def band_shares(sigmas: np.ndarray, share: np.ndarray) -> list[float]:
    """The summed share of each band of BANDS."""
    return [float(share[(sigmas >= lo) & (sigmas < hi)].sum()) for lo, hi in BANDS]


def band_name(lo: float, hi: float) -> str:
    return f"sigma < {lo if hi == 0 else hi:g}" if lo == 0 else (f"sigma > {lo:g}" if math.isinf(hi)
                                                                  else f"sigma {lo:g}-{hi:g}")


# --------------------------------------------------------------------------------------------------
# Tags and artifacts

TAG_FINGERPRINT = "edm_opt.dataset_fingerprint"
TAG_JSTAR_SHA = "edm_opt.jstar_sha256"
TAG_GIT_COMMIT = "edm_opt.git_commit"
TAG_SCHEDULE = "edm_opt.schedule"
TAG_VARIANT = "edm_opt.opt_variant"
TAG_PRESET = "edm_opt.preset"
TAG_DURATION = "edm_opt.duration"
TAG_RUN_DIR = "edm_opt.run_dir"
TAG_SWEEP = "edm_opt.sweep"  # the parent sweep run's id
TAG_CELL_HASH = "edm_opt.cell_hash"
TAG_FID_SHA = "edm_opt.fid_weights_sha256"
TAG_WARNING = "edm_opt.warning"
TAG_MODEL = "edm_opt.model"  # diagnose runs
TAG_SWEEP_NAME, TAG_SWEEP_HASH = "edm_opt.sweep_name", "edm_opt.sweep_hash"
TAG_SWEEP_FILE, TAG_SWEEP_CELLS, TAG_SWEEP_LAUNCH = "edm_opt.sweep_file", "edm_opt.sweep_cells", "edm_opt.sweep_launch"
TAG_DUPLICATE_OF = "edm_opt.duplicate_of"
TAG_VERSION = "edm_opt.version"
TAG_PARENT = "mlflow.parentRunId"
TAG_NOTE = "mlflow.note.content"
TAG_SOURCE_NAME, TAG_SOURCE_TYPE = "mlflow.source.name", "mlflow.source.type"
TAG_SOURCE_COMMIT, TAG_USER = "mlflow.source.git.commit", "mlflow.user"

PER_SIGMA_ARTIFACT = "per_sigma.json"
JSTAR_ARTIFACT = "jstar.json"
CONFIG_ARTIFACT = "config.json"
GAP_PLOT = "gap.png"
SAMPLES_DIR = "samples"
RUN_INFO = "run.json"


# --------------------------------------------------------------------------------------------------
# The per-sigma history (per_sigma.json)

ROWS = ("loss_x0", "stderr", "loss_x0_raw", "loss_x0_batch", "p_sigma", "share")  # [K] per status, or None


@dataclass
class PerSigmaHistory:
    """A run's held-out per-sigma evaluations over training (per-dimension x0 MSE, VE sigma).

    Constant per run: sigmas [K], jstar and jstar_stderr [K], param_count, flops_per_image, schedule, preset.
    Per status t (parallel lists): nimg, ref_total (reference total of loss_x0), flops_total, and the rows
    loss_x0, stderr (held-out, EMA weights), loss_x0_raw (raw weights), loss_x0_batch (training-batch EMA,
    None where a bin was never sampled), p_sigma (optimal schedules, else None), share (each bin's share of
    the training signal; None for statuses written before shares existed).
    """

    sigmas: list[float]
    jstar: list[float]
    jstar_stderr: list[float]
    param_count: int | None = None
    flops_per_image: float | None = None
    schedule: str | None = None
    preset: str | None = None
    nimg: list[int] = field(default_factory=list)
    ref_total: list[float] = field(default_factory=list)
    flops_total: list[float] = field(default_factory=list)
    loss_x0: list = field(default_factory=list)
    stderr: list = field(default_factory=list)
    loss_x0_raw: list = field(default_factory=list)
    loss_x0_batch: list = field(default_factory=list)
    p_sigma: list = field(default_factory=list)
    share: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.nimg)

    def append(self, nimg: int, ref_total: float, flops_total: float, **rows) -> None:
        """One status: `rows` holds loss_x0, stderr, loss_x0_raw, loss_x0_batch, p_sigma, share (arrays or None;
        NaN entries become None)."""
        unknown = set(rows) - set(ROWS)
        if unknown:
            raise ValueError(f"unknown per-sigma rows {sorted(unknown)}")
        self.nimg.append(int(nimg))
        self.ref_total.append(float(ref_total))
        self.flops_total.append(float(flops_total))
        for name in ROWS:
            v = rows.get(name)
            getattr(self, name).append(None if v is None else [None if x is None or math.isnan(x) else float(x)
                                                               for x in np.asarray(v, dtype=np.float64)])

    def cut(self, nimg: int) -> "PerSigmaHistory":
        """The statuses at or below `nimg` (what a resume from a checkpoint at `nimg` keeps)."""
        keep = [i for i, n in enumerate(self.nimg) if n <= nimg]
        d = self.to_json()
        for name in ("nimg", "ref_total", "flops_total", *ROWS):
            d[name] = [d[name][i] for i in keep]
        return PerSigmaHistory.from_json(d)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "PerSigmaHistory":
        """From per_sigma.json (or a checkpoint's history); rows missing from older files are None per status."""
        names = {f.name for f in fields(cls)}
        h = cls(**{k: v for k, v in d.items() if k in names})
        for name in ROWS:
            rows = getattr(h, name)
            if len(rows) < len(h.nimg):  # a row added later (share): None for the statuses before it
                setattr(h, name, [None] * (len(h.nimg) - len(rows)) + list(rows))
        return h

    def array(self, name: str) -> np.ndarray:
        """A row family as [T, K] float64, NaN where missing."""
        k = len(self.sigmas)
        out = np.full((len(self.nimg), k), math.nan)
        for t, row in enumerate(getattr(self, name)):
            if isinstance(row, list) and len(row) == k:
                out[t] = [math.nan if v is None else v for v in row]
        return out

    @classmethod
    def from_metric_histories(cls, metrics: dict[str, float], history, rows=ROWS) -> "PerSigmaHistory":
        """The same history rebuilt from a run's MLflow metrics: `metrics` its latest values (for the keys and
        the constants), `history(key)` the (step, value) pairs of one metric; only the row families `rows`
        are read (one history per grid sigma each; loss_x0 always). Steps are those of loss_x0."""
        keys = sigma_keys(LOSS_X0, metrics)
        sigmas = [float(k) for k in keys]
        # J* is a logged constant with --log-per-sigma all; with gaps only, loss_x0 - gap at the last status
        jstar = [metrics[f"{JSTAR}sigma_{k}"] if f"{JSTAR}sigma_{k}" in metrics else
                 metrics[f"{LOSS_X0}sigma_{k}"] - metrics.get(f"{GAP}sigma_{k}", math.nan) for k in keys]
        families = dict(zip(ROWS, (LOSS_X0, STDERR, LOSS_X0_RAW, LOSS_X0_BATCH, P_SIGMA, SHARE)))
        rows = {name: {k: dict(history(f"{family}sigma_{k}")) for k in keys if f"{family}sigma_{k}" in metrics}
                for name, family in families.items() if name in rows or name == "loss_x0"}
        steps = sorted(set().union(*(set(v) for v in rows["loss_x0"].values()))) if keys else []
        flops, ref = dict(history(FLOPS_TOTAL)), dict(history(LOSS_REF))
        h = cls(sigmas, jstar, [math.nan] * len(keys), metrics.get(PARAM_COUNT), metrics.get(FLOPS_PER_IMAGE))
        for s in steps:
            h.append(s, ref.get(s, math.nan), flops.get(s, math.nan), **{
                name: [by_key.get(k, {}).get(s, math.nan) for k in keys] if by_key else None
                for name, by_key in rows.items()})
        return h


# --------------------------------------------------------------------------------------------------
# run.json


@dataclass
class RunInfo:
    """A run directory's run.json: the resolved config (a TrainConfig as a dict), the data spec and fingerprint,
    the network (arch, preset, constructor keywords), the J* table (path of the run's copy, source, sha256), the
    tracking URI and MLflow run id, parameter count and forward+backward FLOPs per image, edm-opt version."""

    config: dict
    data: dict
    network: dict
    jstar: dict
    tracking_uri: str | None
    mlflow_run_id: str | None
    experiment: str | None = None
    param_count: int | None = None
    flops_per_image: float | None = None
    edm_opt_version: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RunInfo":
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("config", "data") if n not in d]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        return cls(**{"network": {}, "jstar": {}, "tracking_uri": None, "mlflow_run_id": None,
                      **{k: v for k, v in d.items() if k in names}})
