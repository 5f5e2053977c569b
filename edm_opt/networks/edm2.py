"""EDM2's magnitude-preserving U-Net with EDM preconditioning and a log-variance head.

Implemented from Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"
(config G) and the specification in docs/architectures.md Part 1 (section numbers below refer to it).
Parameter names, shapes and registration order match the official release so that its checkpoints load
with `load_state_dict(strict=True)`; the "Bit-exactness" rules of the specification are followed.

Units: images and denoised outputs are in data units ([-1, 1] pixels or latents); sigma is the VE noise
level (same units); channel counts are integers; resolutions are pixels per side.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edm_opt.diffusion import PRECONDS, SIGMA_DATA, precond_coefficients

# --------------------------------------------------------------------------------------------------
# Primitives (section 1.2).


def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """N(x; S): unit root-mean-square over the axes `dim` (default: all but axis 0) (section 1.2.1).

    d = eps + ||x|| sqrt(1/K) is one fused multiply-add in float32 (`torch.add(eps, n, alpha=...)`);
    the division runs in the dtype of x.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    n = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    d = torch.add(eps, n, alpha=math.sqrt(n.numel() / x.numel()))  # fma(sqrt(1/K), n, eps), section 1.2.1
    return x / d.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU: silu(x) / 0.596 (section 1.2.2)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving sum lerp(a, b, t) / sqrt((1-t)^2 + t^2), numerator via lerp (section 1.2.3)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation [wa a, wb b] along `dim` (section 1.2.4)."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / math.sqrt(Na) * (1 - t)
    wb = C / math.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x: torch.Tensor, mode: str = "keep") -> torch.Tensor:
    """2x down (2x2 average) or up (nearest) with the [1, 1] filter as depthwise convolutions (section 1.2.7)."""
    if mode == "keep":
        return x
    C = x.shape[1]
    f = torch.full([C, 1, 2, 2], 0.25, dtype=x.dtype, device=x.device)  # outer([1/2, 1/2], [1/2, 1/2])
    if mode == "down":
        return F.conv2d(x, f, groups=C, stride=2)
    if mode == "up":
        return F.conv_transpose2d(x, f * 4, groups=C, stride=2)
    raise ValueError(f"unknown resample mode {mode!r}; expected keep, down or up")


class MPFourier(nn.Module):
    """Random Fourier features sqrt(2) cos(s freqs + phases), output RMS 1 (section 1.2.5)."""

    def __init__(self, num_channels: int, bandwidth: float = 1):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)  # drawn first
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))  # drawn second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).outer(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [kh, kw]) or linear layer (kernel []) (section 1.2.6).

    In training mode every forward first overwrites the stored weight with N(weight) (forced weight
    normalisation, section 1.7); eval mode never touches the parameter.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1) -> torch.Tensor:
        w = self.weight.to(torch.float32)  # the parameter itself for float32 storage
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))  # forced weight normalisation, section 1.2.6 step 2
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))  # s = g / sqrt(fan_in) formed first, section 1.2.6 step 4
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


# --------------------------------------------------------------------------------------------------
# Block (section 1.3).


class Block(nn.Module):
    """Residual block, encoder (`enc`) or decoder (`dec`) flavour, with optional cosine self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", attention: bool = False, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"unknown block flavour {flavor!r}; expected enc or dec")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(f"{out_channels} channels do not split into {self.num_heads} attention heads "
                             f"(channels_per_head={channels_per_head})")
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)  # step 1
        if self.flavor == "enc":  # step 2
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.residual(x, emb)  # step 3
        if self.flavor == "dec" and self.conv_skip is not None:  # step 4
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)  # step 5
        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)  # step 6
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)  # step 7
        return x

    def residual(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Residual branch with multiplicative conditioning c = 1 + emb_gain (W e) (section 1.3 step 3)."""
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout > 0:
            y = F.dropout(y, p=self.dropout)
        return self.conv_res1(y)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine multi-head self-attention; q/k/v interleaved with stride 3 per head (section 1.3 step 6)."""
        B, C, H, W = x.shape
        z = self.attn_qkv(x).reshape(B, self.num_heads, -1, 3, H * W)  # channel h*3Ch + c*3 + s
        q, k, v = normalize(z, dim=2).unbind(3)  # unit RMS over the Ch axis
        A = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        o = torch.einsum("nhqk,nhck->nhcq", A, v)
        return self.attn_proj(o.reshape(B, C, H, W))


# --------------------------------------------------------------------------------------------------
# UNet (section 1.4).


class UNet(nn.Module):
    """EDM2 U-Net F(x; c_noise, y): encoder/decoder of Blocks with mp_cat skips (section 1.4)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, **block_kwargs):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None

        self.enc = nn.ModuleDict()
        c = img_channels + 1  # image channels + the constant-ones channel
        for level, channels in enumerate(cblock):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = MPConv(c, channels, [3, 3])
                c = channels
            else:
                self.enc[f"{r}x{r}_down"] = Block(c, c, cemb, "enc", resample_mode="down", **block_kwargs)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = Block(c, channels, cemb, "enc", attention=r in attn_resolutions,
                                                      **block_kwargs)
                c = channels

        skips = [module.out_channels for module in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            r = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{r}x{r}_in0"] = Block(c, c, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{r}x{r}_in1"] = Block(c, c, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{r}x{r}_up"] = Block(c, c, cemb, "dec", resample_mode="up", **block_kwargs)
            for i in range(num_blocks + 1):
                self.dec[f"{r}x{r}_block{i}"] = Block(c + skips.pop(), channels, cemb, "dec",
                                                      attention=r in attn_resolutions, **block_kwargs)
                c = channels
        self.out_conv = MPConv(c, img_channels, [3, 3])

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))  # section 1.4 forward step 1
        if self.emb_label is not None:
            y = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, y, t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # step 2
        skips = []
        for module in self.enc.values():  # step 3
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, block in self.dec.items():  # step 4
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)  # step 5


# --------------------------------------------------------------------------------------------------
# Preconditioner (section 1.5).


class EDM2Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4), plus the learned log-variance u(sigma).

    `precond` selects c_skip, c_out, c_in (`edm` is the official EDM2 behaviour; `ve`, `vp`, `fm` come
    from `edm_opt.diffusion.precond_coefficients`); c_noise is always ln(sigma)/4. `use_fp16` runs the
    U-Net body in float16 on CUDA only (section 1.5 step 3). Class labels are one-hot float vectors.
    """

    has_logvar = True

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), dropout: float = 0.0, sigma_data: float = SIGMA_DATA,
                 use_fp16: bool = False, logvar_channels: int = 128, precond: str = "edm",
                 channel_mult_noise: int | None = None, channel_mult_emb: int | None = None,
                 label_balance: float = 0.5, concat_balance: float = 0.5, channels_per_head: int = 64,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {precond!r}; expected one of {', '.join(PRECONDS)}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.use_fp16 = use_fp16
        self.precond = precond
        self.unet = UNet(img_resolution, img_channels, label_dim, model_channels=model_channels,
                         channel_mult=channel_mult, channel_mult_noise=channel_mult_noise,
                         channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                         attn_resolutions=attn_resolutions, label_balance=label_balance,
                         concat_balance=concat_balance, channels_per_head=channels_per_head, dropout=dropout,
                         res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, [])

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_logvar: bool = False, force_fp32: bool = False):
        """Denoised estimate D (float32, shape of x); with `return_logvar`, also u(sigma) as B x 1 x 1 x 1."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        class_labels = prepare_labels(class_labels, self.label_dim, x.device)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in = precond_coefficients(self.precond, sigma, self.sigma_data)  # section 1.5 step 4
        c_noise = sigma.flatten().log() / 4
        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            return D_x, self.logvar(sigma)
        return D_x

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        """EDM2's learned log-variance u(sigma) as B x 1 x 1 x 1 (an MP-Fourier embedding of ln(sigma)/4)."""
        c_noise = torch.as_tensor(sigma, dtype=torch.float32).flatten().log() / 4
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)


def prepare_labels(class_labels: torch.Tensor | None, label_dim: int, device) -> torch.Tensor | None:
    """None for unconditional nets; zeros 1 x label_dim when absent; else float32 B x label_dim (section 1.5 step 2)."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros([1, label_dim], device=device)
    return class_labels.to(torch.float32).reshape(-1, label_dim)
