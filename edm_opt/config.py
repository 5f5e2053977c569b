"""A training run's configuration as plain data: parsed from options and YAML, resolved, hashed, dumped.

Image counts accept `Ki` (2^10 images) and `Mi` (2^20 images) suffixes (DESIGN.md glossary). The
resolved config is what a run logs as MLflow params and stores in its run directory; its hash (without
duration, intervals and output options) names the run, so the same command finds the same run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from . import EdmOptError
from .diffusion import PRECONDS, parse_sigmas
from .ema import parse_profiles
from .networks import get_preset

SCHEDULES = ("edm", "edm2", "fm", "vp", "ve", "optimal")
BASE_SCHEDULES = ("edm", "edm2", "fm")
OPT_VARIANTS = ("paper", "floor", "base-below", "edm2-tilt")  # method.md sections 4.1 and 4.3
DEFAULT_VARIANT = "floor"  # on a base other than edm2; on edm2 (EDM2 presets) edm2-tilt, see default_variant
VARIANT_DEFAULTS = {  # method.md section 4.3: gamma, clip range and tau where the variant uses them
    "floor": {"gamma": 1.0, "clip_lo": 0.25, "clip_hi": 4.0},
    "base-below": {"gamma": 1.0, "clip_lo": 0.25, "clip_hi": 4.0, "tau": 0.25},
    "edm2-tilt": {"gamma": 0.5, "clip_lo": 0.25, "clip_hi": 4.0},
}
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(EdmOptError, ValueError):
    """A bad option, config file or resume request; the message names the key or file."""


def parse_nimg(value) -> int:
    """'2Ki' -> 2048, '8Mi' -> 8388608, '1.5Mi', '5000' or an int -> images."""
    if isinstance(value, bool):
        raise ConfigError(f"not an image count: {value!r}")
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(Ki|Mi|Gi|k|M)?\s*", str(value))
    if not m:
        raise ConfigError(f"not an image count: {value!r} (use e.g. 5000, 64Ki, 8Mi)")
    scale = {None: 1, "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "k": 1000, "M": 10 ** 6}[m.group(2)]
    return int(round(float(m.group(1)) * scale))


def format_nimg(n: int) -> str:
    for unit, scale in (("Mi", 2 ** 20), ("Ki", 2 ** 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


DATA_HELP = ("'digits' (built in), a directory of IDX files (e.g. /usr/share/datasets/fashion-mnist), "
             "a *-ubyte[.gz] file, an EDM .zip or folder of PNGs (or of .npy latents with their constants in "
             "dataset.json), a .npz, or the CIFAR-10 python tarball")


def option(default, help: str, *, default_text: str | None = None, choices: tuple | None = None,
           flag: str | None = None, hidden: bool = False):
    """A TrainConfig field with what its command-line option needs: the help text (units included), the choices,
    the flag (default `--name-with-dashes`, `--x/--no-x` for booleans) and how the default reads in --help
    (`default_text`; the default itself when omitted, none when the default is None)."""
    return field(default=default, metadata={"help": help, "default_text": default_text, "choices": choices,
                                            "flag": flag, "hidden": hidden})


@dataclass
class TrainConfig:
    """Every option of `runners/train.py`, once: type, default, unit and help text, from which the command-line
    options are generated (cli.train_options). None = resolved from the preset, the data or the duration."""

    # data and model
    data: str = option("digits", f"Training data: {DATA_HELP}.")
    resolution: int | None = option(None, "Pad (smaller images) or resize to RxR; part of the data fingerprint.")
    xflip: bool = option(False, "Add mirrored copies to the data (J* is estimated on them).", default_text="off")
    class_conditional: bool | None = option(
        None, "Condition on labels; J* is then class-conditional.", flag="--class-conditional/--unconditional",
        default_text="the preset's; ImageNet presets are conditional")
    preset: str = option("edm2-mini", "Network preset (`edm-opt networks` lists them).")
    precond: str | None = option(None, "Preconditioning c_skip/c_out/c_in.", choices=("edm", "ve", "vp", "fm"),
                                 default_text="fm for the fm schedule or base, vp / ve for those, else edm")
    dropout: float | None = option(None, "Dropout probability.", default_text="the preset's")
    # the schedule
    schedule: str = option("edm2", "Loss weight and sigma sampling: edm (log-normal, lambda), edm2 (+ learned "
                           "log-variance), fm (flow matching), vp / ve (EDM's VP and VE losses: eps loss, their "
                           "own sigma densities), optimal (from J*, see --opt-variant).",
                           choices=SCHEDULES)
    base_schedule: str | None = option(None, "What `optimal` starts from and mixes with.", choices=BASE_SCHEDULES,
                                       default_text="edm2 for EDM2 presets, edm otherwise")
    P_mean: float | None = option(None, "Mean of ln sigma of the base log-normal.", flag="--P-mean",
                                  default_text="the preset's")
    P_std: float | None = option(None, "Std of ln sigma of the base log-normal.", flag="--P-std",
                                 default_text="the preset's")
    jstar: str = option("auto", "J* table (JSON from `edm-opt estimate`), or 'auto': cDOL into the cache.")
    sigmas: str = option("0.002:80:32", "sigma grid MIN:MAX:COUNT for J*, gaps and the optimal schedule's bins.")
    opt_variant: str | None = option(
        None, "optimal: which form of the schedule (method.md 4.3). floor: weight a/max(J*_train, J*_up), base "
        "density tilted by the weighted gap; base-below: a/J* above sigma_j, the base weight's shape below; "
        "edm2-tilt: EDM2's learned weight, tilted by the reducible fraction of the loss; paper: the literal "
        "a min(1/J*, w_max) with p ~ the weighted gap (loses to its base in every run measured).",
        choices=OPT_VARIANTS, default_text=f"edm2-tilt on an edm2 base (EDM2 presets), else {DEFAULT_VARIANT}")
    opt_gamma: float | None = option(None, "optimal, tilted variants: exponent of the tilt, 0 = the base density.",
                                     default_text="1; 0.5 for edm2-tilt")
    opt_clip_lo: float | None = option(None, "optimal, tilted variants: lower clip of the tilt ratio T_b/T_bar.",
                                       default_text="0.25")
    opt_clip_hi: float | None = option(None, "optimal, tilted variants: upper clip of the tilt ratio.",
                                       default_text="4")
    opt_tau: float | None = option(None, "optimal, base-below: sigma_j = smallest grid sigma with J* >= tau J*_max.",
                                   default_text="0.25")
    opt_refresh: int = option(64, "optimal: optimiser steps between updates of p.")
    opt_decay: float = option(0.99, "optimal: per-step EMA decay of the per-bin batch loss.")
    opt_mix: float = option(0.2, "optimal: share m of the base distribution in p.")
    opt_floor: float = option(0.01, "optimal, paper: floor added to the weighted gaps, x their mean.")
    opt_warmup_count: int = option(16, "optimal: samples per bin before p leaves the base.")
    opt_warmup_mass: float = option(0.01, "optimal: bins with base mass above this need them.")
    opt_jstar_floor: float = option(1e-6, "optimal: J* floor, x the data variance.")
    opt_sigma_star: float = option(1e-3, "optimal, paper: sigma* = largest sigma with J* < this x J*_max; "
                                   "w_max = 1/J*(sigma*).")
    opt_bump: bool = option(False, "optimal, paper: Gaussian bump in ln sigma below sigma*.", default_text="off")
    opt_bump_height: float = option(1.0, "optimal, paper: height of the bump.")
    importance_correction: bool = option(False, "optimal: divide the loss by p/base (ablations only).",
                                         default_text="off")
    # optimisation
    duration: int = option(256 * 2 ** 10, "Training length in images: 5000, 256Ki, 8Mi.", default_text="256Ki")
    batch: int | None = option(None, "Global batch (images per optimiser step).", default_text="the preset's")
    batch_gpu: int | None = option(None, "Per-rank micro-batch cap; the rest is gradient accumulation.")
    lr: float | None = option(None, "Reference learning rate alpha_ref.", default_text="the preset's")
    lr_tref: float | None = option(None, "Images before the 1/sqrt decay starts (0: none).",
                                   default_text="the preset's")
    lr_warmup: float | None = option(None, "Warm-up in images, capped at 5% of the duration.",
                                     default_text="the preset's")
    ema: str | None = option(None, "EMA profiles: power:0.10 (EDM2 sigma_rel), halflife:500000 (images). The first "
                             "is the one held-out gaps, FID and sample grids use; every profile is in each "
                             "snapshot (evaluate --ema; two power profiles allow `edm-opt phema`).",
                             default_text="the preset's")
    seed: int = option(0, "Seed of initialisation, data order, noise.")
    precision: str = option("fp32", "Autocast precision.", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the network.", default_text="off")
    # measurement cadence (images; None = duration/64 (with a floor: heldout_floor), /8, /16, whole batches)
    status_every: int | None = option(
        None, "Images between held-out evaluations and status lines.",
        default_text="duration/64; shorter runs than 1.7Mi get fewer, evenly spaced points >= 27Ki apart (32 sigmas "
        "x 64 held-out images), so held-out evaluation stays under 5% of the run")
    snapshot_every: int | None = option(None, "Images between kept EMA snapshots.", default_text="duration/8")
    checkpoint_every: int | None = option(None, "Images between training-state checkpoints.",
                                          default_text="duration/16")
    heldout_per_sigma: int = option(64, "Held-out images per grid sigma.")
    log_every: int | None = option(None, "Images between the cheap scalars in MLflow (loss/train, train/lr, "
                                   "perf/img_per_s) and progress updates; whole batches.",
                                   default_text="duration/256 in whole batches: a few hundred points per run")
    system_metrics: bool | None = option(
        None, "MLflow's system-metrics monitor on rank 0 (CPU, memory, disk, network; GPU with nvidia-ml-py), every "
        "10 s, in the run's System metrics tab.", default_text="on with a tracking server, off on a SQLite store")
    log_per_sigma: str = option("gaps", "Per-sigma MLflow metrics: gaps (gap/ and loss_x0/ only, what a person charts) "
                                "or all (also raw-weight and batch losses, stderr, J*, shares, p); per_sigma.json always "
                                "holds everything.", choices=("gaps", "all"))
    # FID of snapshots during training (0 = off)
    fid_every: int = option(0, "Images between FID/KID evaluations of snapshots (0: off).")
    fid_images: int = option(256, "Generated images per FID/KID evaluation.")
    fid_ref_images: int | None = option(None, "Training images in the FID reference.", default_text="min(N, 50000)")
    # output and tracking
    outdir: str = option("runs", "Runs go to OUTDIR/EXPERIMENT/RUN_NAME.")
    experiment: str = option("edm-opt", "MLflow experiment.")
    run_name: str | None = option(None, "Run name.", default_text="PRESET-SCHEDULE-sSEED-HASH, so the same command "
                                  "resumes")
    parent_run_id: str | None = option(None, "MLflow parent run (sweeps set it).")
    cell_hash: str | None = option(None, "", hidden=True)
    device: str = option("auto", "auto, cpu, cuda; under torchrun each rank takes cuda:LOCAL_RANK.")
    restart: bool = option(False, "Start the run over from 0 images into a new MLflow run; its checkpoints and "
                           "snapshots move to previous-<time>/ in the run directory.", default_text="off")

    # keys left out of the run-name hash and allowed to change on resume
    UNHASHED = ("duration", "status_every", "snapshot_every", "checkpoint_every", "fid_every", "fid_images",
                "fid_ref_images", "outdir", "experiment", "run_name", "parent_run_id", "cell_hash", "device", "restart",
                "log_every", "log_per_sigma", "system_metrics")
    NIMG_KEYS = ("duration", "status_every", "snapshot_every", "checkpoint_every", "fid_every", "log_every")
    # keys added after runs existed, with the value that reproduces those runs: at that value (or None) they are
    # left out of the hash and of resume checks, so earlier runs keep their names and resume
    ADDED = {"opt_variant": "paper", "opt_gamma": None, "opt_clip_lo": None, "opt_clip_hi": None, "opt_tau": None}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a mapping whose keys are option names (dashes or underscores)."""
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in d.items():
            name = str(key).replace("-", "_").lstrip("_")
            if name not in names:
                close = [n for n in names if n.split("_")[0] == name.split("_")[0]]
                hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
                raise ConfigError(f"{source}: unknown option {key!r}{hint}")
            kwargs[name] = value
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        """Coerce every value to its field's type and check its range; ConfigError naming `source` and the key.

        Run at parse time (command line, --config, sweep files), so `--dry-run` catches what a run would refuse."""
        for f in fields(self):
            setattr(self, f.name, _coerce(f, getattr(self, f.name), source))
        if self.duration <= 0:
            raise ConfigError(f"{source}: duration must be positive")
        positive = ("batch", "batch_gpu", "heldout_per_sigma", "opt_refresh", "status_every", "snapshot_every",
                    "checkpoint_every", "log_every", "fid_images", "fid_ref_images", "lr", "resolution", "opt_warmup_count")
        for key in positive:
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"{source}: {key} must be positive, got {v}"
                                  + ("; leave it out for the default" if key.endswith("_every") else ""))
        for key in ("fid_every", "lr_tref", "lr_warmup", "opt_floor", "opt_warmup_mass", "opt_jstar_floor",
                    "opt_bump_height"):
            v = getattr(self, key)
            if v is not None and not v >= 0:
                raise ConfigError(f"{source}: {key} must be >= 0, got {v}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"{source}: dropout must be in [0, 1), got {self.dropout}")
        if self.P_std is not None and not self.P_std > 0:
            raise ConfigError(f"{source}: P_std must be positive, got {self.P_std}")
        if not 0 <= self.opt_mix <= 1 or not 0 < self.opt_decay < 1:
            raise ConfigError(f"{source}: opt_mix must be in [0, 1] and opt_decay in (0, 1)")
        if not 0 < self.opt_sigma_star < 1:
            raise ConfigError(f"{source}: opt_sigma_star must be in (0, 1), got {self.opt_sigma_star}")
        if self.opt_gamma is not None and not self.opt_gamma >= 0:
            raise ConfigError(f"{source}: opt_gamma must be >= 0 (0: sample from the base), got {self.opt_gamma}")
        lo, hi = self.opt_clip_lo, self.opt_clip_hi
        if (lo is not None and not lo > 0) or (lo is not None and hi is not None and not lo < hi):
            raise ConfigError(f"{source}: the tilt's clip range needs 0 < opt_clip_lo < opt_clip_hi, got "
                              f"[{lo}, {hi}]")
        if self.opt_tau is not None and not 0 < self.opt_tau <= 1:
            raise ConfigError(f"{source}: opt_tau must be in (0, 1], got {self.opt_tau}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _compared(cls, d: dict) -> dict:
        """The keys of a (stored or own) config that identify a run: hashed keys, added keys not at their
        earlier value."""
        return {k: v for k, v in d.items()
                if k not in cls.UNHASHED and not (k in cls.ADDED and (v is None or v == cls.ADDED[k]))}

    def hashed(self) -> dict:
        return self._compared(self.to_dict())

    def config_hash(self) -> str:
        """6 hex digits over everything that changes the run's numbers (not duration, intervals, output)."""
        return hashlib.sha256(json.dumps(self.hashed(), sort_keys=True, default=str).encode()).hexdigest()[:6]

    def default_run_name(self) -> str:
        return f"{self.preset}-{self.schedule}-s{self.seed}-{self.config_hash()}"

    def resume_conflicts(self, stored: dict) -> list[str]:
        """Hashed keys whose value differs from a stored (resolved) config: what forbids resuming."""
        mine, theirs = self.hashed(), self._compared(stored)
        keys = sorted(set(mine) | set(theirs))
        return [k for k in keys if json.dumps(mine.get(k), default=str) != json.dumps(theirs.get(k), default=str)]


# --------------------------------------------------------------------------------------------------
# Resolution: every None filled from the preset, the data and the duration

STATUS_POINTS, SNAPSHOT_POINTS, CHECKPOINT_POINTS, LOG_POINTS = 64, 8, 16, 256  # default intervals: duration / these
HELDOUT_SHARE = 0.05  # the default status interval keeps held-out evaluation under this share of the run
FORWARD_COST = 1 / 3  # a held-out forward pass, in training images (forward + backward + optimiser step)


def resolve_config(cfg: TrainConfig, world_size: int = 1) -> TrainConfig:
    """Fill every None from the preset and the duration; check combinations that cannot work, for a run of
    `world_size` ranks (the global batch must divide among them)."""
    cfg.validate()
    try:
        preset = get_preset(cfg.preset)
    except ValueError as e:
        raise ConfigError(f"preset: {e}") from None
    r = dataclasses.replace(cfg)
    if r.class_conditional is None:
        r.class_conditional = preset.network.get("label_dim", 0) > 0
    if r.schedule == "optimal":
        r.base_schedule = r.base_schedule or ("edm2" if preset.arch == "edm2" else "edm")
    else:
        r.base_schedule = None
    _resolve_variant(r, preset)
    uses_fm = r.schedule == "fm" or r.base_schedule == "fm"
    r.precond = r.precond or ("fm" if uses_fm else r.schedule if r.schedule in ("vp", "ve") else "edm")
    r.P_mean = preset.P_mean if r.P_mean is None else float(r.P_mean)
    r.P_std = preset.P_std if r.P_std is None else float(r.P_std)
    r.batch = int(r.batch or preset.batch)
    r.lr = float(preset.lr if r.lr is None else r.lr)
    lr_tref = preset.lr_tref if r.lr_tref is None else r.lr_tref
    r.lr_tref = None if lr_tref is None else float(lr_tref)
    r.lr_warmup = float(preset.lr_warmup if r.lr_warmup is None else r.lr_warmup)
    r.ema = r.ema or preset.ema
    r.dropout = float(preset.network.get("dropout", 0.0) if r.dropout is None else r.dropout)
    if r.schedule == "edm2" and preset.arch != "edm2":
        raise ConfigError(f"schedule: edm2 needs a network with a log-variance head (an EDM2 preset), "
                          f"{r.preset} is {preset.arch}; use --schedule edm")
    if r.precond not in PRECONDS:
        raise ConfigError(f"precond {r.precond!r} is not one of {', '.join(PRECONDS)}")
    parse_profiles(r.ema)
    if r.batch % world_size:
        raise ConfigError(f"batch {r.batch} is not divisible by the {world_size} ranks")
    per_rank = r.batch // world_size
    if r.batch_gpu is not None and per_rank % min(int(r.batch_gpu), per_rank):
        raise ConfigError(f"batch_gpu {r.batch_gpu} must divide the per-rank batch {per_rank}")
    grid_size = len(parse_sigmas_checked(r.sigmas))
    status_points = min(STATUS_POINTS, max(1, int(r.duration // heldout_floor(grid_size, r.heldout_per_sigma))))
    if r.log_every is not None and r.log_every % r.batch:
        raise ConfigError(f"log_every {r.log_every} is not a whole number of batches of {r.batch} images")
    defaults = {"status_every": r.duration / status_points, "snapshot_every": r.duration / SNAPSHOT_POINTS,
                "checkpoint_every": r.duration / CHECKPOINT_POINTS, "log_every": r.duration / LOG_POINTS}
    for key, default in defaults.items():
        value = getattr(r, key) or default
        setattr(r, key, max(r.batch, int(round(value / r.batch)) * r.batch))
    r.run_name = r.run_name or r.default_run_name()
    return r


def default_variant(base_schedule: str) -> str:
    """The variant `--schedule optimal` runs without --opt-variant: edm2-tilt on EDM2's own schedule (the only
    variant that matched its base on Fashion-MNIST, stage 1 of docs/results/schedule.md; floor and base-below
    trailed it by 2-7%), floor on the others (edm, fm)."""
    return "edm2-tilt" if base_schedule == "edm2" else DEFAULT_VARIANT


def _resolve_variant(r: TrainConfig, preset) -> None:
    """The optimal schedule's variant and the constants it uses (method.md section 4.3); options that the
    run's schedule or variant does not use are errors rather than silently ignored."""
    constants = ("opt_gamma", "opt_clip_lo", "opt_clip_hi", "opt_tau")
    if r.schedule != "optimal":
        given = [k for k in ("opt_variant",) + constants if getattr(r, k) is not None]
        if given:
            raise ConfigError(f"{given[0]}: applies to --schedule optimal only, and this run's schedule is "
                              f"{r.schedule}")
        return
    r.opt_variant = r.opt_variant or default_variant(r.base_schedule)
    defaults = VARIANT_DEFAULTS.get(r.opt_variant, {})
    for key in constants:
        name = key.removeprefix("opt_")
        if name in defaults:
            setattr(r, key, defaults[name] if getattr(r, key) is None else getattr(r, key))
        elif getattr(r, key) is not None:
            users = [v for v, d in VARIANT_DEFAULTS.items() if name in d]
            raise ConfigError(f"{key}: the {r.opt_variant} variant does not use it (only {', '.join(users)})")
    if r.opt_clip_lo is not None and not r.opt_clip_lo < r.opt_clip_hi:
        raise ConfigError(f"opt_clip_lo {r.opt_clip_lo} must be below opt_clip_hi {r.opt_clip_hi}")
    if r.opt_bump and r.opt_variant != "paper":
        raise ConfigError(f"opt_bump: only the paper variant has the bump, not {r.opt_variant}")
    if r.opt_variant == "edm2-tilt" and preset.arch != "edm2":
        raise ConfigError(f"opt_variant: edm2-tilt learns EDM2's log-variance and needs an EDM2 preset, "
                          f"{r.preset} is {preset.arch}")


def needs_upper(r: TrainConfig) -> bool:
    """Whether the run's schedule uses J*_up (the floor variant)."""
    return r.schedule == "optimal" and r.opt_variant == "floor"


def describe_schedule(r: TrainConfig) -> str:
    """`optimal (floor on edm2: gamma 1, clip [0.25, 4], mix 0.2)`, or the base schedule's name."""
    if r.schedule != "optimal":
        return r.schedule
    parts = [f"gamma {r.opt_gamma:g}", f"clip [{r.opt_clip_lo:g}, {r.opt_clip_hi:g}]"] if r.opt_gamma is not None else []
    if r.opt_tau is not None:
        parts.append(f"tau {r.opt_tau:g}")
    parts.append(f"mix {r.opt_mix:g}")
    return f"optimal ({r.opt_variant} on {r.base_schedule}: {', '.join(parts)})"


def heldout_floor(grid_size: int, per_sigma: int) -> float:
    """Shortest default status interval, in images: one held-out evaluation (EMA and raw weights, grid_size x
    per_sigma forward passes each) costs at most HELDOUT_SHARE of the training between two evaluations.

    The default is duration/64 for long runs; below ~1.7Mi images (32 sigmas x 64 images) it is duration/k with
    the largest k that respects this floor, so a short CPU run gets fewer, evenly spaced, equally precise curve
    points (the last at the end of the run) instead of spending half its time evaluating.
    """
    return 2 * grid_size * per_sigma * FORWARD_COST / HELDOUT_SHARE


def parse_sigmas_checked(spec: str) -> np.ndarray:
    try:
        return parse_sigmas(spec)
    except ValueError as e:
        raise ConfigError(f"sigmas: {e}") from None


def _coerce(f, value, source: str):
    """A value (from YAML or the command line) as its field's type: image counts through parse_nimg; integers only
    from whole numbers; booleans only from true/false; choices checked."""
    if value is None:
        return None
    name, kind = f.name, str(f.type)
    want = "an image count" if name in TrainConfig.NIMG_KEYS else next(
        (t for t in ("bool", "int", "float", "str") if t in kind), "str")
    try:
        if name in TrainConfig.NIMG_KEYS:
            out = parse_nimg(value)
        elif want == "bool":
            if not isinstance(value, bool):
                raise ValueError
            out = value
        elif want == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            out = int(float(value))
        elif want == "float":
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        else:
            if isinstance(value, (dict, list)):
                raise ValueError
            out = str(value)
    except (TypeError, ValueError, ConfigError):
        article = "a whole number" if want == "int" else "true or false" if want == "bool" else \
            "a number" if want == "float" else want if want == "an image count" else "a string"
        raise ConfigError(f"{source}: {name} must be {article}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{source}: {name} {out!r} is not one of {', '.join(choices)}")
    return out


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping (`what` names the file in errors: "config file", "sweep file"); a clear error otherwise."""
    import yaml

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML ({e})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value, got {type(d).__name__}")
    return d


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested mapping -> {'a.b': value} with values as strings (MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = "None" if v is None else str(v)
    return out
