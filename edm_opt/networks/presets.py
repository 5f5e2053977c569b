"""Network presets: the official EDM2 and EDM DDPM++ configurations and small CPU-sized families.

A preset is plain data: the constructor keywords of its network and the training constants of the paper
it comes from (docs/method.md section 6). Units: learning-rate schedule lengths (`lr_tref`, `lr_warmup`)
and EMA half-lives are in images; `batch` is images per optimiser step.

Small presets state attention as `attn_levels` (level l has resolution img_resolution >> l) and are
resolved against the data's resolution when built; the official presets keep the absolute
`attn_resolutions` of their papers.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from edm_opt.networks.ddpmpp import DDPMppPrecond
from edm_opt.networks.edm2 import EDM2Precond

ARCHITECTURES = {"edm2": EDM2Precond, "ddpmpp": DDPMppPrecond}
DATA_KEYS = ("img_resolution", "img_channels", "label_dim")


@dataclass(frozen=True)
class Preset:
    """One network configuration with its base training constants."""

    name: str
    arch: str  # "edm2" | "ddpmpp"
    network: dict = field(hash=False)  # constructor keywords; data keys filled in by build_network
    P_mean: float  # base log-normal sigma density: ln sigma ~ N(P_mean, P_std^2)
    P_std: float
    lr: float  # alpha_ref
    lr_tref: float | None  # images; None = constant learning rate (EDM)
    lr_warmup: float  # images
    batch: int  # images per optimiser step
    adam_betas: tuple[float, float]
    ema: str  # default EMA profile: "power:<sigma_rel>" (EDM2) or "halflife:<images>" (EDM)
    description: str

    @property
    def resolution_multiple(self) -> int:
        """The image resolution must be a multiple of this: 2^(levels - 1)."""
        return resolution_multiple(self.arch, self.network)


def resolution_multiple(arch: str, network: dict) -> int:
    """2^(levels - 1) for a network configuration (levels = len(channel_mult), constructor default if absent)."""
    channel_mult = network.get("channel_mult",
                               inspect.signature(ARCHITECTURES[arch]).parameters["channel_mult"].default)
    return 2 ** (len(channel_mult) - 1)


# --------------------------------------------------------------------------------------------------
# Official configurations (EDM2 paper Table 2 and release; EDM paper Table 7; method.md section 6).

EDM2_ITERS = 2048  # EDM2 counts t_ref in iterations of batch 2048; edm-opt counts images
EDM2_SIZES = {"xs": (128, 0.0120, 0.0), "s": (192, 0.0100, 0.0), "m": (256, 0.0090, 0.10),
              "l": (320, 0.0080, 0.10), "xl": (384, 0.0070, 0.10), "xxl": (448, 0.0065, 0.10)}


def _edm2_official(dataset: str, size: str) -> Preset:
    model_channels, lr, dropout = EDM2_SIZES[size]
    img512 = dataset == "img512"
    network = dict(img_resolution=64, img_channels=4 if img512 else 3, label_dim=1000,
                   model_channels=model_channels, channel_mult=(1, 2, 3, 4), num_blocks=3,
                   attn_resolutions=(16, 8), dropout=dropout)
    what = "ImageNet-512 latents (4 x 64 x 64)" if img512 else "ImageNet-64 pixels (3 x 64 x 64)"
    return Preset(name=f"edm2-{dataset}-{size}", arch="edm2", network=network,
                  P_mean=-0.4 if img512 else -0.8, P_std=1.0 if img512 else 1.6,
                  lr=lr, lr_tref=(70000 if img512 else 35000) * EDM2_ITERS, lr_warmup=10e6, batch=2048,
                  adam_betas=(0.9, 0.99), ema="power:0.10",
                  description=f"EDM2-{size.upper()} for {what}, 1000 classes (EDM2 paper)")


DDPMPP_CIFAR10 = Preset(
    name="ddpmpp-cifar10", arch="ddpmpp",
    network=dict(img_resolution=32, img_channels=3, label_dim=0, model_channels=128, channel_mult=(2, 2, 2),
                 num_blocks=4, attn_resolutions=(16,), dropout=0.13, augment_dim=0),
    P_mean=-1.2, P_std=1.2, lr=1e-3, lr_tref=None, lr_warmup=10e6, batch=512, adam_betas=(0.9, 0.999),
    ema="halflife:500000",
    description="EDM's DDPM++ for CIFAR-10 32 x 32 (EDM paper); unconditional unless label_dim is given")

# --------------------------------------------------------------------------------------------------
# Small families for 8 x 8 to 32 x 32 data on a few CPU cores. Three levels (resolution divisible by 4),
# attention at the lowest level. Density: EDM2's pixel-space base (-0.8, 1.6), which covers the sigma grid
# more widely than EDM's (-1.2, 1.2); learning rate EDM2-style, decay after 2^19 images; warm-up 2^16
# images (the trainer caps it at 5% of the run).

SMALL_EDM2 = {  # name: (model_channels, num_blocks, channels_per_head, dropout, lr)
    "nano": (8, 1, 16, 0.0, 0.012),
    "micro": (12, 1, 24, 0.0, 0.012),
    "tiny": (16, 2, 32, 0.0, 0.010),
    "mini": (32, 2, 32, 0.0, 0.010),
    "small": (48, 2, 48, 0.10, 0.009),
    "base": (64, 2, 64, 0.10, 0.008),
}


def _edm2_small(size: str) -> Preset:
    model_channels, num_blocks, channels_per_head, dropout, lr = SMALL_EDM2[size]
    network = dict(model_channels=model_channels, channel_mult=(1, 2, 2), num_blocks=num_blocks,
                   attn_levels=(2,), channels_per_head=channels_per_head, dropout=dropout)
    return Preset(name=f"edm2-{size}", arch="edm2", network=network, P_mean=-0.8, P_std=1.6, lr=lr,
                  lr_tref=2 ** 19, lr_warmup=2 ** 16, batch=128, adam_betas=(0.9, 0.99), ema="power:0.10",
                  description=f"small EDM2 U-Net, {model_channels} channels x (1, 2, 2), {num_blocks} blocks "
                              f"per level, attention at the lowest level")


DDPMPP_TINY = Preset(
    name="ddpmpp-tiny", arch="ddpmpp",
    network=dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_levels=(2,), dropout=0.10),
    P_mean=-1.2, P_std=1.2, lr=1e-3, lr_tref=None, lr_warmup=2 ** 16, batch=128, adam_betas=(0.9, 0.999),
    ema="halflife:50000",
    description="small DDPM++ U-Net, 32 channels x (1, 2, 2), 2 blocks per level, attention at the lowest "
                "level; EDM CIFAR-10 constants scaled down")

PRESETS: dict[str, Preset] = {
    p.name: p for p in (
        *(_edm2_official("img512", s) for s in ("xs", "s", "m", "l", "xl", "xxl")),
        *(_edm2_official("img64", s) for s in ("xs", "s", "m", "l", "xl")),
        DDPMPP_CIFAR10,
        *(_edm2_small(s) for s in SMALL_EDM2),
        DDPMPP_TINY,
    )
}


def list_presets() -> list[Preset]:
    """Every registered preset, official ones first."""
    return list(PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def network_kwargs(preset: str, img_resolution: int | None = None, img_channels: int | None = None,
                   label_dim: int | None = None, **overrides) -> dict:
    """Resolved constructor keywords: preset values < data values (when not None) < overrides.

    `attn_levels` becomes `attn_resolutions` for the actual resolution. Raises ValueError for missing data
    values or a resolution that is not a multiple of 2^(levels - 1).
    """
    p = get_preset(preset)
    kwargs = dict(p.network)
    data = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
    kwargs.update({k: v for k, v in data.items() if v is not None})
    kwargs.update(overrides)
    kwargs.setdefault("label_dim", 0)
    accepted = set(inspect.signature(ARCHITECTURES[p.arch]).parameters) | {"attn_levels"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"preset {p.name!r} ({p.arch}) does not take {', '.join(unknown)}; valid keywords: "
                         f"{', '.join(sorted(accepted))}")
    missing = [k for k in DATA_KEYS if k not in kwargs]
    if missing:
        raise ValueError(f"preset {p.name!r} needs {', '.join(missing)} (from the data or as arguments)")
    R = kwargs["img_resolution"]
    multiple = resolution_multiple(p.arch, kwargs)
    if R < multiple or R % multiple:
        valid = -(-R // multiple) * multiple
        raise ValueError(f"preset {p.name!r} needs an image resolution divisible by {multiple} (one halving per "
                         f"level); got {R}. Pad the data to {valid} x {valid} or choose a preset with fewer "
                         f"levels.")
    if "attn_levels" in kwargs:
        kwargs["attn_resolutions"] = tuple(R >> level for level in kwargs.pop("attn_levels"))
    return kwargs


def build_network(preset: str, img_resolution: int | None = None, img_channels: int | None = None,
                  label_dim: int | None = None, device: torch.device | str | None = None, **overrides) -> nn.Module:
    """Build the preconditioned network of `preset` (EDM2Precond or DDPMppPrecond).

    Data values (`img_resolution` in pixels, `img_channels`, `label_dim`; 0 = unconditional) replace the
    preset's when given; `overrides` (any constructor keyword) win over both. `device="meta"` builds
    without memory, e.g. for parameter counting. Initial values are drawn from the global generator in
    state-dict order, as in the official releases.
    """
    kwargs = network_kwargs(preset, img_resolution, img_channels, label_dim, **overrides)
    cls = ARCHITECTURES[get_preset(preset).arch]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return cls(**kwargs)
