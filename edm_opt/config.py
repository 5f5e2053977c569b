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
from dataclasses import dataclass, fields
from pathlib import Path

from . import EdmOptError

SCHEDULES = ("edm", "edm2", "fm", "optimal")
BASE_SCHEDULES = ("edm", "edm2", "fm")
OPT_VARIANTS = ("paper", "floor", "base-below", "edm2-tilt")  # method.md sections 4.1 and 4.3
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


@dataclass
class TrainConfig:
    """Every option of `runners/train.py` (None = resolved from the preset, the data or the duration)."""

    # data and model
    data: str = "digits"
    resolution: int | None = None
    xflip: bool = False
    class_conditional: bool | None = None  # default: the preset's (ImageNet presets are conditional)
    preset: str = "edm2-mini"
    precond: str | None = None  # default: fm for the fm schedule (or optimal with base fm), else edm
    dropout: float | None = None
    # the schedule
    schedule: str = "edm2"
    base_schedule: str | None = None  # what `optimal` mixes with: edm2 for EDM2 presets, edm otherwise
    P_mean: float | None = None
    P_std: float | None = None
    jstar: str = "auto"
    sigmas: str = "0.002:80:32"
    opt_variant: str | None = None  # optimal: paper, floor, base-below, edm2-tilt (default: schedule.DEFAULT_VARIANT)
    opt_gamma: float | None = None  # tilted variants: exponent of the tilt (default: 1; 1/2 for edm2-tilt)
    opt_clip_lo: float | None = None  # tilted variants: the tilt ratio T_b / T_bar is clipped to [lo, hi]
    opt_clip_hi: float | None = None  # (default: [0.25, 4])
    opt_tau: float | None = None  # base-below: sigma_j = smallest grid sigma with J* >= tau J*_max (default 0.25)
    opt_refresh: int = 64  # optimiser steps between recomputations of p
    opt_decay: float = 0.99  # EMA decay of the per-bin batch loss, per optimiser step
    opt_mix: float = 0.2  # share of the base distribution in p
    opt_floor: float = 0.01  # floor added to the weighted gaps, relative to their mean
    opt_warmup_count: int = 16  # samples every bin with base mass above opt_warmup_mass needs before p moves
    opt_warmup_mass: float = 0.01
    opt_jstar_floor: float = 1e-6  # J* floor for interpolation, relative to the data variance per dimension
    opt_sigma_star: float = 1e-3  # sigma* = largest grid sigma with J* < this x J*_max; w_max = 1 / J*(sigma*)
    opt_bump: bool = False  # the ICLR version's Gaussian bump in ln sigma below sigma*
    opt_bump_height: float = 1.0
    importance_correction: bool = False  # divide the loss by p/base (ablations only)
    # optimisation
    duration: int = 256 * 2 ** 10
    batch: int | None = None
    batch_gpu: int | None = None
    lr: float | None = None
    lr_tref: float | None = None
    lr_warmup: float | None = None
    ema: str | None = None  # comma list of profiles, the first is the default: power:0.10, halflife:500000
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False
    # measurement cadence (images; None = duration/64 (with a floor: training.heldout_floor), /8, /16, whole batches)
    status_every: int | None = None
    snapshot_every: int | None = None
    checkpoint_every: int | None = None
    heldout_per_sigma: int = 64
    # FID of snapshots during training (0 = off)
    fid_every: int = 0
    fid_images: int = 256
    fid_ref_images: int | None = None  # training images in the FID reference (default min(N, 50000))
    # output and tracking
    outdir: str = "runs"
    experiment: str = "edm-opt"
    run_name: str | None = None
    parent_run_id: str | None = None
    cell_hash: str | None = None
    device: str = "auto"

    # keys left out of the run-name hash and allowed to change on resume
    UNHASHED = ("duration", "status_every", "snapshot_every", "checkpoint_every", "fid_every", "fid_images",
                "fid_ref_images", "outdir", "experiment", "run_name", "parent_run_id", "cell_hash", "device")
    NIMG_KEYS = ("duration", "status_every", "snapshot_every", "checkpoint_every", "fid_every")
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
        for key in self.NIMG_KEYS:
            v = getattr(self, key)
            if v is not None:
                setattr(self, key, parse_nimg(v))
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{source}: schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.base_schedule is not None and self.base_schedule not in BASE_SCHEDULES:
            raise ConfigError(f"{source}: base_schedule {self.base_schedule!r} is not one of "
                              f"{', '.join(BASE_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"{source}: precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.duration <= 0:
            raise ConfigError(f"{source}: duration must be positive")
        for key in ("batch", "batch_gpu", "heldout_per_sigma", "opt_refresh"):
            v = getattr(self, key)
            if v is not None and int(v) <= 0:
                raise ConfigError(f"{source}: {key} must be positive, got {v}")
        if not 0 <= self.opt_mix <= 1 or not 0 < self.opt_decay < 1:
            raise ConfigError(f"{source}: opt_mix must be in [0, 1] and opt_decay in (0, 1)")
        for key in ("opt_gamma", "opt_clip_lo", "opt_clip_hi", "opt_tau"):
            v = getattr(self, key)
            if v is not None:
                try:
                    setattr(self, key, float(v))
                except (TypeError, ValueError):
                    raise ConfigError(f"{source}: {key} must be a number, got {v!r}") from None
        if self.opt_variant is not None and self.opt_variant not in OPT_VARIANTS:
            raise ConfigError(f"{source}: opt_variant {self.opt_variant!r} is not one of {', '.join(OPT_VARIANTS)}")
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
