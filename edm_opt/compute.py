"""Parameter and FLOP counting: the compute f of the scaling law (method.md section 5, DESIGN.md metrics).

`model/param_count` is the sum over `parameters()` (buffers excluded); `compute/flops_per_image` is
measured with `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add of every
matrix multiply and convolution (attention included) and nothing for elementwise operations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module) -> int:
    """Number of trainable values: sum of numel over `parameters()`, buffers excluded."""
    return sum(p.numel() for p in module.parameters())


def flops_per_image(net: nn.Module, img_resolution: int, img_channels: int, label_dim: int = 0,
                    backward: bool = True, device: torch.device | str = "cpu", batch_size: int = 1,
                    sigma: float = 1.0) -> int:
    """FLOPs of one denoiser evaluation per image (forward, or forward + backward with `backward`).

    Runs `net(x, sigma, labels)` on a batch of `batch_size` random images at a fixed sigma, in eval mode
    (so EDM2's forced weight normalisation leaves the weights alone; its few FLOPs are the same in both
    modes), and divides by the batch size. The backward pass computes parameter gradients only, like
    training, through `torch.autograd.grad`, so no `.grad` is touched. `device="meta"` works with a net
    built on the meta device: counts come from shapes only, no memory or time is spent on values.
    Gradients are enabled inside, so it may be called from a `torch.no_grad()` context.
    """
    x = torch.randn(batch_size, img_channels, img_resolution, img_resolution, device=device)
    labels = torch.zeros(batch_size, label_dim, device=device) if label_dim else None
    if label_dim:
        labels[:, 0] = 1
    sigma_t = torch.full([batch_size], sigma, device=device)
    params = [p for p in net.parameters() if p.requires_grad]
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:
            D = net(x, sigma_t, labels)
            if backward:
                torch.autograd.grad(D.square().sum(), params, allow_unused=True)
    finally:
        net.train(was_training)
    return counter.get_total_flops() // batch_size
