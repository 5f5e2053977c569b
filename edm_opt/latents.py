"""Latent datasets, as EDM2 trains its img512 presets: per image the VAE posterior's mean and std (2C channels), a
fresh sample mean + std * eps each time an image is drawn, then an affine map per channel to the training range.

    x = (mean + std * eps) * scale + shift,   scale_c = final_std / raw_std_c,   shift_c = final_mean - raw_mean_c scale_c

The constants are stored with the dataset (`dataset.json` key `latents`, see `edm_opt.data`); EDM2's for the SD VAE
are raw_mean (5.81, 3.25, 0.12, -2.15), raw_std (4.17, 4.62, 3.71, 3.28), final_mean 0, final_std 0.5. J*, J*_up and
the held-out set use the deterministic means, scaled (the optimal loss of the mean latents; the table says so).
Pixels (FID, sample grids) need the VAE's decoder: diffusers' AutoencoderKL with its weights installed locally
(optional, imported only here); without it a snapshot's preview shows latent channels 0-2 and FID is refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import EdmOptError

VAE_NAME = "stabilityai/sd-vae-ft-mse"  # the VAE EDM2 encodes ImageNet-512 with (diffusers' name)
JSTAR_ON = "the scaled means (deterministic; training draws mean + std eps)"  # what J* of latents is of


class LatentError(EdmOptError, ValueError):
    """Latent constants missing or invalid, or pixels asked of latents without a decoder."""


@dataclass(frozen=True)
class LatentScaling:
    """Per-channel constants of a latent dataset: raw latent mean and std, and the target mean and std."""

    raw_mean: tuple[float, ...]
    raw_std: tuple[float, ...]
    final_mean: float = 0.0
    final_std: float = 0.5

    @property
    def channels(self) -> int:
        return len(self.raw_mean)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """scale_c = final_std / raw_std_c, shift_c = final_mean - raw_mean_c scale_c, shaped [C, 1, 1]."""
        scale = self.final_std / torch.tensor(self.raw_std, dtype=torch.float32)
        shift = self.final_mean - torch.tensor(self.raw_mean, dtype=torch.float32) * scale
        return scale.reshape(-1, 1, 1), shift.reshape(-1, 1, 1)

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [N, C, H, W] -> the training range."""
        scale, shift = self.scale_shift()
        return z * scale.to(z.device) + shift.to(z.device)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """The training range -> raw latents (what the VAE decodes)."""
        scale, shift = self.scale_shift()
        return (x - shift.to(x.device)) / scale.to(x.device)

    def describe(self) -> str:
        """Part of the dataset's preprocessing string, hence of its fingerprint."""
        def f(v):
            return ",".join(f"{x:g}" for x in v)
        return f"latents(mean={f(self.raw_mean)};std={f(self.raw_std)};to={self.final_mean:g}/{self.final_std:g})"

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d, channels: int, where: str) -> "LatentScaling":
        """From `dataset.json`'s `latents` object; LatentError naming `where` and the key for anything wrong."""
        if not isinstance(d, dict):
            raise LatentError(f"{where}: 'latents' must be an object with raw_mean, raw_std (and final_mean, "
                              f"final_std), got {type(d).__name__}")
        unknown = set(d) - {"raw_mean", "raw_std", "final_mean", "final_std"}
        if unknown:
            raise LatentError(f"{where}: unknown key latents.{sorted(unknown)[0]}")
        vals = {}
        for key in ("raw_mean", "raw_std"):
            v = d.get(key)
            if not isinstance(v, list) or len(v) != channels or not all(_finite(x) for x in v):
                raise LatentError(f"{where}: latents.{key} must be {channels} finite numbers (one per latent "
                                  f"channel), got {v!r}")
            vals[key] = tuple(float(x) for x in v)
        if any(s <= 0 for s in vals["raw_std"]):
            raise LatentError(f"{where}: latents.raw_std must be > 0, got {list(vals['raw_std'])}")
        for key, default in (("final_mean", 0.0), ("final_std", 0.5)):
            v = d.get(key, default)
            if not _finite(v) or (key == "final_std" and v <= 0):
                raise LatentError(f"{where}: latents.{key} must be a finite number{' > 0' * (key == 'final_std')}, "
                                  f"got {v!r}")
            vals[key] = float(v)
        return cls(**vals)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample_latents(moments: torch.Tensor, scaling: LatentScaling, generator: torch.Generator | None = None,
                   stochastic: bool = True) -> torch.Tensor:
    """x0 from moments [n, 2C, H, W] (mean channels, then std): (mean + std * eps) scale + shift with eps ~ N(0, I)
    from `generator` (on the moments' device), or the scaled mean when not `stochastic`."""
    mean, std = moments.float().chunk(2, dim=1)
    z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device) if stochastic else mean
    return scaling.apply(z)


_VAE: dict = {}


def decoder(scaling: LatentScaling, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """x in the training range [N, C, H, W] -> uint8 RGB pixels, through the SD VAE's decoder (diffusers; weights
    from the local Hugging Face cache only). LatentError with what to install when it is not there."""
    if "vae" not in _VAE:
        try:
            from diffusers.models import AutoencoderKL  # optional: only latent datasets need it

            _VAE["vae"] = AutoencoderKL.from_pretrained(VAE_NAME, local_files_only=True).eval()
        except Exception as e:  # ImportError, or the weights are not in the cache
            raise LatentError(f"pixels of a latent dataset need the VAE decoder {VAE_NAME}: install diffusers and "
                              f"its weights (pip install diffusers; huggingface-cli download {VAE_NAME}); "
                              f"{type(e).__name__}: {e}") from None
    vae = _VAE["vae"].to(device)

    @torch.no_grad()
    def decode(x: torch.Tensor) -> torch.Tensor:
        pixels = vae.decode(scaling.invert(x.to(device).float()))["sample"]  # [-1, 1]
        return (pixels * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()

    return decode


def pixel_decoder(scaling: LatentScaling | None, device: torch.device | str = "cpu"):
    """`generate`'s `decode` for data with these constants: None for pixel data (to_uint8), else the VAE decoder."""
    return None if scaling is None else decoder(scaling, device)


def snapshot_scaling(meta: dict) -> LatentScaling | None:
    """The latent constants a snapshot was trained with (its `data.latents`), or None for pixel data."""
    d = (meta.get("data") or {}).get("latents")
    return None if d is None else LatentScaling.from_json(d, len(d.get("raw_mean") or []), "snapshot data.latents")


def preview(x: torch.Tensor) -> torch.Tensor:
    """A sample grid's images for latents without a decoder: uint8 latents' first three channels (grey if fewer)."""
    return x[:, :3] if x.shape[1] >= 3 else x[:, :1]
