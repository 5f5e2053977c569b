"""EDM's deterministic Heun and Euler samplers as released with EDM2, with per-sample seeds and guidance.

Karras et al. 2022, Algorithm 2, in the form of docs/architectures.md Part 3: float32 working dtype, time
steps t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho with t_N = 0, Euler
on the last step, optional stochastic churn. Randomness comes from one generator per sample so that a
sample depends only on its seed, never on the batch size or the number of devices.

Guidance (EDM2's autoguidance, Karras et al. 2024; classifier-free guidance when the guiding network is
unconditional): D_w(x; sigma) = D_g(x; sigma) + w (D(x; sigma) - D_g(x; sigma)), `Guided`.

Units: sigma and time steps are VE noise levels; samples are in data units ([-1, 1] pixels); images
returned by `generate` are uint8 in [0, 255].
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from . import EdmOptError
from .progress import progress as progress_bar

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class PerSampleGenerator:
    """One torch.Generator per sample, seeded `seed % 2**32` on `device` (architectures.md Part 3)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Stack of one standard-normal draw of `shape` per sample: len(seeds) x shape."""
        return torch.stack([torch.randn(list(shape), generator=g, dtype=dtype, device=self.device)
                            for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """One integer per sample, uniform in [0, high)."""
        return torch.stack([torch.randint(high, size=[1], generator=g, device=self.device)
                            for g in self.generators]).flatten()


class SamplingError(EdmOptError, ValueError):
    """A class asked of an unconditional network or outside its range; guidance without a guiding network."""


class Guided(torch.nn.Module):
    """D_w = D_g + w (D - D_g): `net` guided by `gnet` with weight `guidance` (w = 1 is `net` itself; w > 1
    pushes samples away from what the guide predicts). The guide gets the class labels when it is conditional
    and none when it is not (classifier-free guidance with an unconditional net)."""

    def __init__(self, net: torch.nn.Module, gnet: torch.nn.Module, guidance: float):
        super().__init__()
        for attr in ("img_channels", "img_resolution"):
            if getattr(gnet, attr, None) != getattr(net, attr, None):
                raise ValueError(f"the guiding network's {attr} is {getattr(gnet, attr, None)}, the network's "
                                 f"{getattr(net, attr, None)}")
        g_labels = getattr(gnet, "label_dim", 0) or 0
        if g_labels and g_labels != (getattr(net, "label_dim", 0) or 0):
            raise ValueError(f"the guiding network has {g_labels} classes, the network "
                             f"{getattr(net, 'label_dim', 0) or 0}")
        self.net, self.gnet, self.guidance = net, gnet, float(guidance)
        self.img_channels, self.img_resolution = net.img_channels, net.img_resolution
        self.label_dim = getattr(net, "label_dim", 0)
        self.g_conditional = bool(g_labels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        d = self.net(x, sigma, class_labels).to(torch.float32)
        d_g = self.gnet(x, sigma, class_labels if self.g_conditional else None).to(torch.float32)
        return d_g.lerp(d, self.guidance)  # D_g + w (D - D_g)


def guided(net: torch.nn.Module, gnet: torch.nn.Module | None, guidance: float = 1.0) -> torch.nn.Module:
    """`net` guided by `gnet` with weight `guidance`; `net` itself (bit for bit, no guide evaluated) at w = 1."""
    if guidance == 1:
        return net
    if gnet is None:
        raise SamplingError(f"guidance {guidance:g} needs a guiding network (--gnet): an autoguidance snapshot (a "
                         f"smaller or earlier model of the same data) or an unconditional one")
    return Guided(net, gnet, guidance)


def time_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
               device: torch.device | str | None = None) -> torch.Tensor:
    """t_0 > ... > t_{N-1} and t_N = 0 (N + 1 float32 values, VE sigma).

    Bit-exact order (architectures.md Part 3): double-precision roots and their difference, then left to
    right in float32: i / (N - 1), times the difference, plus sigma_max^(1/rho), power rho.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float32, device=device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def _edm_sample(denoiser: Denoiser, noise: torch.Tensor, class_labels: torch.Tensor | None, heun: bool,
                num_steps: int, sigma_min: float, sigma_max: float, rho: float, S_churn: float, S_min: float,
                S_max: float, S_noise: float,
                seeds: Sequence[int] | PerSampleGenerator | None) -> torch.Tensor:
    """The EDM2 release's sampler loop (architectures.md Part 3); `heun` False gives Euler everywhere."""
    dtype = torch.float32
    if isinstance(seeds, PerSampleGenerator) or seeds is None:
        rnd = seeds
    else:
        rnd = PerSampleGenerator(seeds, noise.device)
    if rnd is not None and len(rnd.generators) != noise.shape[0]:
        raise ValueError(f"{len(rnd.generators)} seeds for a batch of {noise.shape[0]} samples")

    def D(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(x, t, class_labels).to(dtype)

    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, device=noise.device)
    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if S_churn > 0 and S_min <= t_cur <= S_max:  # churn: no random numbers are drawn otherwise
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            eps = rnd.randn(x_cur.shape[1:], dtype) if rnd is not None else torch.randn_like(x_cur)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps
        else:
            t_hat, x_hat = t_cur, x_cur
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat  # Euler step
        x_next = x_hat + (t_next - t_hat) * d_cur
        if heun and i < num_steps - 1:  # second-order correction except on the last step (t_next = 0)
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"), S_noise: float = 1,
                seeds: Sequence[int] | PerSampleGenerator | None = None) -> torch.Tensor:
    """EDM Heun sampler (2N - 1 network evaluations); returns x_N in float32, data units.

    `denoiser(x, sigma, class_labels)` is called with a 0-dim float32 sigma. `noise` is standard normal
    (B x C x H x W) and is scaled by t_0. Churn noise comes from per-sample generators (`seeds`: one seed
    per sample, or a `PerSampleGenerator` already in use); with churn active and no seeds it comes from
    the global generator. Pass an eval-mode network: a training-mode EDM2 forward rewrites its weights.
    """
    return _edm_sample(denoiser, noise, class_labels, True, num_steps, sigma_min, sigma_max, rho, S_churn,
                       S_min, S_max, S_noise, seeds)


@torch.no_grad()
def euler_sample(denoiser: Denoiser, noise: torch.Tensor, class_labels: torch.Tensor | None = None,
                 num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                 S_churn: float = 0, S_min: float = 0, S_max: float = float("inf"), S_noise: float = 1,
                 seeds: Sequence[int] | PerSampleGenerator | None = None) -> torch.Tensor:
    """First-order (Euler) version of `heun_sample` on the same time steps (N network evaluations)."""
    return _edm_sample(denoiser, noise, class_labels, False, num_steps, sigma_min, sigma_max, rho, S_churn,
                       S_min, S_max, S_noise, seeds)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8(clip(x * 127.5 + 128, 0, 255)) with truncation, as the official generator (data in [-1, 1])."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(denoiser: torch.nn.Module, seeds: Sequence[int], batch_size: int = 64, num_steps: int = 32,
             class_labels: str | int | None = "random", device: torch.device | str | None = None,
             progress: bool = False, decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
             **sampler_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images for `seeds` as the official generator makes them: (uint8 N x C x R x R on CPU, labels or None).
    `decode` maps the final latents to uint8 pixels (a latent model's VAE, edm_opt.latents); default `to_uint8`.

    Per sample: a generator seeded `seed % 2**32` on the sampling device draws the C x R x R noise, then
    (conditional nets, `class_labels="random"`) the class index uniform in [0, label_dim). An int fixes
    the class; None gives no labels (the network's zero-label default). Returned labels are class indices
    (int64) or None. The network runs in eval mode and gets its mode back. `sampler_kwargs` go to
    `heun_sample`.
    """
    if isinstance(class_labels, str) and class_labels != "random":
        raise ValueError(f"class_labels must be 'random', an int or None, got {class_labels!r}")
    label_dim = denoiser.label_dim
    if isinstance(class_labels, int) and not label_dim:
        raise SamplingError(f"class {class_labels} asked of an unconditional network (it has no labels)")
    if isinstance(class_labels, int) and not 0 <= class_labels < label_dim:
        raise SamplingError(f"class {class_labels} is outside [0, {label_dim})")
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    C, R = denoiser.img_channels, denoiser.img_resolution
    seeds = list(seeds)
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    if progress:
        batches = progress_bar(batches, unit="batch", desc="generate")
    images, labels = [], []
    with eval_mode(denoiser):
        for batch_seeds in batches:
            rnd = PerSampleGenerator(batch_seeds, device)
            noise = rnd.randn([C, R, R])  # drawn first
            one_hot = None
            if label_dim and class_labels is not None:
                idx = rnd.randint(label_dim) if class_labels == "random" else \
                    torch.full([len(batch_seeds)], int(class_labels), device=device)
                labels.append(idx.cpu())
                one_hot = torch.nn.functional.one_hot(idx, label_dim).float()
            x = heun_sample(denoiser, noise, one_hot, num_steps=num_steps, seeds=rnd, **sampler_kwargs)
            images.append((to_uint8(x) if decode is None else decode(x)).cpu())
    return torch.cat(images), (torch.cat(labels) if labels else None)


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module):
    """Run `net` in eval mode, then give it its mode back. A training-mode EDM2 forward rewrites its weights."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)
