"""EDM's DDPM++ U-Net (Song et al.'s architecture as configured by EDM for CIFAR-10) with EDM preconditioning.

Implemented from Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(Table 1 and Appendix F) and the specification in docs/architectures.md Part 2 (section numbers below refer
to it). Names, shapes and registration order match the official release (`model.*`), so its checkpoints
load with `load_state_dict(strict=True)`; the "Bit-exactness" rules of the specification are followed.

Units: images and denoised outputs in data units ([-1, 1] pixels); sigma is the VE noise level.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edm_opt.diffusion import PRECONDS, SIGMA_DATA, precond_coefficients
from edm_opt.networks.edm2 import prepare_labels

SKIP_SCALE = math.sqrt(0.5)  # residual and attention merges multiply by sqrt(0.5), section 2.3
GROUPNORM_EPS = 1e-6  # every GroupNorm of SongUNet, section 2.2

# --------------------------------------------------------------------------------------------------
# Layers (section 2.2) and their initialisation (section 2.7).


def xavier_uniform(shape: Sequence[int], fan_in: int, fan_out: int) -> torch.Tensor:
    """sqrt(6 / (fan_in + fan_out)) (2u - 1), u ~ U[0, 1) (section 2.7)."""
    return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)


class Linear(nn.Module):
    """y = x W^T + b with W, b cast to the dtype of x; Xavier-uniform init times `init_weight`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(xavier_uniform([out_features, in_features], in_features, out_features)
                                   * init_weight)
        # Biases are drawn with the same rule and zeroed: the draw consumes random numbers (section 2.7).
        self.bias = nn.Parameter(xavier_uniform([out_features], in_features, out_features) * 0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """Optional 2x up/down resampling ([1, 1] filter buffer), then a k x k convolution, then the bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, init_weight: float = 1):
        super().__init__()
        self.out_channels = out_channels
        self.up, self.down = up, down
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        self.weight = nn.Parameter(xavier_uniform([out_channels, in_channels, kernel, kernel], fan_in, fan_out)
                                   * init_weight) if kernel else None
        self.bias = nn.Parameter(xavier_uniform([out_channels], fan_in, fan_out) * 0) if kernel and bias else None
        if up or down:
            f = torch.tensor([1.0, 1.0])
            self.register_buffer("resample_filter", f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        if self.up:  # nearest-neighbour 2x: transposed depthwise conv with 4 x filter (all ones)
            f = self.resample_filter.to(x.dtype)
            x = F.conv_transpose2d(x, f.mul(4).tile([C, 1, 1, 1]), groups=C, stride=2)
        if self.down:  # 2x2 average: depthwise conv with the filter
            f = self.resample_filter.to(x.dtype)
            x = F.conv2d(x, f.tile([C, 1, 1, 1]), groups=C, stride=2)
        if self.weight is not None:
            w = self.weight.to(x.dtype)
            x = F.conv2d(x, w, padding=w.shape[-1] // 2)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with G = min(32, C // 4) groups and eps 1e-6; affine parameters cast to x's dtype."""

    def __init__(self, num_channels: int, eps: float = GROUPNORM_EPS):
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), eps=self.eps)


def positional_embedding(s: torch.Tensor, num_channels: int, max_positions: int = 10000) -> torch.Tensor:
    """SongUNet's noise embedding [sin(s f_j) | cos(s f_j)], f_j = (1/10000)^(j/(h-1)) (section 2.2).

    The release's module returns [cos | sin] and SongUNet swaps the halves; this returns the swapped form.
    f_j is a float32 power whose base 1e-4 is rounded to float32 (bit-exactness rule of section 2.2).
    """
    h = num_channels // 2
    e = torch.arange(h, dtype=torch.float32, device=s.device) / (h - 1)  # endpoint=True
    f = torch.tensor(1 / max_positions, dtype=torch.float32, device=s.device).pow(e)
    theta = s.outer(f.to(s.dtype))
    return torch.cat([theta.sin(), theta.cos()], dim=1)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax_j(sum_c q[c, i] k[c, j] / sqrt(Ch)) in float32, cast back to q's dtype (section 2.2)."""
    k = k / math.sqrt(k.shape[1])
    A = torch.einsum("ncq,nck->nqk", q.to(torch.float32), k.to(torch.float32))
    return A.softmax(dim=2).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# UNetBlock (section 2.3) and SongUNet (section 2.4).


class UNetBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with additive embedding and optional single-head attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.dropout = dropout
        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down)
        self.affine = Linear(emb_channels, out_channels)
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init_weight=1e-5)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1, up=up, down=down)
        self.attention = attention
        if attention:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init_weight=math.sqrt(0.2))
            self.proj = Conv2d(out_channels, out_channels, 1, init_weight=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))  # step 1
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None].to(h.dtype)))  # step 2
        if self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        h = self.conv1(h)  # step 3
        x = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE  # step 4
        if self.attention:
            x = (self.self_attention(x) + x) * SKIP_SCALE  # step 5
        return x

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """proj(one-head attention of norm2(x)); q/k/v interleaved with stride 3 (section 2.3 step 5)."""
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm2(x)).reshape(B, C, 3, H * W).unbind(2)
        A = attention_weights(q, k)
        o = torch.einsum("nqk,nck->ncq", A, v)
        return self.proj(o.reshape(B, C, H, W))


class SongUNet(nn.Module):
    """DDPM++ U-Net with positional noise embedding, standard encoder and decoder (section 2.4)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, channel_mult_noise: int = 1):
        super().__init__()
        Ce = model_channels * channel_mult_emb
        self.noise_channels = Cn = model_channels * channel_mult_noise
        self.map_label = Linear(label_dim, Cn) if label_dim else None
        self.map_augment = Linear(augment_dim, Cn, bias=False) if augment_dim else None
        self.map_layer0 = Linear(Cn, Ce)
        self.map_layer1 = Linear(Ce, Ce)

        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(c, model_channels, 3)
                c = model_channels
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(c, c, Ce, down=True, dropout=dropout)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(c, model_channels * mult, Ce,
                                                          attention=r in attn_resolutions, dropout=dropout)
                c = model_channels * mult

        skips = [module.out_channels for module in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            r = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(c, c, Ce, attention=True, dropout=dropout)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(c, c, Ce, dropout=dropout)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(c, c, Ce, up=True, dropout=dropout)
            for i in range(num_blocks + 1):
                attention = i == num_blocks and r in attn_resolutions  # only the last block of a level
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(c + skips.pop(), model_channels * mult, Ce,
                                                          attention=attention, dropout=dropout)
                c = model_channels * mult
            if level == 0:
                self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(c)
                self.dec[f"{r}x{r}_aux_conv"] = Conv2d(c, out_channels, 3, init_weight=1e-5)

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                  augment_labels: torch.Tensor | None) -> torch.Tensor:
        """Mapping network, float32: positional features + labels, then two SiLU layers (section 2.4 step 1)."""
        emb = positional_embedding(noise_labels, self.noise_channels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embedding(noise_labels, class_labels, augment_labels)
        skips = []
        for module in self.enc.values():  # step 2
            x = module(x) if isinstance(module, Conv2d) else module(x, emb)
            skips.append(x)
        out = None
        for name, module in self.dec.items():  # step 3
            if name.endswith("aux_norm"):
                t = module(x)
            elif name.endswith("aux_conv"):
                out = module(F.silu(t))
            else:
                if x.shape[1] != module.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


class DDPMppPrecond(nn.Module):
    """EDM-preconditioned DDPM++: D(x; sigma) = c_skip x + c_out F(c_in x; ln(sigma)/4) (section 2.5).

    `precond` selects c_skip, c_out, c_in as in `EDM2Precond`; c_noise is always ln(sigma)/4. There is no
    log-variance head (`has_logvar = False`). `augment_dim = 9` reproduces official CIFAR-10 checkpoints.
    """

    has_logvar = False

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, model_channels: int = 128,
                 channel_mult: Sequence[int] = (2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.10, augment_dim: int = 0,
                 sigma_data: float = SIGMA_DATA, use_fp16: bool = False, precond: str = "edm",
                 channel_mult_noise: int = 1, channel_mult_emb: int = 4):
        super().__init__()
        if precond not in PRECONDS:
            raise ValueError(f"unknown preconditioning {precond!r}; expected one of {', '.join(PRECONDS)}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.use_fp16 = use_fp16
        self.precond = precond
        self.model = SongUNet(img_resolution, img_channels, img_channels, label_dim=label_dim,
                              augment_dim=augment_dim, model_channels=model_channels, channel_mult=channel_mult,
                              channel_mult_emb=channel_mult_emb, num_blocks=num_blocks,
                              attn_resolutions=attn_resolutions, dropout=dropout,
                              channel_mult_noise=channel_mult_noise)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Denoised estimate D (float32, shape of x)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        class_labels = prepare_labels(class_labels, self.label_dim, x.device)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in = precond_coefficients(self.precond, sigma, self.sigma_data)
        c_noise = (sigma.log() / 4).flatten()  # computed on the [-1, 1, 1, 1] tensor, section 2.5
        F_x = self.model((c_in * x).to(dtype), c_noise, class_labels=class_labels, augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)
